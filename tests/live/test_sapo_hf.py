"""SAPO with a Hugging Face causal LM as the policy (`--sapo-hf-model DIR`).

The model is the tiny GPT-2 that `sapo_hf_fixture` builds offline (character tokenizer,
random weights): nothing comes from a hub. Checked:
- units: the fixture is deterministic and loads with local_files_only; generation gives G
  strings per prompt, reproducible from the caller's generator, and the KV-cache sampling loop
  agrees with the same sampler run on full sequences; token_logprobs' mask covers exactly the
  completion tokens + the end token, and padding does not change a row's values; a GRPO
  update through the strategy's own `_update` moves the weights for non-zero advantages and
  leaves them bitwise unchanged for all-zero ones; non-finite gradients change nothing;
- config: a non-directory or a directory without config.json is a clear error;
- resume: the HF policy's weights, optimizer and step count go through a checkpoint file;
- live: two real `swarm-node join --strategy sapo` peers on loopback, one HF, one byte GPT,
  each training on the other's rollouts; the HF peer then restarts from its state dir.
"""
from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

transformers = pytest.importorskip("transformers", reason="the hf extra (pip install 'swarm-node[hf]') is not installed")

import torch  # noqa: E402

from swarm_node.strategies.sapo import tasks as tasks  # noqa: E402
from swarm_node.strategies.sapo.strategy import SapoStrategy  # noqa: E402
from swarm_node.strategies.sapo.hf_fixture import make_tiny_hf_model  # noqa: E402
from swarm_node.strategies.sapo.math import ScoredGroup, build_training_set, training_advantages  # noqa: E402
from swarm_node.strategies.sapo.policy import HFPolicy  # noqa: E402

MAX_NEW = 6
PROMPTS = ["0+3=", "12+34=", "5+6=", "7-2="]  # two of equal length share a batch, the others do not


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_hf_model(tmp_path_factory.mktemp("tiny_hf"))


def policy(model_dir: Path, lr: float = 3e-3) -> HFPolicy:
    return HFPolicy(str(model_dir), torch.device("cpu"), MAX_NEW, lr)


def params(p: HFPolicy) -> list[torch.Tensor]:
    return [t.detach().clone() for t in p.model.parameters()]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- fixture ---------------------------------------------------------------------------
def test_fixture_is_deterministic_and_loads_offline(model_dir: Path, tmp_path: Path):
    again = make_tiny_hf_model(tmp_path / "again")
    other = make_tiny_hf_model(tmp_path / "other", seed=1)
    blob = (model_dir / "model.safetensors").read_bytes()
    assert (again / "model.safetensors").read_bytes() == blob
    assert (other / "model.safetensors").read_bytes() != blob
    tok = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    assert type(model).__name__ == "GPT2LMHeadModel" and model.config.n_layer == 2 and model.config.n_embd == 64
    text = "12+34=46\nab C"
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text) and tok.decode(ids) == text  # one character, one token, round trip
    assert tok.eos_token_id == tok.pad_token_id is not None


# ---- generation ------------------------------------------------------------------------
def test_generate_g_per_prompt_reproducible_from_the_generator(model_dir: Path):
    p = policy(model_dir)
    torch.manual_seed(123)
    global_state = torch.get_rng_state()
    a = p.generate(PROMPTS, 4, temperature=1.0, generator=gen(7))
    assert torch.equal(torch.get_rng_state(), global_state), "sampling touched the global RNG"
    b = p.generate(PROMPTS, 4, temperature=1.0, generator=gen(7))
    c = p.generate(PROMPTS, 4, temperature=1.0, generator=gen(8))
    assert len(a) == len(PROMPTS) and all(len(g) == 4 for g in a)
    assert all(isinstance(s, str) and "\n" not in s and len(s) <= MAX_NEW for g in a for s in g)
    assert a == b
    assert a != c


