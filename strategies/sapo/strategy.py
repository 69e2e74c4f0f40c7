"""`sapo`: decentralized RL post-training where peers share rollouts (Swarm sAmpling Policy Optimization).

Every peer owns its policy (the byte-level GPT of ctx.trainer, or a local HF model) and its
verifier. Peers never exchange weights or gradients, only text: each round a peer samples
Q questions, generates G completions each, shares them, and takes a GRPO step on I of its
own groups plus J groups other peers shared, re-scored by its own verifier.

Rounds are wall-clock epochs of --sapo-round-s on the DHT clock, so every peer agrees on r
without talking; a peer that falls behind skips to the current round (`SapoStrategy` lists
the steps of one round). Received rollouts are validated in full before use
(records.decode_rollout); each rejection is counted by reason. The cumulative reward is the
summed reward of this peer's own completions (the same generation compute in every I/J
configuration).
"""
from __future__ import annotations

import asyncio
import hashlib
import math
import random
import time
from collections import defaultdict
from typing import Any, AsyncIterator

import msgpack
import torch
from google.protobuf.wrappers_pb2 import BytesValue
from swarm_node.protocol.clock import swarm_time
from prometheus_client import Counter, Gauge, Histogram

from swarm_node.protocol.signing import Signer
from swarm_node.protocol.transport import PeerUnavailable, drain, first_message

from swarm_node.strategies.sapo.churn_profile import SAPO_DEMO, SAPO_PROFILE
from swarm_node.strategies.sapo import tasks as tasks
from swarm_node.strategies.base import Strategy
from swarm_node.strategies.page_panel import PagePanel
from swarm_node.strategies.sapo.gossip import GossipClient
from swarm_node.strategies.sapo.math import (ScoredGroup, all_zero, build_training_set, finite_grads, grpo_loss,
                        training_advantages)
from swarm_node.strategies.sapo.policy import BytePolicy, HFPolicy, hf_available
from swarm_node.strategies.sapo.records import (REJECT_REASONS, Manifest, RolloutGroup, RolloutRejected, SignedRollout,
                           decode_gossip_addrs, decode_rollout, encode_gossip_addrs, encode_rollout,
                           gossip_addrs_key, manifest_key, round_of, round_start)
from swarm_node.strategies.sapo.options import SapoOptions

PULL = "sapo.pull"
CHANNEL = "rollouts"
RECEIVE_PATHS = ("gossip", "pull")
DROP_REASONS = ("zero_variance", "shortfall", "own", "duplicate")
SKIP_REASONS = ("all_zero", "non_finite")
ALL_REJECT_REASONS = (*REJECT_REASONS, "bad_task")
ROUNDS_KEPT = 3  # rounds of our own rollouts kept for pulls / of inbox kept for late arrivals
MAX_PULL_IDS = 64
MAX_INBOX_PER_ROUND = 4096  # bounded memory whatever peers send
HISTORY_KEPT = 10_000  # per-round rows kept for summary.json


def score_external(sr: SignedRollout, *, format_reward: float = 0.0) -> ScoredGroup | None:
    """Score another peer's group with THIS node's verifier, against the truth regenerated
    from its (task, seed, index). None when the question does not match that triple (the
    sender lied about the task). Nothing the sender wrote besides the completions is used."""
    g = sr.group
    try:
        item = tasks.make_item(g.task, g.seed, g.index)
    except tasks.TaskError:
        return None
    if item.question != g.question:
        return None
    rewards = tuple(tasks.score(item, c, format_reward=format_reward) for c in g.completions)
    return ScoredGroup(g.sender, sr.group_id, (g.task, g.seed, g.index), item.question, g.completions, rewards, True)


def round_budget(max_steps: int, steps_now: int, steps_per_round: int) -> int | None:
    """How many more rounds --max-steps allows, counting every round as the steps it would take
    if it trained: a round whose groups all have one reward trains nothing, and a policy that
    never earns a reward again would otherwise run forever. None without --max-steps."""
    if not max_steps:
        return None
    return max(0, math.ceil((max_steps - steps_now) / steps_per_round))


