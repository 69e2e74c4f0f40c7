"""The node: startup -> run -> drain, on one uvloop event loop plus one compute thread.

Order of startup (each step logs; a failure exits with a documented code):
  1. lock the state dir, load or create the identity (0600), build model/trainer, resume
  2. start p2pd + in-process DHT; with --discover, take the LAN peers the mDNS sidecar finds
     as initial peers; dial initial peers with backoff (fatal only with --join-timeout-s);
     refuse a mismatched run spec (exit 2)
  3. start the strategy, health HTTP, gRPC control; print the join line; write node.json
Run: heartbeat (announce + read membership), isolation watchdog, strategy loop, status line.
Drain (SIGTERM/SIGINT/gRPC Drain/--max-steps): stop after the current step (bounded by
--shutdown-grace-s), announce LEAVING, checkpoint, stop servers and p2pd, exit 0. A second
SIGINT exits at once (130).
Threads: the event loop owns P2P, the DHT node, membership and strategy rounds; all tensor
work runs on the single "compute" thread; health HTTP and gRPC run in their own threads
and only read immutable `NodeStatus` snapshots rebuilt once a second on the loop.
"""
from __future__ import annotations

import asyncio
import fcntl
import functools
import json
import logging
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from swarm_node import __version__
from swarm_node.config import NodeConfig
from swarm_node.control import ControlServer, DrainOutcome, write_token
from swarm_node.train.data import DataError
from swarm_node.train.device import (DeviceError, SpareGpuGate, apply_memory_cap, describe_device, device_memory_bytes,
                                     gpu_readings, make_probe, resolve_device)
from swarm_node.health import Heartbeat, HealthServer, make_live_fn
from swarm_node.identity import ensure_identity
from swarm_node.membership import Membership, SpecMismatch
from swarm_node.metrics import NodeMetrics
from swarm_node.discovery import DiscoveryClient
from swarm_node.network import IsolationWatchdog, NetworkSettings, SwarmNetwork, peer_ids_of
from swarm_node.page.book import PageBook, PageInputs
from swarm_node.preflight import raise_nofile_limit
from swarm_node.processes import install_p2pd_reaper, reap_children
from swarm_node.status import NodeStatus, PeerView, Phase
from swarm_node.train.export import write_run_record
from swarm_node.train.models import ModelError, load_model
from swarm_node.train.tokens import load_dataset
from swarm_node.train.trainer import LocalTrainer, TrainConfig
from swarm_node.protocol.codec import REJECT_REASONS
from swarm_node.protocol.records import PeerRecord, RecordStore
from swarm_node.protocol.transport import Transport
from swarm_node.strategies import registry
from swarm_node.strategies.base import NodeSettings, Progress, Strategy, StrategyContext

log = logging.getLogger("swarm_node")

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_STARTUP, EXIT_JOIN, EXIT_INTERRUPTED, EXIT_TEMPFAIL = 0, 1, 2, 3, 4, 130, 75
NODE_REJECT_REASONS = (*REJECT_REASONS, "spec_mismatch", "bad_record", "stale_step", "bad_advert", "forged_record",
                       "clipped_contribution", "non_finite_contribution")
JOIN_COMMAND = "swarm-node join --initial-peers "
JOIN_LINE_PREFIX = "To join this swarm: " + JOIN_COMMAND
TASK_STOP_S = 5.0  # after cancel(), how long run() waits for its tasks before shutting down anyway


class NodeExit(Exception):
    """Stop the node with an exit code and a message for the person running it."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


class TrainingLoopEnded(NodeExit):
    """The strategy's loop ended while nobody asked the node to stop: a bug, never a normal end."""

    def __init__(self, message: str):
        super().__init__(EXIT_FAILED, message)


@dataclass
class Addresses:
    join_maddrs: list[str]
    http: str | None
    control: str | None