def test_cached_sampling_matches_a_full_forward_sampler(model_dir: Path):
    """The KV-cache loop must draw what the same sampler draws from a plain forward of the
    whole sequence at every step (same generator seed, so the same uniforms)."""
    p = policy(model_dir)
    for k, prompt in enumerate(["0+3=", "12+34="]):
        got = p.generate([prompt], 3, temperature=1.0, generator=gen(k))
        g = gen(k)
        x = torch.tensor([p.tok(prompt)["input_ids"]] * 3)
        done = torch.zeros(3, dtype=torch.bool)
        rows: list[list[int]] = [[], [], []]
        with torch.no_grad():
            for _ in range(MAX_NEW):
                probs = torch.softmax(p.model(x).logits[:, -1].float(), dim=-1)
                tok = torch.multinomial(probs, 1, generator=g).squeeze(1)
                for r in range(3):
                    if not done[r]:
                        rows[r].append(int(tok[r]))
                done |= (tok == p.end_id) | (tok == p.tok.eos_token_id)
                if bool(done.all()):
                    break
                x = torch.cat([x, tok[:, None]], dim=1)
        want = [p.tok.decode([t for t in r if t not in (p.end_id, p.tok.eos_token_id)], skip_special_tokens=True)
                for r in rows]
        assert got == [want], (prompt, got, want)


# ---- scoring ---------------------------------------------------------------------------
def test_token_logprobs_mask_covers_completion_and_end(model_dir: Path):
    p = policy(model_dir)
    prompts = ["0+3=", "12+34=", "5+6="]
    comps = ["3", "46", "1234567890"]  # the last is longer than MAX_NEW: truncated, end token kept
    logp, mask = p.token_logprobs(prompts, comps)
    longest = max(len(a) + min(len(b), MAX_NEW) + 1 for a, b in zip(prompts, comps))
    assert logp.shape == mask.shape == (3, longest - 1)
    for i, (pr, c) in enumerate(zip(prompts, comps)):
        n_c = min(len(c), MAX_NEW) + 1
        where = mask[i].nonzero().squeeze(1).tolist()
        assert where == list(range(len(pr) - 1, len(pr) - 1 + n_c)), (i, where)
        # padding does not leak into a row: scored alone, the same values
        alone, alone_mask = p.token_logprobs([pr], [c])
        assert torch.allclose(logp[i][mask[i]], alone[0][alone_mask[0]], atol=1e-5)
        # and they are the model's log-probabilities of exactly those tokens (+ end)
        ids = p.tok(pr)["input_ids"] + p.tok(c[:MAX_NEW], add_special_tokens=False)["input_ids"] + [p.end_id]
        with torch.no_grad():
            full = torch.log_softmax(p.model(torch.tensor([ids])).logits[0], dim=-1)
        expect = torch.stack([full[k, ids[k + 1]] for k in range(len(pr) - 1, len(ids) - 1)])
        assert torch.allclose(logp[i][mask[i]], expect, atol=1e-5)
    assert p.end_id == p.tok("\n", add_special_tokens=False)["input_ids"][0]


# ---- updates ---------------------------------------------------------------------------
def _strategy_stub(p: HFPolicy, epochs: int = 2) -> SimpleNamespace:
    """Just what SapoStrategy._update/_grpo_epochs read, with the real methods bound to it."""
    async def compute(fn, *args):
        return fn(*args)

    counter = SimpleNamespace(labels=lambda **_: SimpleNamespace(inc=lambda n=1: None))
    stub = SimpleNamespace(policy=p, m=SimpleNamespace(skipped=counter),
                           ctx=SimpleNamespace(options=SimpleNamespace(sapo_ppo_epochs=epochs), compute=compute,
                                               progress=SimpleNamespace(step=0, train_loss=None), trainer=None,
                                               on_step=None))
    stub._grpo_epochs = lambda *a: SapoStrategy._grpo_epochs(stub, *a)
    return stub