class SapoMetrics:
    """The strategy's own series (bounded labels)."""

    def __init__(self, registry, negative_scale: float) -> None:
        r = registry
        self.round = Gauge("swarm_sapo_round", "Swarm round this peer last trained.", registry=r)
        self.peers_seen = Gauge("swarm_sapo_peers_seen", "Distinct senders of external rollouts this round.", registry=r)
        self.local_reward = Gauge("swarm_sapo_local_reward_mean", "Mean reward of this round's own completions.", registry=r)
        self.cumulative_reward = Gauge("swarm_sapo_cumulative_reward", "Summed reward of own completions.", registry=r)
        self.negative_scale = Gauge("swarm_sapo_external_negative_advantage_scale",
                                    "Scale on negative advantages of external groups.", registry=r)
        self.negative_scale.set(negative_scale)
        self.published = Counter("swarm_sapo_rollouts_published", "Rollout groups this peer published.", registry=r)
        self.received = Counter("swarm_sapo_rollouts_received", "Valid external rollout groups received, by path.",
                                ["path"], registry=r)
        self.used = Counter("swarm_sapo_external_used", "External groups used in updates.", registry=r)
        self.dropped = Counter("swarm_sapo_external_dropped", "External groups not used, by reason "
                               "(shortfall counts missing groups, not received ones).", ["reason"], registry=r)
        self.rejected = Counter("swarm_sapo_payloads_rejected", "Received rollouts rejected, by reason.", ["reason"],
                                registry=r)
        self.rounds_without_external = Counter("swarm_sapo_rounds_without_external",
                                               "Rounds trained on local groups only.", registry=r)
        self.late = Counter("swarm_sapo_late_rollouts", "Rollouts that arrived after their round was trained.",
                            registry=r)
        self.skipped = Counter("swarm_sapo_skipped_steps", "Updates skipped by a guard, by reason.", ["reason"],
                               registry=r)
        self.gossip_delivery = Gauge("swarm_sapo_gossip_delivery_fraction", "Fraction of the rollouts named in "
                                     "other peers' manifests that gossip delivered before the deadline (last round).",
                                     registry=r)
        self.round_bytes = Gauge("swarm_sapo_round_bytes", "Rollout bytes sent + received in the last round.",
                                 registry=r)
        self.round_duration = Histogram("swarm_sapo_round_duration_seconds", "Round start to update applied.",
                                        buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300), registry=r)
        self.dht_get_duration = Histogram("swarm_sapo_dht_get_duration_seconds", "Manifest read latency.",
                                          buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5), registry=r)
        for p in RECEIVE_PATHS:
            self.received.labels(path=p)
        for d in DROP_REASONS:
            self.dropped.labels(reason=d)
        for reason in ALL_REJECT_REASONS:
            self.rejected.labels(reason=reason)
        for s in SKIP_REASONS:
            self.skipped.labels(reason=s)