class Node:
    def __init__(self, config: NodeConfig):
        self.config = config
        self.spec = config.run_spec()
        self.metrics = NodeMetrics(config.strategy, NODE_REJECT_REASONS)
        self.progress = Progress()
        self.loop_beat, self.train_beat = Heartbeat(), Heartbeat()
        self.started_at = time.monotonic()
        self.phase = Phase.STARTING
        self.stop_requested = False
        self.stop_reason = ""
        self.stop_at_step: int | None = None  # `swarm-node drain --at-step N`
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")
        self._compute_busy_since: float | None = None
        self._snapshot: NodeStatus | None = None
        self._lock_file = None
        self.resumed_from: int | None = None
        self.history: list[list] = []  # [step, train_loss, val_loss | None, seconds since start]
        self._val_step: int | None = None
        self._val_hash: str | None = None
        self.net: SwarmNetwork | None = None
        self.membership: Membership | None = None
        self.watchdog: IsolationWatchdog | None = None
        # --initial-peers, plus (with --discover) the LAN peers found at startup
        self.initial_peers: list[str] = list(config.initial_peers)
        self.discovery: DiscoveryClient | None = None
        self._dial_tasks: set[asyncio.Task] = set()
        self.strategy: Strategy | None = None
        self.transport: Transport | None = None
        self.health: HealthServer | None = None
        self.page: PageBook | None = None
        self._panel_failed = self._page_failed = False
        self.control: ControlServer | None = None
        self.addresses = Addresses([], None, None)
        self.trainer: LocalTrainer | None = None
        self.device: torch.device | None = None
        self.gate: SpareGpuGate | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------ compute thread
    async def compute(self, fn, *args) -> Any:
        """Run blocking tensor work on the single compute thread (keeps device order)."""
        loop = asyncio.get_running_loop()

        def timed():
            self._compute_busy_since = time.monotonic()
            try:
                return fn(*args)
            finally:
                self._compute_busy_since = None
                self.train_beat.beat()

        return await loop.run_in_executor(self._executor, timed)

    # ------------------------------------------------------------------ startup
    async def start(self) -> None:
        cfg = self.config
        self._loop = asyncio.get_running_loop()
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        self._lock_state_dir()
        raise_nofile_limit()  # p2pd and the DHT hold many sockets; Linux defaults to 1024
        (cfg.state_dir / "summary.json").unlink(missing_ok=True)  # describes a previous run
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        try:
            self.device = resolve_device(cfg.device)
            apply_memory_cap(self.device, cfg.memory_fraction)
        except DeviceError as e:
            raise NodeExit(EXIT_STARTUP, str(e)) from None
        identity = ensure_identity(cfg.state_dir / "identity.key")
        write_run_record(cfg.state_dir, cfg)  # what `swarm-node export` rebuilds the model from
        # the model first: a brought one (--model) decides how the text is tokenized
        try:
            model = await self.compute(functools.partial(
                load_model, cfg.model, seed=cfg.seed, seq_len=cfg.seq_len, n_layer=cfg.n_layer, n_head=cfg.n_head,
                d_model=cfg.d_model))
        except ModelError as e:
            raise NodeExit(EXIT_CONFIG, f"--model: {e}") from None
        strategy_cls = registry.load(cfg.strategy)
        options = strategy_cls.options_of(cfg)
        why_not = strategy_cls.check_model(model.module, options)
        if why_not:
            raise NodeExit(EXIT_CONFIG, f"--model: {cfg.strategy} cannot train this model: {why_not}")
        try:
            dataset = await self.compute(functools.partial(
                load_dataset, cfg.data, max_bytes=cfg.data_max_bytes, tokenizer=model.tokenizer,
                tokenizer_fingerprint=model.tokenizer_fingerprint, vocab_size=model.vocab_size,
                cache_dir=cfg.state_dir / "token-cache", text_field=cfg.text_field, token_dtype=cfg.token_dtype,
                split_seed=cfg.seed, seq_len=cfg.seq_len))
        except DataError as e:
            raise NodeExit(EXIT_CONFIG, f"training data: {e}") from None
        self.spec = self.spec.model_copy(update={"data_fingerprint": dataset.fingerprint,
                                                 **model.identity.spec_fields()})
        train_cfg = TrainConfig(lr=cfg.lr, batch_size=cfg.batch_size, seed=cfg.seed, lr_schedule=cfg.lr_schedule,
                                warmup_steps=cfg.lr_warmup_steps, total_steps=cfg.max_steps,
                                data_shards=cfg.data_shards, data_rank=cfg.data_rank, precision=cfg.precision,
                                grad_accum=cfg.grad_accum)
        self.trainer = await self.compute(functools.partial(
            LocalTrainer, model.module, dataset, train_cfg, device=self.device, peer=identity.peer_id))
        self._resume()
        self.progress.follow(lambda: self.trainer.step)  # the strategy's, once it exists
        if cfg.spare_gpu and self.device.type == "cuda":
            self.gate = SpareGpuGate(make_probe(), self.device.index or 0)

        install_p2pd_reaper()
        settings = NetworkSettings(host=cfg.host, port=cfg.port, announce_host=cfg.announce_host,
                                   identity_path=identity.path, startup_timeout_s=cfg.startup_timeout_s)
        try:
            self.net = await SwarmNetwork.create(settings, self.metrics)
        except ValueError as e:
            raise NodeExit(EXIT_CONFIG, str(e)) from None
        except Exception as e:
            raise NodeExit(EXIT_STARTUP, f"could not start the p2p daemon: {e}") from None
        self.addresses.join_maddrs = await self.net.join_maddrs()
        await self._discover(identity.path)
        self.membership = Membership(self.net, self.spec, self.metrics, cfg.ttl_s, self._make_record)
        self.watchdog = IsolationWatchdog(self.net, self.initial_peers, self.membership.known_maddrs,
                                          cfg.watchdog_interval_s, enabled=cfg.watchdog)
        await self._join()
        try:
            await self.membership.check_spec(trusted=peer_ids_of(self.initial_peers))
        except SpecMismatch as e:
            raise NodeExit(EXIT_CONFIG, str(e)) from None

        self.transport = Transport(self.net.p2p, self.spec.run_id, self._count_bytes)
        self.strategy = strategy_cls(StrategyContext(
            node=NodeSettings.of(cfg), options=options, spec=self.spec,
            peer_id=identity.peer_id, transport=self.transport,
            peers=self.membership, metrics=self.metrics, trainer=self.trainer, compute=self.compute,
            progress=self.progress, should_stop=self._should_stop, on_step=self._on_step,
            log=logging.getLogger(f"swarm_node.strategy.{cfg.strategy}"),
            records=RecordStore(self.net, identity.peer_id,
                                lambda: self.metrics.rejected_messages.labels(reason="bad_record").inc())))
        self.progress.follow(self.strategy.current_step)
        self._restore_strategy_state()
        await self.strategy.start()
        self.metrics.info.info({"version": __version__, "strategy": cfg.strategy, "role": self.strategy.role,
                                "device_type": self.device.type})
        await self.membership.announce("joining")
        await self.membership.refresh()
        self._start_servers()
        self._print_banner(identity.peer_id)

    def _lock_state_dir(self) -> None:
        path = self.config.state_dir / "node.lock"
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise NodeExit(EXIT_CONFIG, f"another swarm-node is already using {self.config.state_dir} "
                                        "(one state dir, and so one identity, per node)") from None
        self._lock_file = f

    def _resume(self) -> None:
        ckpt = self.config.state_dir / "checkpoint.pt"
        if self.config.resume != "auto" or not ckpt.exists():
            return
        try:
            self.resumed_from = self.trainer.load_checkpoint(ckpt)
        except Exception as e:
            log.warning("could not resume from %s (%s); starting fresh", ckpt, e)
            self.metrics.recoveries.labels(kind="resume", outcome="failed").inc()
            return
        self.metrics.recoveries.labels(kind="resume", outcome="ok").inc()
        log.info("resumed from %s at step %d", ckpt, self.resumed_from)

    async def _save_checkpoint(self) -> None:
        """The trainer's state and the strategy's, together, on the compute thread (where the
        strategy changes its state too, so the two are consistent)."""
        def save() -> None:
            state = self.strategy.checkpoint_state() if self.strategy is not None else None
            tagged = {"name": self.config.strategy, "state": state} if state is not None else None
            self.trainer.save_checkpoint(self.config.state_dir / "checkpoint.pt", tagged)

        await self.compute(save)

    def _restore_strategy_state(self) -> None:
        saved = self.trainer.resumed_strategy_state
        if not saved or saved.get("name") != self.config.strategy:
            return
        try:
            self.strategy.restore_checkpoint_state(saved["state"])
            log.info("resumed the %s state from the checkpoint", self.config.strategy)
        except Exception as e:  # a corrupt or foreign entry: the strategy starts its own state afresh
            log.warning("could not restore the %s state from the checkpoint (%s); starting it afresh",
                        self.config.strategy, e)
            self.metrics.recoveries.labels(kind="resume", outcome="failed").inc()

    async def _join(self) -> None:
        cfg = self.config
        if not self.initial_peers:
            log.info("started a new swarm (run '%s')", cfg.run_id)
            return
        deadline = time.monotonic() + cfg.join_timeout_s if cfg.join_timeout_s else None
        delay = 1.0
        while True:
            if await self.watchdog.attempt():
                log.info("joined the swarm: %d peers in the routing table", self.net.routing_table_size())
                return
            if deadline is not None and time.monotonic() >= deadline:
                raise NodeExit(EXIT_JOIN, f"none of the initial peers answered within {cfg.join_timeout_s:.0f}s: "
                                          + ", ".join(self.initial_peers))
            if deadline is None:
                log.warning("no initial peer answered yet; starting alone and retrying in the background "
                            "(peers: %s)", ", ".join(self.initial_peers))
                return
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 10.0)

    async def _discover(self, identity_path) -> None:
        """--discover: advertise this node on the LAN by mDNS (sidecar process). With neither
        --initial-peers nor --new-swarm, wait (bounded) for peers of this run and use them as
        initial peers; if none answers, this node starts the swarm. Peers found later are
        dialled as they appear. --new-swarm only advertises."""
        cfg = self.config
        if not cfg.discover:
            return
        maddrs = [m for m in self.addresses.join_maddrs if m.startswith("/ip4/")]
        if not maddrs:
            log.warning("--discover: no IPv4 join address to advertise (%s); LAN discovery is off",
                        self.addresses.join_maddrs)
            return
        self.discovery = DiscoveryClient(
            identity_path=identity_path, run_id=cfg.run_id, maddrs=maddrs, browse=not cfg.new_swarm,
            on_peer=self._dial_discovered,
            on_reject=lambda reason: self.metrics.rejected_messages.labels(reason="bad_advert").inc())
        self.discovery.start()
        if cfg.initial_peers or cfg.new_swarm:
            self.discovery.deliver_later = True
            return
        found = await self.discovery.wait_for_peers(cfg.discover_timeout_s)
        if found:
            d = self.discovery
            log.info("mDNS discovery: found %d peer(s) of run '%s' on the LAN in %.1fs (sidecar up after %.1fs)",
                     len(d.peers), cfg.run_id, d.first_peer_after_s, d.ready_after_s or 0.0)
            self.initial_peers.extend(found)
        else:
            log.info("mDNS discovery: no peer of run '%s' answered within %.0fs: starting a new swarm "
                     "(still advertising)", cfg.run_id, cfg.discover_timeout_s)

    def _dial_discovered(self, peer_id: str, maddrs: list[str]) -> None:
        if self.net is None or self.stop_requested:
            return
        task = asyncio.get_running_loop().create_task(self.net.connect_peers(maddrs), name=f"dial {peer_id[:8]}")
        self._dial_tasks.add(task)
        task.add_done_callback(self._dial_tasks.discard)

    def _start_servers(self) -> None:
        cfg = self.config
        if cfg.metrics_addr != "off":
            host, _, port = cfg.metrics_addr.rpartition(":")
            self.page = PageBook(started_unix=time.time() - (time.monotonic() - self.started_at),
                                 state_dir=cfg.state_dir, ttl_s=cfg.ttl_s)
            self.health = HealthServer(host, int(port), metrics=self.metrics, status_fn=self.status,
                                       live_fn=self._live, ready_fn=self._ready, page_fn=self.page.state)
            try:
                h, p = self.health.start()
            except OSError as e:
                raise NodeExit(EXIT_STARTUP, f"cannot serve metrics on {cfg.metrics_addr}: {e} "
                                             "(use --metrics-addr 127.0.0.1:0 for any free port)") from None
            self.addresses.http = f"{h}:{p}"
        self.control = ControlServer(cfg.control_addr, status_fn=self.status, drain_fn=self._drain_from_thread,
                                     token=write_token(cfg.state_dir))
        try:
            self.addresses.control = self.control.start()
        except OSError as e:
            raise NodeExit(EXIT_STARTUP, f"cannot serve the control API on {cfg.control_addr}: {e}") from None
        self._write_node_file()

    def _write_node_file(self) -> None:
        info = {"pid": os.getpid(), "peer_id": self.net.peer_id.to_base58(), "run_id": self.spec.run_id,
                "join_maddrs": self.addresses.join_maddrs, "http": self.addresses.http,
                "control": self.addresses.control, "version": __version__}
        path = self.config.state_dir / "node.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(info, indent=2))
        os.replace(tmp, path)

    def _print_banner(self, peer_id: str) -> None:
        cfg = self.config
        lines = [f"swarm-node {__version__} | peer {peer_id} | run '{cfg.run_id}' | strategy {cfg.strategy}"]
        if self.addresses.join_maddrs:
            lines.append(JOIN_LINE_PREFIX + self.addresses.join_maddrs[0])
        arch = f"{self.spec.arch}, " if self.spec.arch else ""  # a model brought with --model
        lines.append(f"device: {describe_device(self.device)} | model: {arch}"
                     f"{sum(p.numel() for p in self.trainer.parameters_list()) / 1e6:.2f}M params")
        if self.addresses.http:
            h = self.addresses.http
            lines.append(f"health: http://{h}/readyz  metrics: http://{h}/metrics  status: http://{h}/status")
        lines.append(f"control: {self.addresses.control} | state dir: {cfg.state_dir}"
                     + (f" | resumed at step {self.resumed_from}" if self.resumed_from is not None else ""))
        # stdout, unbuffered, one line each: scripts and tests parse the join line
        for line in lines:
            print(line, flush=True)

    # ------------------------------------------------------------------ records & status
    def _make_record(self, state: str) -> PeerRecord:
        return PeerRecord(peer_id=self.net.peer_id.to_base58(), state=state, spec_hash=self.spec.digest(),
                          strategy=self.config.strategy, role=self.strategy.role if self.strategy else "trainer",
                          device=self.device.type if self.device else "cpu", step=self.trainer.step,
                          samples_per_s=round(self.progress.samples_per_s, 3), software=__version__,
                          maddrs=tuple(self.addresses.join_maddrs))

    def _count_bytes(self, direction: str, channel: str, n: int) -> None:
        (self.metrics.net_tx_bytes if direction == "tx" else self.metrics.net_rx_bytes).labels(channel=channel).inc(n)

    def _checks(self) -> dict[str, bool]:
        alone_ok = not self.initial_peers
        return {
            "dht": self.net is not None,
            "model_loaded": self.trainer is not None,
            "connected": self.net is not None and (self.net.routing_table_size() > 0 or alone_ok),
            "not_isolated": not (self.watchdog and self.watchdog.isolated),
            "in_sync": self.progress.state == "online",
            "quorum": not self.progress.below_quorum,
            "not_draining": not self.stop_requested,
        }

    def _ready(self) -> tuple[bool, dict[str, bool]]:
        snap = self._snapshot
        checks = dict(snap.checks) if snap else {"started": False}
        return (bool(snap) and snap.phase == Phase.READY and self.loop_beat.age_s() < 5, checks)

    def _live(self) -> tuple[bool, str]:
        ok, detail = make_live_fn({"loop": self.loop_beat}, self.config.stall_limit_s)()
        busy = self._compute_busy_since
        if busy is not None and time.monotonic() - busy > self.config.stall_limit_s:
            return False, f"compute: one step running for {time.monotonic() - busy:.0f}s"
        return ok, detail

    def status(self) -> NodeStatus:
        if self._snapshot is None:
            raise RuntimeError("node is still starting")
        return self._snapshot

    def _build_snapshot(self) -> NodeStatus:
        checks = self._checks()
        if self.stop_requested:
            phase = Phase.DRAINING
        elif not checks["not_isolated"]:
            phase = Phase.ISOLATED
        elif not checks["quorum"]:
            phase = Phase.WAITING
        elif all(checks.values()):
            phase = Phase.READY
        else:
            phase = Phase.STARTING
        self.phase = phase
        self.metrics.ready.set(1 if phase == Phase.READY else 0)
        me = self.net.peer_id.to_base58()
        now_dht = time.time()
        peers = [PeerView(peer_id=m.peer_id, state=m.record.state, strategy=m.record.strategy, role=m.record.role,
                          device=m.record.device, step=m.record.step, samples_per_s=m.record.samples_per_s,
                          version=m.record.software, expires_in_s=round(m.expires_at - now_dht, 1),
                          is_self=m.peer_id == me)
                 for m in sorted(self.membership.members(), key=lambda m: m.peer_id)]
        if not any(p.is_self for p in peers):
            rec = self._make_record(self.progress.state)
            peers.insert(0, PeerView(peer_id=me, state=rec.state, strategy=rec.strategy, role=rec.role,
                                     device=rec.device, step=rec.step, samples_per_s=rec.samples_per_s,
                                     version=rec.software, expires_in_s=0.0, is_self=True))
        tx = sum(s.value for s in _samples(self.metrics.net_tx_bytes))
        rx = sum(s.value for s in _samples(self.metrics.net_rx_bytes))
        return NodeStatus(
            peer_id=me, run_id=self.spec.run_id, version=__version__, phase=phase, strategy=self.config.strategy,
            role=self.strategy.role if self.strategy else "trainer", device=str(self.device),
            join_maddrs=self.addresses.join_maddrs, step=self.trainer.step, resumed_from_step=self.resumed_from,
            train_loss=self.progress.train_loss, val_loss=self.progress.val_loss,
            samples_per_s=round(self.progress.samples_per_s, 3), routing_table_size=self.net.routing_table_size(),
            peers=peers, last_round=dict(self.progress.last_round), bytes_sent=int(tx), bytes_received=int(rx),
            uptime_s=round(time.monotonic() - self.started_at, 1), checks=checks,
            waiting_for=self.progress.waiting_for)

    # ------------------------------------------------------------------ run
    async def _on_step(self) -> None:
        cfg, step = self.config, self.trainer.step
        self.train_beat.beat()
        if len(self.history) < 100_000:
            self.history.append([step, self.progress.train_loss, None, round(time.monotonic() - self.started_at, 4)])
        if step % cfg.eval_every == 0:
            await self._evaluate()
        if step % cfg.checkpoint_every == 0:
            await self._save_checkpoint()
        if self.gate is not None:
            await self._spare_gpu_pause()

    async def _evaluate(self) -> float | None:
        if self.strategy is not None and self.strategy.evaluates_itself:
            val = await self.strategy.evaluate()
            if val is None:  # nothing to measure now (a stage server, or the pipeline is incomplete)
                return self.progress.val_loss
            self.progress.val_loss = val
        else:
            self.progress.val_loss = await self.compute(self.trainer.evaluate)
        self.metrics.val_loss.set(self.progress.val_loss)
        self._val_step = self.trainer.step
        self._val_hash = await self.compute(self.trainer.param_hash)
        if self.history and self.history[-1][0] == self.trainer.step:
            self.history[-1][2] = self.progress.val_loss
        return self.progress.val_loss

    def _write_summary(self) -> None:
        """summary.json: what this run of the node did (read by `demo` and the tests)."""
        rounds = {s.labels["outcome"]: int(s.value) for fam in self.metrics.rounds.collect() for s in fam.samples
                  if s.name.endswith("_total")}
        tx = sum(s.value for s in _samples(self.metrics.net_tx_bytes))
        rx = sum(s.value for s in _samples(self.metrics.net_rx_bytes))
        by_channel = {s.labels["channel"]: int(s.value) for s in _samples(self.metrics.net_tx_bytes)}
        summary = {"peer_id": self.net.peer_id.to_base58() if self.net else None, "run_id": self.spec.run_id,
                   "strategy": self.config.strategy, "step": self.trainer.step if self.trainer else 0,
                   "resumed_from_step": self.resumed_from, "train_loss": self.progress.train_loss,
                   "val_loss": self.progress.val_loss, "val_step": self._val_step, "bytes_sent": int(tx),
                   "bytes_received": int(rx), "bytes_sent_by_channel": by_channel, "rounds": rounds, "stop_reason": self.stop_reason,
                   "param_hash": self.trainer.param_hash() if self.trainer else None,
                   "params": sum(p.numel() for p in self.trainer.parameters_list()) if self.trainer else 0,
                   "last_round": dict(self.progress.last_round), "history": self.history,
                   "strategy_stats": self.strategy.summary() if self.strategy else {},
                   "round_history": getattr(self.strategy, "round_history", [])}
        path = self.config.state_dir / "summary.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(summary))
        os.replace(tmp, path)

    async def _spare_gpu_pause(self) -> None:
        import threading

        stop = threading.Event()
        busy = self.gate.should_pause()  # one probe per step (nvidia-smi is a subprocess)
        self.metrics.spare_gpu_paused.set(1 if busy else 0)
        if busy:
            log.info("another process is using the GPU: pausing training (--spare-gpu)")
            self.progress.waiting_for = "GPU in use by another process"
            waiter = asyncio.get_running_loop().run_in_executor(None, self.gate.wait_until_free, stop)
            while not waiter.done():
                if self.stop_requested:
                    stop.set()
                await asyncio.sleep(0.5)
            self.progress.waiting_for = None
            self.metrics.spare_gpu_paused.set(0)

    async def _heartbeat_loop(self) -> None:
        interval = self.config.announce_interval_s
        last_state = None
        while True:
            state = "leaving" if self.stop_requested else self.progress.state
            try:
                await self.membership.announce(state)
                await self.membership.refresh()
                self.metrics.routing_table_peers.set(self.net.routing_table_size())
            except Exception:
                log.exception("heartbeat failed")
            if state != last_state:
                last_state = state
            # re-announce promptly when our state changed (joining -> online)
            for _ in range(int(interval / 0.25)):
                await asyncio.sleep(0.25)
                if self.progress.state != last_state and not self.stop_requested:
                    break

    async def _tick_loop(self) -> None:
        last_print = 0.0
        while True:
            self.loop_beat.beat()
            try:
                self._snapshot = self._build_snapshot()
            except Exception:
                log.exception("could not build the status snapshot")
            if self.device is not None:
                self.metrics.device_memory.set(device_memory_bytes(self.device))
                self._export_gpu_readings()
            now = time.monotonic()
            if self.page is not None and self._snapshot is not None and self.page.due(now):
                self._sample_page(self._snapshot)
            if now - last_print >= self.config.status_interval_s:
                last_print = now
                self._print_status()
            await asyncio.sleep(0.5)

    def _sample_page(self, snap: NodeStatus) -> None:
        """Hand the page book this tick's numbers (on the loop: the strategy's state is read here)."""
        panel = None
        if self.strategy is not None and not self._panel_failed:
            try:
                panel = self.strategy.page_panel().to_json()
            except Exception:  # a broken panel must not take the page (or the loop) down
                self._panel_failed = True
                log.exception("the strategy's page panel failed: the page shows none from now on")
        rejections: dict[str, int] = {}
        for sample in _samples(self.metrics.rejected_messages):
            rejections[sample.labels["reason"]] = int(sample.value)
        try:
            self.page.observe(snap, PageInputs(
                memory_bytes=int(self.metrics.device_memory._value.get()),
                tx_total=sum(s.value for s in _samples(self.metrics.net_tx_bytes)),
                rx_total=sum(s.value for s in _samples(self.metrics.net_rx_bytes)),
                stragglers_total=sum(s.value for s in _samples(self.metrics.stragglers)),
                rejections=rejections, round_history=self.strategy.round_history if self.strategy else [],
                step_history=self.history, panel=panel, suspected=dict(self.progress.suspected),
                join_line=JOIN_COMMAND + snap.join_maddrs[0] if snap.join_maddrs else ""))
        except Exception:  # logged once: the next samples would only repeat it every 2 s
            if not self._page_failed:
                self._page_failed = True
                log.exception("could not sample the page state (the page keeps its last one)")

    def _export_gpu_readings(self) -> None:
        readings = gpu_readings(self.device)
        if readings is None:
            return
        allocated, reserved, util = readings
        self.metrics.gpu_allocated.set(allocated)
        self.metrics.gpu_reserved.set(reserved)
        if util is not None:
            self.metrics.gpu_utilization.labels(device=str(self.device)).set(util)

    def _print_status(self) -> None:
        s = self._snapshot
        if s is None:
            return
        others = len([p for p in s.peers if not p.is_self])
        if s.waiting_for:
            log.info("waiting for %s (%s; %d peers in routing table)", s.waiting_for, s.phase.value,
                     s.routing_table_size)
            return
        loss = f"{s.train_loss:.3f}" if s.train_loss is not None else "-"
        val = f" | val {s.val_loss:.3f}" if s.val_loss is not None else ""
        rnd = s.last_round
        rtxt = f" | round {rnd.get('outcome')} {rnd.get('duration_s', 0):.2f}s x{rnd.get('group_size', 0)}" if rnd else ""
        log.info("step %d | loss %s%s | %.1f samples/s | %d peers | %s%s", s.step, loss, val, s.samples_per_s,
                 others, s.phase.value, rtxt)

    async def run(self) -> int:
        tasks = [asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
                 asyncio.create_task(self._tick_loop(), name="tick"),
                 asyncio.create_task(self.watchdog.run(), name="watchdog")]
        train = asyncio.create_task(self.strategy.run(), name="train")
        try:
            while not train.done() and not self.stop_requested:
                await asyncio.wait({train}, timeout=0.5)
            if not train.done():
                try:
                    await asyncio.wait_for(asyncio.shield(train), self.config.shutdown_grace_s)
                except asyncio.TimeoutError:
                    log.warning("step did not finish within the %.0fs grace period: aborting it",
                                self.config.shutdown_grace_s)
                    train.cancel()
            if train.done() and not train.cancelled() and train.exception() is not None:
                raise train.exception()
            finished = train.result() if train.done() and not train.cancelled() else None
            if not self.stop_requested:
                step = self.trainer.step if self.trainer is not None else 0
                if isinstance(finished, str) and finished:
                    self.stop_reason = finished
                elif self._at_drain_step():
                    self.stop_reason = f"reached the drain step {self.stop_at_step}"
                elif self.config.max_steps and step >= self.config.max_steps:
                    self.stop_reason = f"reached --max-steps {self.config.max_steps}"
                else:  # nobody asked it to stop: never report that as a normal end
                    how = "was cancelled" if train.cancelled() else "returned"
                    raise TrainingLoopEnded(f"the {self.config.strategy} training loop {how} by itself at step "
                                            f"{step} (a strategy bug)")
            return EXIT_OK
        finally:
            self.stop_requested = True
            for t in tasks:
                t.cancel()
            # Bounded: a task that swallows its cancellation must not keep the node from
            # shutting down (checkpoint, LEAVING record, p2pd stopped); name it instead.
            _, stuck = await asyncio.wait([*tasks, train], timeout=TASK_STOP_S)
            for t in [*tasks, train]:
                if t.done() and not t.cancelled():
                    t.exception()  # retrieved: a task's failure is reported above, not at exit
            if stuck:
                log.warning("%s did not stop within %.0fs of being cancelled; shutting down anyway",
                            ", ".join(sorted(t.get_name() for t in stuck)), TASK_STOP_S)

    # ------------------------------------------------------------------ stop
    def request_stop(self, reason: str) -> None:
        if not self.stop_requested:
            log.info("draining: %s", reason)
        self.stop_requested = True
        self.stop_reason = self.stop_reason or reason

    def _should_stop(self) -> bool:
        return self.stop_requested or self._at_drain_step()

    def _at_drain_step(self) -> bool:
        return self.stop_at_step is not None and self.trainer is not None and self.trainer.step >= self.stop_at_step

    def _drain_from_thread(self, reason: str, at_step: int = 0) -> DrainOutcome:
        if self._loop is None:
            return DrainOutcome(False, "node is not running")
        why = f"drain requested: {reason or 'no reason given'}"
        if at_step > 0:
            step = self.trainer.step if self.trainer is not None else 0
            # at the step itself it drains now, where the peers it stops with stop too (`step >= N`);
            # past it, refused: stopping there would fork it from them, and the caller must learn it
            if at_step < step:
                return DrainOutcome(False, f"already at step {step}, past {at_step}: not draining (ask for a later "
                                           "step, or drain now without --at-step)", past_step=True, current_step=step)
            self._loop.call_soon_threadsafe(self._drain_at, at_step, why)
            return DrainOutcome(True, f"will drain on reaching step {at_step} (now at {step})", current_step=step)
        self._loop.call_soon_threadsafe(self.request_stop, why)
        return DrainOutcome(True, "draining: finishing the current step, then leaving the swarm")

    def _drain_at(self, step: int, why: str) -> None:
        log.info("%s: will drain on reaching step %d", why, step)
        self.stop_at_step = step

    async def shutdown(self) -> None:
        log.info("shutting down (%s)", self.stop_reason or "stop")
        self.stop_requested = True
        if self.membership is not None and self.trainer is not None:
            self._snapshot = self._build_snapshot()  # /readyz answers 503 (draining) from now on
        if self.membership is not None:
            try:  # tell peers right away instead of letting our record expire
                # It lives as long as our heartbeat would have: a peer whose reads are slow (its other
                # DHT neighbours gone) must still see that we left gracefully, or its quorum counts us
                # as crashed and it stops. A restart under our identity overwrites it (later expiry).
                await asyncio.wait_for(self.membership.announce("leaving", ttl_s=self.config.ttl_s), 5)
            except Exception:
                pass
        if self.trainer is not None and self.net is not None:
            try:
                # re-evaluate if the weights moved since (e.g. DiLoCo's final outer step)
                if self._val_step != self.trainer.step or self._val_hash != self.trainer.param_hash():
                    try:
                        await asyncio.wait_for(self._evaluate(), 30)
                    except asyncio.TimeoutError:
                        log.warning("the final evaluation took over 30 s: the summary keeps the last one")
                self._write_summary()
            except Exception as e:
                log.warning("could not write the run summary: %s", e)
        if self.trainer is not None:
            try:
                await self._save_checkpoint()
                log.info("checkpoint saved at step %d", self.trainer.step)
            except Exception as e:
                log.warning("could not save the checkpoint: %s", e)
        if self.strategy is not None:
            await self.strategy.stop()
        if self.transport is not None:
            await self.transport.close()
        if self.control is not None:
            self.control.stop(1.0)
        if self.health is not None:
            self.health.stop(2.0)
        if self.discovery is not None:
            await self.discovery.stop()
        if self.net is not None:
            await self.net.shutdown()
        self._executor.shutdown(wait=False, cancel_futures=True)
        reap_children(timeout_s=3.0)
        (self.config.state_dir / "node.json").unlink(missing_ok=True)


def _samples(metric) -> list:
    return [s for fam in metric.collect() for s in fam.samples if s.name.endswith("_total")]


async def _main(config: NodeConfig) -> int:
    node = Node(config)
    loop = asyncio.get_running_loop()
    interrupts = {"n": 0}

    def on_signal(sig: signal.Signals) -> None:
        if sig == signal.SIGINT:
            interrupts["n"] += 1
            if interrupts["n"] >= 2:
                print("second interrupt: exiting now", file=sys.stderr, flush=True)
                reap_children(timeout_s=0.5)
                os._exit(EXIT_INTERRUPTED)
        node.request_stop(f"received {sig.name}")

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        await node.start()
        if node.stop_requested:
            return EXIT_OK
        return await node.run()
    finally:
        await node.shutdown()


def run_node(config: NodeConfig) -> int:
    """Run a node until it stops; returns the process exit code."""
    import uvloop

    try:
        return uvloop.run(_main(config))
    except NodeExit as e:
        print(f"swarm-node: {e}", file=sys.stderr, flush=True)
        return e.code