def _training_set(p: HFPolicy, rewards: list[tuple[float, ...]]):
    items = [tasks.make_item("add4", 0, i) for i in range(len(rewards))]
    comps = p.generate([it.question for it in items], len(rewards[0]), temperature=1.0, generator=gen(3))
    local = [ScoredGroup("me", f"g{i}", (it.task, it.seed, it.index), it.question, tuple(c), r, False)
             for i, (it, c, r) in enumerate(zip(items, comps, rewards))]
    ts = build_training_set(local, [], my_peer_id="me", num_local=len(local), num_external=0, rng=random.Random(0))
    return ts, training_advantages(ts, negative_scale=0.0)


def test_grpo_update_moves_weights_only_for_nonzero_advantages(model_dir: Path):
    p = policy(model_dir)
    stub = _strategy_stub(p)
    ts, adv = _training_set(p, [(0.0, 0.0, 0.0, 0.0), (1.0, 1.0, 1.0, 1.0)])  # zero variance: all-zero advantages
    before = params(p)
    assert asyncio.run(SapoStrategy._update(stub, ts, adv)) == "skipped_all_zero"
    assert all(torch.equal(a, b) for a, b in zip(before, params(p))) and p.steps == 0

    ts, adv = _training_set(p, [(1.0, 0.0, 0.0, 0.0), (0.0, 0.1, 1.0, 0.1)])
    assert float(adv.abs().sum()) > 0
    assert asyncio.run(SapoStrategy._update(stub, ts, adv)) == "ok"
    after = params(p)
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    assert p.steps == 2  # one optimizer step per PPO epoch
    assert stub.ctx.progress.train_loss is not None


def test_non_finite_gradients_change_nothing(model_dir: Path):
    p = policy(model_dir)
    before = params(p)
    logp, mask = p.token_logprobs(["1+1="], ["2"])
    assert p.apply((logp * mask).sum() * float("nan")) is False
    assert all(torch.equal(a, b) for a, b in zip(before, params(p))) and p.steps == 0
    logp, mask = p.token_logprobs(["1+1="], ["2"])
    assert p.apply(-(logp * mask).sum() / mask.sum()) is True and p.steps == 1