class SapoStrategy(Strategy):
    """One round r:
      1. publish this node's sidecar address (DHT, small) and dial the sidecars others published;
      2. sample Q task items (seeded per peer and round), generate G completions each;
      3. sign each group, gossip it through the rollout sidecar (py-libp2p gossipsub, its
         own process), keep it for pulls, store a manifest of group ids in the DHT
         (`swarm/{run}/sapo/round/{r}`, subkey = our peer id; ids only, never rollouts);
      4. until the deadline (round start + --sapo-deadline-frac x round) collect rollouts of
         round r from gossip; then read the manifests and pull, over a hivemind stream from
         its publisher, every rollout named there that gossip did not bring (bounded by the
         end of the round); a dead or late peer costs at most that wait;
      5. re-score every external group with our verifier against the truth regenerated from
         (task, seed, index) (a question that does not match the triple is rejected), build
         exactly I local + up to J external groups (math.py), scale external negative
         advantages (default 0), take --sapo-ppo-epochs clipped GRPO steps; skip the step if all
         advantages are zero or the loss/gradients are non-finite."""

    name = "sapo"
    options = SapoOptions
    churn_profile = SAPO_PROFILE
    demo_profile = SAPO_DEMO

    def __init__(self, ctx):
        super().__init__(ctx)
        cfg, node = ctx.options, ctx.node
        self.task_names = tasks.parse_task_list(cfg.sapo_tasks)
        self.G, self.I, self.J = cfg.sapo_group_size, cfg.sapo_local_groups, cfg.sapo_external_groups
        self.Q = cfg.sapo_questions  # generated and published; the first I of them are trained on
        self.round_s = cfg.sapo_round_s
        self.m = SapoMetrics(ctx.metrics.registry, cfg.sapo_negative_scale)
        self.signer = Signer.from_identity_file(node.identity_path)
        if self.signer.peer_id != ctx.peer_id:
            raise RuntimeError("identity.key does not match this node's peer id")
        if cfg.sapo_hf_model:
            if not hf_available():
                raise RuntimeError("--sapo-hf-model needs transformers installed (pip install 'swarm-node[hf]')")
            self.policy: Any = HFPolicy(cfg.sapo_hf_model, ctx.trainer.device, cfg.sapo_max_new_tokens, node.lr)
        else:
            self.policy = BytePolicy(ctx.trainer.model, ctx.trainer.device, cfg.sapo_max_new_tokens)
        peer_seed = cfg.sapo_peer_seed or int(hashlib.sha256(ctx.peer_id.encode()).hexdigest()[:7], 16)
        self.peer_seed = peer_seed
        self.mine: dict[int, dict[str, SignedRollout]] = {}
        self.inbox: dict[int, dict[str, tuple[SignedRollout, str, float]]] = defaultdict(dict)
        self.trained_rounds: set[int] = set()
        self.gossip: GossipClient | None = None
        self.rounds_done = 0
        self.cumulative_reward = 0.0
        self.history: list[dict[str, Any]] = []
        self.totals: dict[str, int] = defaultdict(int)
        self._round_bytes = 0  # rollout bytes in and out during the current round
        self._per_sender: dict[tuple[int, str], int] = defaultdict(int)

    # ---- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        ctx = self.ctx
        await ctx.transport.add_handler(PULL, self._serve_pull, BytesValue, channel=CHANNEL)
        self.gossip = GossipClient(identity_path=ctx.node.identity_path, run_id=ctx.spec.run_id,
                                   host=ctx.node.host, announce_host=ctx.node.announce_host or self._own_ip(),
                                   on_message=self._on_gossip)
        self.gossip.start()

    def _own_ip(self) -> str | None:
        """The IP of our hivemind join address: the sidecar is reachable where the node is."""
        for m in self.ctx.peers.own_maddrs():
            if m.startswith("/ip4/"):
                return m.split("/")[2]
        return None

    async def stop(self) -> None:
        if self.gossip is not None:
            await self.gossip.stop()
        if isinstance(self.policy, HFPolicy) and self.policy.steps:
            out = self.ctx.node.state_dir / "hf_policy"  # the trained policy; the node's checkpoint holds the byte model
            try:
                self.policy.save(out)
                self.ctx.log.info("saved the trained HF policy (%d steps) to %s", self.policy.steps, out)
            except Exception as e:  # a full disk must not turn a clean stop into a crash
                self.ctx.log.warning("could not save the HF policy to %s: %s", out, e)

    def status(self) -> dict[str, Any]:
        return dict(self.ctx.progress.last_round)

    def checkpoint_state(self) -> dict[str, Any]:
        # a byte policy is the trainer's model, saved with the trainer; an HF policy is not
        state: dict[str, Any] = {"rounds_done": self.rounds_done, "cumulative_reward": self.cumulative_reward}
        if isinstance(self.policy, HFPolicy):
            state["hf_policy"] = self.policy.state()
        return state

    def restore_checkpoint_state(self, state: dict[str, Any]) -> None:
        saved_hf = state.get("hf_policy")
        if (saved_hf is not None) != isinstance(self.policy, HFPolicy):
            raise ValueError("the checkpoint's policy kind (HF or byte) differs from this run's")
        if saved_hf is not None:
            self.policy.load_state(saved_hf)
        self.rounds_done = int(state.get("rounds_done", 0))
        self.cumulative_reward = float(state.get("cumulative_reward", 0.0))

    def page_panel(self) -> PagePanel:
        recent = self.history[-12:]
        used = sum(int(h["used"]) for h in self.history)
        return PagePanel(
            kind="rollouts", title="SAPO rollout sharing",
            facts=[("rounds", str(self.rounds_done)), ("cumulative reward", f"{self.cumulative_reward:.1f}"),
                   ("external rollouts used", f"{used} over {len(self.history)} rounds this run"),
                   ("policy", str(self.policy.describe())[:80] if self.policy else "not loaded")],
            columns=["round", "reward/rollout", "published", "gossip in", "pulled", "external used", "outcome"],
            rows=[[h["round"], round(float(h["reward_mean"]), 3), h["published"], h["received_gossip"],
                   h["received_pull"], h["used"], h["outcome"]] for h in recent])

    def summary(self) -> dict[str, Any]:
        return {"rounds": self.rounds_done, "cumulative_reward": self.cumulative_reward, "totals": dict(self.totals),
                "policy": self.policy.describe(), "policy_steps": self._policy_steps(),
                "history": self.history, "gossip_ready_after_s": self.gossip.ready_after_s if self.gossip else None,
                "gossip_restarts": self.gossip.restarts if self.gossip else 0}

    @classmethod
    def demo_lines(cls, summaries: list[dict], baseline: dict | None) -> list[str]:
        def cumulative(s: dict) -> tuple[int, float, int]:
            stats = s.get("strategy_stats") or {}
            used = int((stats.get("totals") or {}).get("used", 0))
            return int(stats.get("rounds") or 0), float(stats.get("cumulative_reward") or 0.0), used

        mine = [cumulative(s) for s in summaries]
        if not mine:
            return []
        rounds = sum(r for r, _, _ in mine) / len(mine)
        line = (f"per swarm peer: {rounds:.0f} rounds, cumulative reward {sum(c for _, c, _ in mine) / len(mine):.1f}, "
                f"{sum(u for _, _, u in mine) / len(mine):.0f} external groups trained on")
        if baseline is not None:
            b_rounds, b_cum, _ = cumulative(baseline)
            line += f"; the baseline (sharing nothing): {b_rounds} rounds, cumulative reward {b_cum:.1f}"
        return [line]

    # ---- receiving -------------------------------------------------------------------
    def _now_round(self) -> int:
        return round_of(swarm_time(), self.round_s)

    def _accept(self, blob: bytes, from_peer: str, path: str) -> SignedRollout | None:
        try:
            sr = decode_rollout(blob, run_id=self.ctx.spec.run_id, group_size=self.G, current_round=self._now_round(),
                                max_round_lag=1, from_peer=from_peer, known_task=lambda t: t in self.task_names)
        except RolloutRejected as e:
            self.m.rejected.labels(reason=e.reason).inc()
            self.totals[f"rejected_{e.reason}"] += 1
            self.ctx.log.debug("rejected a rollout from %s (%s)", from_peer[-8:], e)
            return None
        box = self.inbox[sr.group.round]
        if sr.group_id in box or sr.group.sender == self.ctx.peer_id or len(box) >= MAX_INBOX_PER_ROUND:
            return None
        per_sender = self._per_sender[(sr.group.round, sr.group.sender)]
        if per_sender >= MAX_PULL_IDS:  # one peer cannot crowd the others out of a round
            return None
        self._per_sender[(sr.group.round, sr.group.sender)] = per_sender + 1
        if sr.group.round in self.trained_rounds:
            self.m.late.inc()
            return None
        box[sr.group_id] = (sr, path, time.monotonic())
        self.m.received.labels(path=path).inc()
        self.totals[f"received_{path}"] += 1
        return sr

    def _on_gossip(self, from_peer: str, data: bytes) -> None:
        self.ctx.metrics.net_rx_bytes.labels(channel=CHANNEL).inc(len(data))
        self._round_bytes += len(data)
        self._accept(data, from_peer, "gossip")

    async def _serve_pull(self, requests: AsyncIterator[BytesValue], caller: str) -> AsyncIterator[BytesValue]:
        req = await first_message(requests, 5.0)
        await drain(requests, 5.0)
        if req is None:
            return
        try:
            rnd, ids = msgpack.unpackb(req.value, raw=False)
            if type(rnd) is not int or not isinstance(ids, list):
                return
        except Exception:
            self.ctx.metrics.rejected_messages.labels(reason="malformed").inc()
            return
        have = self.mine.get(rnd, {})
        for gid in ids[:MAX_PULL_IDS]:
            sr = have.get(gid) if type(gid) is str else None
            if sr is not None:
                yield BytesValue(value=sr.wire)

    async def _pull(self, peer: str, rnd: int, ids: list[str], timeout_s: float) -> int:
        got = 0
        req = BytesValue(value=msgpack.packb([rnd, ids[:MAX_PULL_IDS]], use_bin_type=True))
        try:
            async for reply in self.ctx.transport.call(peer, PULL, [req], BytesValue, timeout_s=timeout_s,
                                                       channel=CHANNEL):
                self._round_bytes += len(reply.value)
                if self._accept(reply.value, peer, "pull") is not None:
                    got += 1
        except PeerUnavailable as e:
            self.ctx.log.info("pull from %s failed: %s", peer[-8:], e)
        return got

    # ---- DHT -------------------------------------------------------------------------
    async def _exchange_addresses(self) -> None:
        records, run = self.ctx.records, self.ctx.spec.run_id
        if self.gossip is None or not self.gossip.listen:
            return
        await records.publish(gossip_addrs_key(run), encode_gossip_addrs(self.ctx.peer_id, self.gossip.listen),
                              ttl_s=max(4 * self.round_s, 60))
        found = await records.read(gossip_addrs_key(run), lambda v, s: decode_gossip_addrs(v, subkey=s),
                                   skip_own=True)
        maddrs = [m for e in found.values() for m in e.record]
        if maddrs:
            self.gossip.connect(maddrs)

    async def _read_manifests(self, rnd: int) -> dict[str, Manifest]:
        t0 = time.perf_counter()
        found = await self.ctx.records.read(manifest_key(self.ctx.spec.run_id, rnd),
                                            lambda v, s: Manifest.from_wire(v, subkey=s, round_=rnd), skip_own=True)
        self.m.dht_get_duration.observe(time.perf_counter() - t0)
        return {peer: e.record for peer, e in found.items()}

    # ---- the round -------------------------------------------------------------------
    async def run(self) -> str | None:
        ctx, cfg, node = self.ctx, self.ctx.options, self.ctx.node
        if not await self.wait_for_peers():
            return None
        if self._policy_steps() == 0 and cfg.sapo_warmstart_steps:  # not again after a resume
            await ctx.compute(self._warm_start, cfg.sapo_warmstart_steps)
        if self.gossip is not None and not await self.gossip.wait_ready(30.0):
            ctx.log.warning("rollout sidecar not up after 30s: sharing by pull only until it is")
        ctx.progress.state = "online"  # no shared replica to agree with: a peer is ready once it can generate
        budget = round_budget(node.max_steps, self._policy_steps(), cfg.sapo_ppo_epochs)
        rounds_here = skipped_here = 0
        last = -1
        while not ctx.should_stop():
            rnd = self._now_round()
            if rnd <= last:  # wait for the next round to begin (bounded by one round)
                await asyncio.sleep(min(0.5, max(0.01, round_start(last + 1, self.round_s) - swarm_time())))
                continue
            if last >= 0 and rnd > last + 1:
                ctx.log.info("skipped rounds %d..%d (this peer was slower than the round)", last + 1, rnd - 1)
            last = rnd
            outcome = await self._round(rnd)
            self.rounds_done += 1
            rounds_here += 1
            skipped_here += outcome != "ok"
            if cfg.sapo_rounds and self.rounds_done >= cfg.sapo_rounds:
                return f"finished --sapo-rounds {cfg.sapo_rounds}"
            if node.max_steps and self._policy_steps() >= node.max_steps:
                return None  # the daemon reports reaching --max-steps
            if budget is not None and rounds_here >= budget:
                return (f"spent the rounds of --max-steps {node.max_steps} ({budget} rounds of {cfg.sapo_ppo_epochs} "
                        f"steps; {skipped_here} of them trained nothing)")
        return None

    def _warm_start(self, steps: int) -> None:
        rng = random.Random(f"warm:{self.peer_seed}")
        tr = self.ctx.trainer
        for _ in range(steps):
            prompts = [tasks.make_item(rng.choice(self.task_names), self.ctx.node.seed, rng.randrange(1 << 30)).question
                       for _ in range(16)]
            logp, mask = self.policy.format_batch(prompts, rng)
            loss = -(logp * mask).sum() / mask.sum()
            if isinstance(self.policy, HFPolicy):  # its own optimizer; a non-finite step is skipped
                self.policy.apply(loss)
                continue
            grads = torch.autograd.grad(loss, tr.parameters_list())
            tr.apply_gradients(list(grads))

    def current_step(self) -> int:
        return self._policy_steps()

    def _policy_steps(self) -> int:
        """Optimizer steps applied to the policy (an HF policy has its own optimizer: the
        trainer's step, which the byte policy uses, stays 0 then)."""
        return self.policy.steps if isinstance(self.policy, HFPolicy) else self.ctx.trainer.step

    def _sample_items(self, rnd: int) -> list[tasks.TaskItem]:
        # Keyed by this peer's count of rounds (not the wall-clock round) so that runs with the
        # same seeds draw the same questions whatever time they start: benches compare them.
        rng = random.Random(f"{self.ctx.node.seed}:{self.peer_seed}:{self.rounds_done}")
        items = [tasks.make_item(rng.choice(self.task_names), self.ctx.node.seed, rng.randrange(1 << 30))
                 for _ in range(self.Q)]
        for it in items:
            self.policy.check_prompt(it.question)
        return items

    def _generate(self, items: list[tasks.TaskItem], rnd: int) -> list[list[str]]:
        gen = torch.Generator().manual_seed((self.peer_seed * 1_000_003 + self.rounds_done) % (2**63))
        return self.policy.generate([it.question for it in items], self.G, temperature=self.ctx.options.sapo_temperature,
                                    generator=gen)

    def _score_external(self, sr: SignedRollout) -> ScoredGroup | None:
        scored = score_external(sr, format_reward=self.ctx.options.sapo_format_reward)
        if scored is None:
            self.m.rejected.labels(reason="bad_task").inc()
            self.totals["rejected_bad_task"] += 1
        return scored

    async def _round(self, rnd: int) -> str:
        """One round; returns its outcome ("ok", or why the policy did not train)."""
        ctx, cfg = self.ctx, self.ctx.options
        t_start = time.monotonic()
        self._round_bytes = 0
        deadline_dht = round_start(rnd, self.round_s) + cfg.sapo_deadline_frac * self.round_s
        end_dht = round_start(rnd + 1, self.round_s) - 0.05 * self.round_s  # leave time to train
        await self._exchange_addresses()

        # 2-3. generate, sign, publish, manifest
        items = self._sample_items(rnd)
        completions = await ctx.compute(self._generate, items, rnd)
        fr = cfg.sapo_format_reward
        local: list[ScoredGroup] = []
        mine: dict[str, SignedRollout] = {}
        meta = {"model": self.policy.describe()}
        for it, comps in zip(items, completions):
            sr = encode_rollout(RolloutGroup(ctx.spec.run_id, rnd, ctx.peer_id, it.task, it.seed, it.index,
                                             it.question, tuple(comps), meta), self.signer)
            mine[sr.group_id] = sr
            rewards = tuple(tasks.score(it, c, format_reward=fr) for c in comps)
            local.append(ScoredGroup(ctx.peer_id, sr.group_id, (it.task, it.seed, it.index), it.question,
                                     tuple(comps), rewards, False))
        self.mine[rnd] = mine
        # A silo peer (J = 0) still shares: others may use its rollouts.
        for sr in mine.values():
            if self.gossip is not None and self.gossip.publish(sr.wire):
                ctx.metrics.net_tx_bytes.labels(channel=CHANNEL).inc(len(sr.wire))
                self._round_bytes += len(sr.wire)
        self.m.published.inc(len(mine))
        self.totals["published"] += len(mine)
        await ctx.records.publish(manifest_key(ctx.spec.run_id, rnd), Manifest(ctx.peer_id, rnd, tuple(mine)).to_wire(),
                                  ttl_s=3 * self.round_s)

        # 4. wait for gossip until the deadline, then pull what manifests name and gossip missed
        delivery = None
        if self.J > 0:
            await asyncio.sleep(max(0.0, deadline_dht - swarm_time()))
            manifests = await self._read_manifests(rnd)
            named = {(p, gid) for p, mf in manifests.items() for gid in mf.group_ids}
            box = self.inbox[rnd]
            by_gossip = sum(1 for p, gid in named if gid in box and box[gid][1] == "gossip")
            delivery = by_gossip / len(named) if named else None
            missing: dict[str, list[str]] = defaultdict(list)
            for p, gid in named:
                if gid not in box:
                    missing[p].append(gid)
            budget = max(0.5, end_dht - swarm_time())
            if missing:
                await asyncio.gather(*(self._pull(p, rnd, ids, budget) for p, ids in missing.items()))
        self.trained_rounds.add(rnd)

        # 5. score, build, update
        external = [s for s in (self._score_external(sr) for sr, _, _ in self.inbox.get(rnd, {}).values()) if s]
        rng = random.Random(f"build:{self.peer_seed}:{rnd}")
        ts = build_training_set(local, external, my_peer_id=ctx.peer_id, num_local=self.I, num_external=self.J,
                                rng=rng, local_select=cfg.sapo_local_select)
        adv = training_advantages(ts, negative_scale=cfg.sapo_negative_scale)
        outcome = await self._update(ts, adv)

        # metrics and progress
        local_reward = sum(sum(g.rewards) for g in local)
        self.cumulative_reward += local_reward
        self.m.cumulative_reward.set(self.cumulative_reward)
        self.m.local_reward.set(local_reward / max(1, self.Q * self.G))
        self.m.round.set(rnd)
        self.m.used.inc(ts.external_used)
        for reason, n in (("zero_variance", ts.dropped_zero_variance), ("shortfall", ts.shortfall),
                          ("own", ts.dropped_own), ("duplicate", ts.dropped_duplicate)):
            self.m.dropped.labels(reason=reason).inc(n)
            self.totals[f"dropped_{reason}"] += n
        self.totals["used"] += ts.external_used
        if ts.external_used == 0:
            self.m.rounds_without_external.inc()
        senders = {g.sender for g in ts.groups if g.external} | {sr.group.sender for sr, _, _ in self.inbox[rnd].values()}
        self.m.peers_seen.set(len(senders))
        if delivery is not None:
            self.m.gossip_delivery.set(delivery)
        self.m.round_bytes.set(self._round_bytes)
        duration = time.monotonic() - t_start
        self.m.round_duration.observe(duration)
        received = self.inbox[rnd]
        row = {"round": rnd, "reward": local_reward, "reward_mean": local_reward / max(1, self.Q * self.G),
               "published": len(mine), "received_gossip": sum(1 for v in received.values() if v[1] == "gossip"),
               "received_pull": sum(1 for v in received.values() if v[1] == "pull"), "used": ts.external_used,
               "dropped_zero_variance": ts.dropped_zero_variance, "shortfall": ts.shortfall,
               "gossip_delivery": delivery, "bytes": self._round_bytes, "duration_s": round(duration, 3),
               "outcome": outcome, "senders": len(senders)}
        self.history.append(row)
        ctx.progress.last_round = {"outcome": outcome, "duration_s": duration, "group_size": len(senders) + 1,
                                   "sapo_round": rnd, "reward_mean": row["reward_mean"], "external_used": ts.external_used,
                                   "received": len(received), "cumulative_reward": self.cumulative_reward}
        ctx.log.info("sapo round %d: reward %.2f | external used %d/%d (gossip %d, pull %d) | %s | %.1fs", rnd,
                     row["reward_mean"], ts.external_used, self.J, row["received_gossip"], row["received_pull"],
                     outcome, duration)
        for old in [r for r in self.mine if r < rnd - ROUNDS_KEPT]:
            self.mine.pop(old, None)
        for old in [r for r in self.inbox if r < rnd - ROUNDS_KEPT]:
            self.inbox.pop(old, None)
        self.trained_rounds = {r for r in self.trained_rounds if r >= rnd - ROUNDS_KEPT}
        self._per_sender = defaultdict(int, {k: v for k, v in self._per_sender.items() if k[0] >= rnd - ROUNDS_KEPT})
        del self.history[:-HISTORY_KEPT]
        return outcome

    async def _update(self, ts, adv: torch.Tensor) -> str:
        """GRPO epochs on the training set; returns the round outcome."""
        if not ts.groups or all_zero(adv):
            self.m.skipped.labels(reason="all_zero").inc()
            return "skipped_all_zero"
        prompts = [g.prompt for g in ts.groups for _ in g.completions]
        comps = [c for g in ts.groups for c in g.completions]
        flat_adv = adv.reshape(-1)
        keep = flat_adv != 0  # zero-advantage sequences add nothing: do not spend compute on them
        prompts = [p for p, k in zip(prompts, keep.tolist()) if k]
        comps = [c for c, k in zip(comps, keep.tolist()) if k]
        flat_adv = flat_adv[keep]
        ok = await self.ctx.compute(self._grpo_epochs, prompts, comps, flat_adv)
        if not ok:
            self.m.skipped.labels(reason="non_finite").inc()
            return "skipped_non_finite"
        if isinstance(self.policy, HFPolicy):
            # the node's step hook evaluates and checkpoints the trainer's byte model, which an
            # HF peer never trains (the compute thread keeps the training heartbeat)
            return "ok"
        await self.ctx.on_step()
        return "ok"

    def _grpo_epochs(self, prompts: list[str], comps: list[str], adv: torch.Tensor) -> bool:
        from swarm_node.train.trainer import NonFiniteError

        tr = self.ctx.trainer
        t0 = time.perf_counter()
        with torch.no_grad():
            old, _ = self.policy.token_logprobs(prompts, comps)
        adv = adv.to(old.device)
        for _ in range(self.ctx.options.sapo_ppo_epochs):
            new, mask = self.policy.token_logprobs(prompts, comps)
            loss = grpo_loss(new, old, adv, mask)
            if not math.isfinite(float(loss.detach())):
                return False
            if isinstance(self.policy, HFPolicy):
                if not self.policy.apply(loss):  # refuses non-finite gradients, changes nothing then
                    return False
                self.ctx.progress.train_loss = float(loss.detach())
                continue
            grads = torch.autograd.grad(loss, tr.parameters_list(), allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(tr.parameters_list(), grads)]
            if not finite_grads(grads):
                return False
            try:
                tr.apply_gradients(grads)  # clips the global norm at 1.0, refuses non-finite
            except NonFiniteError:
                return False
            self.record_step(len(prompts), float(loss), time.perf_counter() - t0)
        return True