def test_policy_state_survives_a_checkpoint_file_and_a_misfit_changes_nothing(model_dir: Path, tmp_path: Path):
    """A resumed SAPO peer goes on from its HF policy's weights, optimizer moments and step
    count, read back from a checkpoint file as the node loads it (weights_only)."""
    p = policy(model_dir)
    for _ in range(2):
        logp, mask = p.token_logprobs(["1+1="], ["2"])
        assert p.apply(-(logp * mask).sum() / mask.sum())
    torch.save({"strategy": {"hf_policy": p.state()}}, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt", map_location="cpu", weights_only=True)["strategy"]["hf_policy"]
    q = policy(model_dir)
    q.load_state(saved)
    assert q.steps == 2 and all(torch.equal(a, b) for a, b in zip(params(p), params(q)))
    for r in (p, q):  # the same next step from the same moments
        logp, mask = r.token_logprobs(["2+2="], ["4"])
        assert r.apply(-(logp * mask).sum() / mask.sum())
    assert all(torch.equal(a, b) for a, b in zip(params(p), params(q)))

    fresh = policy(model_dir)
    before = params(fresh)
    misfit = {**saved, "model": {k: (v[:1] if k.endswith("wte.weight") else v) for k, v in saved["model"].items()}}
    with pytest.raises(ValueError, match="does not fit"):
        fresh.load_state(misfit)
    assert all(torch.equal(a, b) for a, b in zip(before, params(fresh))) and fresh.steps == 0


def test_sapo_refuses_a_checkpoint_of_the_other_policy_kind(model_dir: Path):
    stub = SimpleNamespace(policy=policy(model_dir), rounds_done=0, cumulative_reward=0.0)
    with pytest.raises(ValueError, match="policy kind"):
        SapoStrategy.restore_checkpoint_state(stub, {"rounds_done": 3})
    SapoStrategy.restore_checkpoint_state(stub, {"rounds_done": 3, "cumulative_reward": 1.5,
                                                 "hf_policy": stub.policy.state()})
    assert stub.rounds_done == 3 and stub.cumulative_reward == 1.5


def test_format_warm_start_teaches_digits_then_save_and_reload(model_dir: Path, tmp_path: Path):
    p = policy(model_dir)
    rng = random.Random(0)
    prompts = [tasks.make_item("add4", 0, i).question for i in range(16)]
    first = last = None
    for _ in range(30):
        logp, mask = p.format_batch(prompts, rng)
        loss = -(logp * mask).sum() / mask.sum()
        first = float(loss) if first is None else first
        last = float(loss)
        assert p.apply(loss)
    assert last < 0.7 * first, (first, last)
    p.save(tmp_path / "saved")
    q = policy(tmp_path / "saved")
    a, _ = p.token_logprobs(prompts[:2], ["12", "3"])
    b, _ = q.token_logprobs(prompts[:2], ["12", "3"])
    assert torch.allclose(a, b, atol=1e-6)


# ---- config ----------------------------------------------------------------------------
def test_hf_model_path_errors_are_clear(tmp_path: Path):
    from swarm_node.config import ConfigError, load_config

    f = tmp_path / "model.bin"
    f.write_bytes(b"not a model")
    with pytest.raises(ConfigError, match="is not a local model directory"):
        load_config({"strategy": "sapo", "sapo_hf_model": str(f)})
    with pytest.raises(ValueError, match="no config.json"):
        HFPolicy(str(tmp_path), torch.device("cpu"), MAX_NEW, 1e-3)


# ---- live ------------------------------------------------------------------------------
@pytest.mark.multiprocess
def test_hf_peer_and_byte_peer_share_rollouts(swarm, tmp_path: Path, model_dir: Path):
    from tests.live.test_sapo_live import SAPO_ARGS, value, wait_metrics

    byte = swarm.add("byte", SAPO_ARGS)
    byte.wait_info()
    hf = swarm.add("hf", [*SAPO_ARGS, "--sapo-hf-model", str(model_dir)], initial=byte.join_maddr())
    hf.wait_info(120)  # importing transformers takes a while on a loaded box
    for n in (byte, hf):
        m = wait_metrics(n, lambda m: value(m, "swarm_sapo_external_used_total") > 0, 120, "external rollouts used")
        # and one more trained round after that, so each peer has at least two (asserted below)
        first = value(m, "swarm_sapo_round")
        wait_metrics(n, lambda m: value(m, "swarm_sapo_round") > first, 60, "a second trained round")
    stats = {}
    for n in (hf, byte):
        assert n.terminate(60) == 0, n.log_text()[-3000:]
        stats[n.name] = json.loads((n.state_dir / "summary.json").read_text())["strategy_stats"]
    assert stats["hf"]["policy"] == f"hf:{model_dir.name}"
    assert stats["byte"]["policy"].startswith("byte-gpt-")
    for name, s in stats.items():
        assert s["totals"]["used"] > 0 and s["rounds"] >= 2, (name, s["totals"])
        assert any(row["used"] > 0 and row["senders"] >= 1 for row in s["history"]), name
        assert s["policy_steps"] > 0 and any(row["outcome"] == "ok" for row in s["history"]), name
    assert "Traceback" not in hf.log_text() and "Traceback" not in byte.log_text()
    saved = hf.state_dir / "hf_policy"  # the trained HF policy is kept, loadable as a model dir
    assert (saved / "config.json").is_file()
    policy(saved)

    # a full stop: the HF peer comes back from its state dir with its policy, optimizer and steps
    # (a fresh start would warm-start again from the original weights, to exactly 20 steps)
    before = stats["hf"]["policy_steps"]
    again = swarm.add("hf", [*SAPO_ARGS, "--sapo-hf-model", str(model_dir)])
    again.wait_info(120)
    deadline = time.monotonic() + 60
    while "resumed the sapo state from the checkpoint" not in again.log_text():
        assert time.monotonic() < deadline and again.proc.poll() is None, again.log_text()[-3000:]
        time.sleep(0.5)
    assert again.terminate(60) == 0, again.log_text()[-3000:]
    after = json.loads((again.state_dir / "summary.json").read_text())["strategy_stats"]
    assert after["policy_steps"] >= before > 20, (before, after["policy_steps"])
