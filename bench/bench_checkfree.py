"""CheckFree vs random re-init vs checkpoint rollback after losing a middle pipeline stage.

Network-free: an in-process pipeline of the tiny GPT (node/train/model.py split_stages) or, with
`--arch llama`, of a small Llama built offline from a `transformers.LlamaConfig` (byte vocabulary
256, `--n-head` heads, half as many key/value heads when even, SwiGLU width ~8/3 d, untied head)
and cut by node/train/hf_stages.py split_hf_stages. One Adam
(weight decay 0) per stage, per-stage clipping at 1.0. Every continuation starts from the same
pretrained state and sees the same batches, so the comparison is paired; every rebuilt stage
gets the same brand-new optimizer at lr x 1.1. For each middle stage k: pretrain F steps (a
checkpoint every C steps), lose stage k at step F, then continue with each method of METHODS
(see the comment there). `--data markov` is a toy order-2 Markov chain (`MarkovData`);
`--note-toy` sets the full toy setup on it (6 one-block stages, d 32, lr 1e-3, pretrain
1500, marks up to +300). Prints eval loss at each mark (mean and median over the middle stages),
the ratio to the no-failure loss, the pass/fail gate of `gate` against both random baselines,
and the recovery cost: bytes moved and seconds.

    .venv/bin/python bench/bench_checkfree.py              # ~1 min on one thread
    .venv/bin/python bench/bench_checkfree.py --note-toy   # the Markov toy setup (~4 min)
    .venv/bin/python bench/bench_checkfree.py --arch llama # the same on Llama stages
"""
from __future__ import annotations

import argparse
import copy
import io
import json
import statistics
import time

import torch
from torch import nn

from swarm_node.train.data import ByteDataset, batch_generator_seed
from swarm_node.train.model import INIT_STD, GPTConfig, PipelineStage, build_model, split_stages
from swarm_node.strategies.swarm.checkfree import (CheckFreeConfig, body_order, fresh_optimizer, plan_recovery,
                                             rebuild_state, state_bytes)

CLIP = 1.0
# What each continuation does after stage k is lost at step F:
#   none         no failure (the baseline every ratio is against)
#   checkfree    grad-norm weighted average of stages k-1, k+1, weighted by each neighbour's
#                whole-stage post-clip norm (what the live strategy announces)
#   checkfree_body  the same, weighted by the neighbours' BODY gradient norms (clipped at 1): the
#                paper's statistic, whose neighbour stages hold blocks only
#   uniform      0.5/0.5 average of the same neighbours (an ablation)
#   random       stage k re-initialised by THIS model's init (stage k of the model built with
#                another seed). GPT: residual projections at 0.02/sqrt(2 n_layer) (GPT-2
#                practice), so a fresh block is close to a skip. Llama: transformers' own init,
#                every matrix at std 0.02, so `random` and `random_full` are the same
#                distribution there (different draws)
#   random_full  every weight matrix at std 0.02, no depth scaling: the init of the paper's
#                main (LLaMa) configs
#   skip         residual projections (GPT attn.proj/mlp.proj, Llama o_proj/down_proj) zeroed:
#                the block is exactly the identity (a reference point: what GPT's `random`
#                approaches)
#   checkpoint   every stage rolled back to the last checkpoint (F - F mod C): F mod C steps
#                of work are redone; its "+n" counts steps after the rollback
METHODS = ("none", "checkfree", "checkfree_body", "uniform", "random", "random_full", "skip", "checkpoint")


class MarkovData:
    """A synthetic language: an order-2 Markov chain over V tokens. Next-token
    distribution given (a, b) = w * D1[b] + (1 - w) * D2[a, b], with D1, D2 seeded
    Dirichlet(0.1) draws: an order-1 part the model picks up within a few hundred steps and an
    order-2 refinement that takes longer, so stages specialise (averaging helps once they
    have). Why the order-1 part: with w = 0 (a pure order-2 Dirichlet(0.3) chain) the order-1
    marginal is nearly uniform, nothing is learnable short of the full pair interaction, and
    a 6-block d=32 GPT stays at ln 32 for 1,500 steps.
    Train batches are fresh chains from the generator; validation is fixed."""

    def __init__(self, vocab: int = 32, seed: int = 0, order1_weight: float = 0.6, alpha: float = 0.1):
        g = torch.Generator().manual_seed(10_000 + seed)

        def dirichlet(rows: int) -> torch.Tensor:
            x = torch._standard_gamma(torch.full((rows, vocab), alpha), generator=g)
            return x / x.sum(-1, keepdim=True)

        d1, d2 = dirichlet(vocab), dirichlet(vocab * vocab)
        self.probs = order1_weight * d1.repeat(vocab, 1) + (1 - order1_weight) * d2  # row a*V+b: (a, b)
        self.V = vocab
        self._val = None

    def entropy(self) -> float:
        """Mean conditional entropy over (a, b) pairs: the loss floor (nats)."""
        p = self.probs.clamp_min(1e-12)
        return float(-(p * p.log()).sum(-1).mean())

    def _sample(self, n: int, length: int, g: torch.Generator) -> torch.Tensor:
        seq = torch.empty(n, length, dtype=torch.long)
        seq[:, :2] = torch.randint(0, self.V, (n, 2), generator=g)
        for t in range(2, length):
            p = self.probs[seq[:, t - 2] * self.V + seq[:, t - 1]]
            seq[:, t] = torch.multinomial(p, 1, generator=g).squeeze(1)
        return seq

    def train_batch(self, batch: int, seq_len: int, g: torch.Generator):
        s = self._sample(batch, seq_len + 1, g)
        return s[:, :-1], s[:, 1:]

    def val_batches(self, batch: int, seq_len: int, n: int):
        if self._val is None or self._val.shape != (n * batch, seq_len + 1):
            self._val = self._sample(n * batch, seq_len + 1, torch.Generator().manual_seed(999))
        for i in range(n):
            s = self._val[i * batch:(i + 1) * batch]
            yield s[:, :-1], s[:, 1:]


class Arch:
    """What the bench needs from a model family: the seeded stages of a pipeline, one stage of
    another seed's model (re-init), an empty stage to load a state into, and the names of the
    residual-branch output projections (`skip`). gpt: node/train/model.py; llama: a
    `transformers.LlamaForCausalLM` built offline, split by hf_stages.split_hf_stages."""

    def __init__(self, name: str, args) -> None:
        self.name = name
        self.seq_len = args.seq_len
        if name == "gpt":
            self.cfg = GPTConfig(n_layer=args.n_layer, n_head=args.n_head, d_model=args.d_model, seq_len=args.seq_len)
            self.residual = ("proj",)  # attn.proj, mlp.proj
            self.model = {"n_layer": args.n_layer, "d_model": args.d_model, "n_head": args.n_head,
                          "d_ff": 4 * args.d_model, "tied_head_at_init": True}
        elif name == "llama":
            from transformers import LlamaConfig

            d, h = args.d_model, args.n_head
            if d % h:
                raise SystemExit(f"--d-model {d} must be divisible by --n-head {h}")
            kv = h // 2 if h % 2 == 0 else h
            ff = max(8, round(8 * d / 3 / 8) * 8)  # SwiGLU at ~8/3 d: about the GPT MLP's 8 d^2 parameters
            self.cfg = LlamaConfig(vocab_size=256, hidden_size=d, num_hidden_layers=args.n_layer, num_attention_heads=h,
                                   num_key_value_heads=kv, intermediate_size=ff,
                                   max_position_embeddings=args.seq_len, tie_word_embeddings=False)
            self.residual = ("o_proj", "down_proj")
            self.model = {"n_layer": args.n_layer, "d_model": d, "n_head": h, "n_kv_head": kv, "d_ff": ff,
                          "tied_head_at_init": False}
            self._template: nn.Module | None = None
        else:
            raise SystemExit(f"unknown --arch {name!r}")

    def _llama(self, seed: int) -> nn.Module:
        from transformers import LlamaForCausalLM

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return LlamaForCausalLM(self.cfg)

    def stages(self, seed: int, S: int) -> list[nn.Module]:
        if self.name == "gpt":
            return split_stages(build_model(self.cfg, seed), S)
        from swarm_node.train.hf_stages import split_hf_stages

        return split_hf_stages(self._llama(seed), S, seq_len=self.seq_len)

    def stage_state(self, seed: int, k: int, S: int) -> dict[str, torch.Tensor]:
        """Stage k's state dict in the model built with `seed`."""
        if self.name == "gpt":
            return split_stages(build_model(self.cfg, seed), S)[k].state_dict()
        from swarm_node.train.hf_stages import build_hf_stage

        return build_hf_stage(self._llama(seed), k, S, seq_len=self.seq_len).state_dict()

    def empty(self, k: int, S: int) -> nn.Module:
        """A stage k of S to `load_state_dict` into (its own values are all overwritten)."""
        if self.name == "gpt":
            return PipelineStage(self.cfg, k, S)
        from swarm_node.train.hf_stages import build_hf_stage

        if self._template is None:  # any seed: only the module structure is used
            self._template = self._llama(0)
        return build_hf_stage(self._template, k, S, seq_len=self.seq_len)


class Pipeline:
    """S stages + one optimizer per stage; `step(t)` trains on the batch of step t."""

    def __init__(self, stages: list[nn.Module], lr: float, dataset, batch: int, seed: int,
                 swaps: bool = False):
        self.stages, self.lr, self.dataset, self.batch, self.seed = stages, lr, dataset, batch, seed
        self.swaps = swaps  # CheckFree+: the batch is 2 micro-batches, the odd one runs swapped bodies
        self.opts = [torch.optim.AdamW(s.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=0.0) for s in stages]
        self.norms = [0.0] * len(stages)  # post-clip grad norm of each stage's last step
        self.pre_norms = [0.0] * len(stages)
        # norm of the BODY (blocks) gradient alone, clipped at CLIP: in the paper's simulator every
        # neighbour stage is blocks only (embedding and head live in a stage that never fails), so
        # this is the statistic its rule weighs by; ours is skewed where a neighbour holds the
        # embedding (tiny gradient) or the head (always clipped to 1)
        self.body_norms = [0.0] * len(stages)

    def step(self, t: int) -> float:
        gen = torch.Generator().manual_seed(batch_generator_seed(self.seed, "bench", t))
        x, y = self.dataset.train_batch(self.batch, self.stages[0].cfg.seq_len, gen)
        if self.swaps:
            half = self.batch // 2
            loss = (self._loss(x[:half], y[:half], 0) + self._loss(x[half:], y[half:], 1)) / 2
        else:
            loss = self._loss(x, y, 0)
        for o in self.opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        for k, (s, o) in enumerate(zip(self.stages, self.opts)):
            body = [p.grad for n, p in s.named_parameters() if n.startswith("blocks.") and p.grad is not None]
            self.body_norms[k] = min(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g)
                                                                                 for g in body]))), CLIP)
            pre = float(torch.nn.utils.clip_grad_norm_(s.parameters(), CLIP))
            self.pre_norms[k], self.norms[k] = pre, min(pre, CLIP)
            o.step()
        return float(loss.detach())

    def _loss(self, x: torch.Tensor, y: torch.Tensor, microbatch: int) -> torch.Tensor:
        h = self.stages[0].embed(x)
        for k in body_order(len(self.stages), microbatch, self.swaps):
            h = self.stages[k].body(h)
        h = self.stages[-1].head(h)
        return torch.nn.functional.cross_entropy(h.reshape(-1, h.shape[-1]), y.reshape(-1))

    @torch.no_grad()
    def evaluate(self, batches: int = 4) -> float:
        total = 0.0
        for x, y in self.dataset.val_batches(self.batch, self.stages[0].cfg.seq_len, batches):
            h = x
            for s in self.stages:
                h = s(h)
            total += float(torch.nn.functional.cross_entropy(h.view(-1, h.shape[-1]), y.reshape(-1)))
        return total / batches


def continuation(pipe: Pipeline, start: int, marks=(0, 10, 50)) -> dict[int, float]:
    out, t = {}, start
    for n in range(max(marks) + 1):
        if n in marks:
            out[n] = pipe.evaluate()
        if n < max(marks):
            pipe.step(t)
            t += 1
    return out


def reinit_full(stage: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The stage's body state with every Linear weight ~ N(0, 0.02) (no 1/sqrt(2L) on the
    residual projections), biases 0, norm gains (LayerNorm / RMSNorm weights) 1: HF LLaMa-style init."""
    g = torch.Generator().manual_seed(seed)
    sd = {k: v.clone() for k, v in stage.state_dict().items()}
    for k, v in sd.items():
        if not k.startswith("blocks."):
            continue
        if k.endswith(".weight") and v.dim() == 2:
            sd[k] = torch.randn(v.shape, generator=g) * INIT_STD
        elif k.endswith(".bias"):
            sd[k] = torch.zeros_like(v)
        elif k.endswith(".weight") and v.dim() == 1:  # GPT ln1/ln2, Llama input/post_attention_layernorm
            sd[k] = torch.ones_like(v)
    return sd


def skip_state(stage: nn.Module, residual: tuple[str, ...] = ("proj",)) -> dict[str, torch.Tensor]:
    """The stage's own state with both residual-branch projections (modules named in `residual`:
    GPT "proj", Llama "o_proj"/"down_proj") zeroed: body = identity."""
    sd = {k: v.clone() for k, v in stage.state_dict().items()}
    for k in sd:
        if k.startswith("blocks.") and any(f".{r}." in k for r in residual):
            sd[k] = torch.zeros_like(sd[k])
    return sd


def _install(p: Pipeline, k: int, state: dict[str, torch.Tensor], arch: Arch, lr: float, cf: CheckFreeConfig):
    fresh = arch.empty(k, len(p.stages))
    fresh.load_state_dict(state)
    p.stages[k] = fresh
    p.opts[k] = fresh_optimizer(fresh.parameters(), lr, cf)


def gate(loss: dict, baseline: str, method: str = "checkfree") -> dict:
    """CheckFree's pass/fail gate against one baseline (means over the failed stages): clearly
    better right after the failure and at +10, no worse than the baseline at +300, and still
    above the no-failure loss there."""
    cf, rb, none = loss[method], loss[baseline], loss["none"]
    checks = {"+0 < base - 0.05": cf["+0"] < rb["+0"] - 0.05}
    if "+10" in cf:
        checks["+10 < base - 0.02"] = cf["+10"] < rb["+10"] - 0.02
    if "+300" in cf:
        checks["+300 <= base + 0.005"] = cf["+300"] <= rb["+300"] + 0.005
        checks["+300 > none"] = cf["+300"] > none["+300"]
    return {"checks": checks, "pass": all(checks.values())}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=("gpt", "llama"), default="gpt",
                    help="gpt: node/train/model.py; llama: transformers LlamaForCausalLM cut by split_hf_stages")
    ap.add_argument("--stages", type=int, default=4)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=32)
    ap.add_argument("--n-head", type=int, default=4,
                    help="attention heads (llama: half as many key/value heads when even)")
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3 * 3)
    ap.add_argument("--pretrain", type=int, default=430, help="failure step F")
    ap.add_argument("--marks", default="0,10,50", help="eval points after the failure")
    ap.add_argument("--data", choices=("stdlib", "markov"), default="stdlib")
    ap.add_argument("--note-toy", action="store_true", help="the small toy setting: --data markov --stages 6 --n-layer 6 "
                    "--seq-len 16 --batch 32 --lr 1e-3 --pretrain 1500 --marks 0,10,50,300")
    ap.add_argument("--ckpt-every", type=int, default=100, help="C of the checkpoint baseline")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--edge", action="store_true", help="also: lose the LAST stage after pretraining with and "
                    "without the CheckFree+ swap schedule; recover by copying stage S-2 (head from its copy)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.note_toy:
        args.data, args.stages, args.n_layer, args.seq_len, args.batch = "markov", 6, 6, 16, 32
        args.lr, args.pretrain, args.marks = 1e-3, 1500, "0,10,50,300"
    return args


def make_dataset(args: argparse.Namespace):
    return MarkovData(32, args.seed) if args.data == "markov" else ByteDataset.from_source("stdlib", max_bytes=1 << 20)


def run(args: argparse.Namespace, ds=None, installs: list | None = None) -> dict:
    """The whole measurement; returns the report. `installs`, when a list, receives one
    {"method", "stage", "lost", "installed", "module"} per stage a method installed ("lost": the
    state dict the stage had at the failure, "installed": a copy of the state the method put in its
    place, "module": the installed stage, trained on by the continuation afterwards), for tests."""
    marks = tuple(sorted({int(m) for m in args.marks.split(",")}))
    if marks[0] != 0:
        raise SystemExit("--marks must include 0")
    torch.set_num_threads(1)
    S = args.stages
    if S < 3:
        raise SystemExit("need >= 3 stages to have a middle stage")
    arch = Arch(args.arch, args)
    if ds is None:
        ds = make_dataset(args)
    pipe = Pipeline(arch.stages(args.seed, S), args.lr, ds, args.batch, args.seed)

    def record(method: str, k: int, lost: nn.Module, p: Pipeline) -> None:
        if installs is not None:
            installs.append({"method": method, "stage": k, "lost": lost.state_dict(), "module": p.stages[k],
                             "installed": {kk: v.clone() for kk, v in p.stages[k].state_dict().items()}})

    t0 = time.perf_counter()
    ckpt, ckpt_step, ckpt_bytes, ckpt_s, ckpts = None, 0, 0, 0.0, 0
    for t in range(args.pretrain):
        if t % args.ckpt_every == 0:  # every stage uploads weights + optimizer to the store
            c0 = time.perf_counter()
            buf = io.BytesIO()
            torch.save({"stages": [s.state_dict() for s in pipe.stages], "opts": [o.state_dict() for o in pipe.opts]}, buf)
            ckpt, ckpt_step = buf.getvalue(), t
            ckpt_bytes += len(ckpt)
            ckpt_s += time.perf_counter() - c0
            ckpts += 1
        pipe.step(t)
    step_s = (time.perf_counter() - t0 - ckpt_s) / args.pretrain
    F = args.pretrain
    base = copy.deepcopy(pipe)
    cf = CheckFreeConfig()
    uniform_cf = CheckFreeConfig(exponent=0.0)  # w = 1 + eps on both sides: 0.5/0.5
    results: dict[str, list[dict[int, float]]] = {m: [] for m in METHODS}
    cf_bytes, cf_s, used_norms = [], [], []
    for k in range(1, S - 1):
        results["none"].append(continuation(copy.deepcopy(base), F, marks))
        plan = plan_recovery(k, S, cf)
        for name, rule, norms in (("checkfree", cf, base.norms), ("checkfree_body", cf, base.body_norms),
                                  ("uniform", uniform_cf, base.norms)):
            # download neighbours' bodies + norms, rebuild, fresh optimizer at lr x 1.1
            p = copy.deepcopy(base)
            r0 = time.perf_counter()
            neigh = {j: p.stages[j].state_dict() for j in plan.sources}
            state = rebuild_state(plan, p.stages[k].state_dict().keys(), neigh, {j: norms[j] for j in plan.sources},
                                  rule)
            _install(p, k, state, arch, args.lr, cf)
            if name == "checkfree":
                cf_s.append(time.perf_counter() - r0)
                cf_bytes.append(sum(state_bytes({kk: v for kk, v in neigh[j].items() if kk.startswith("blocks.")})
                                    for j in plan.sources))
                used_norms.append({j: (round(base.pre_norms[j], 3), round(base.norms[j], 3), round(base.body_norms[j], 3))
                                   for j in plan.sources})
            record(name, k, base.stages[k], p)
            results[name].append(continuation(p, F, marks))
        for name, make in (("random", lambda st: arch.stage_state(args.seed + 1000 + k, k, S)),
                           ("random_full", lambda st: reinit_full(st, args.seed + 2000 + k)),
                           ("skip", lambda st: skip_state(st, arch.residual))):
            p = copy.deepcopy(base)
            _install(p, k, make(p.stages[k]), arch, args.lr, cf)
            record(name, k, base.stages[k], p)
            results[name].append(continuation(p, F, marks))
        # --- checkpoint: global rollback to the last checkpoint, redo the lost steps' data
        p = copy.deepcopy(base)
        saved = torch.load(io.BytesIO(ckpt), weights_only=True)
        for s, o, sd, od in zip(p.stages, p.opts, saved["stages"], saved["opts"]):
            s.load_state_dict(sd)
            o.load_state_dict(od)
        results["checkpoint"].append(continuation(p, ckpt_step, marks))

    def mean(method: str, n: int) -> float:
        return sum(r[n] for r in results[method]) / len(results[method])

    def median(method: str, n: int) -> float:
        return statistics.median(r[n] for r in results[method])

    lost_steps = F - ckpt_step
    stage_state = state_bytes(base.stages[1].state_dict())
    report = {
        "arch": args.arch, "model": arch.model,
        "config": vars(args), "step_s": round(step_s, 5), "middle_stages": list(range(1, S - 1)),
        "loss": {m: {f"+{n}": round(mean(m, n), 4) for n in marks} for m in results},
        "median": {m: {f"+{n}": round(median(m, n), 4) for n in marks} for m in results},
        "ratio_to_none": {m: {f"+{n}": round(mean(m, n) / mean("none", n), 4) for n in marks} for m in results},
        "per_stage": {m: [{f"+{n}": round(r[n], 4) for n in marks} for r in results[m]] for m in results},
        "neighbour_norms_pre_post_clip": used_norms,
        "cost": {
            "checkfree": {"bytes_per_failure": int(sum(cf_bytes) / len(cf_bytes)),
                          "seconds_per_failure": round(sum(cf_s) / len(cf_s), 5), "lost_steps": 0,
                          "steady_state_bytes": 0},
            "checkpoint": {"bytes_per_failure": len(ckpt), "seconds_per_failure": round(lost_steps * step_s, 4),
                           "lost_steps": lost_steps, "steady_state_bytes": ckpt_bytes,
                           "steady_state_seconds": round(ckpt_s, 4), "checkpoints": ckpts},
        },
        "stage_state_bytes": stage_state,
    }
    report["gate_c2"] = {f"{c}_vs_{b}": gate(report["loss"], b, c) for c in ("checkfree", "checkfree_body")
                         for b in ("random", "random_full")}
    c = report["cost"]
    report["cost"]["bytes_ratio_checkfree_to_checkpoint"] = round(
        c["checkfree"]["bytes_per_failure"] / max(c["checkpoint"]["bytes_per_failure"] + ckpt_bytes, 1), 4)
    if args.edge:
        report["edge"] = edge_experiment(args, arch, ds, pipe_noswap=base, record=record)
    return report


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    ds = make_dataset(args)
    report = run(args, ds)
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print_report(report, args, ds)


def print_report(report: dict, args: argparse.Namespace, ds) -> None:
    S, F, marks = args.stages, args.pretrain, tuple(sorted({int(m) for m in args.marks.split(",")}))
    step_s, used_norms, c = report["step_s"], report["neighbour_norms_pre_post_clip"], report["cost"]
    ckpt_bytes, ckpts = c["checkpoint"]["steady_state_bytes"], c["checkpoint"]["checkpoints"]
    ckpt_s, lost_steps = c["checkpoint"]["steady_state_seconds"], c["checkpoint"]["lost_steps"]
    floor = f" (loss floor {ds.entropy():.3f})" if isinstance(ds, MarkovData) else ""
    model = ", ".join(f"{k} {v}" for k, v in report["model"].items() if k not in ("n_layer", "d_model"))
    print(f"arch {args.arch} ({model}); pipeline S={S}, n_layer={args.n_layer}, d={args.d_model}, "
          f"data {args.data}{floor}, lr {args.lr}; failure at step {F} of each middle stage "
          f"{report['middle_stages']}; {step_s * 1e3:.1f} ms/step")
    heads = " ".join(f"{'+' + str(n):>8}" for n in marks)
    print(f"{'method':<15} {heads}   ratio to none ({' / '.join('+' + str(n) for n in marks)})   median +0")
    for m in report["loss"]:
        lo, ra = report["loss"][m], report["ratio_to_none"][m]
        vals = " ".join(f"{lo['+' + str(n)]:>8.4f}" for n in marks)
        print(f"{m:<15} {vals}   {' / '.join(format(ra['+' + str(n)], '.3f') for n in marks)}   "
              f"{report['median'][m]['+0']:.4f}")
    print(f"neighbour grad norms (stage pre-clip, stage post-clip, body clipped) per failed stage: {used_norms}")
    for b, g in report["gate_c2"].items():
        print(f"recovery gate, {b.replace('_vs_', ' vs ')}: {'PASS' if g['pass'] else 'FAIL'} "
              + ", ".join(f"{k} {'ok' if v else 'no'}" for k, v in g["checks"].items()))
    print(f"checkfree recovery: {c['checkfree']['bytes_per_failure']} B downloaded (2 neighbour bodies), "
          f"{c['checkfree']['seconds_per_failure'] * 1e3:.2f} ms rebuild, 0 steps lost, 0 B while nothing fails")
    print(f"checkpoint (C={args.ckpt_every}): {c['checkpoint']['bytes_per_failure']} B restored per failure + "
          f"{ckpt_bytes} B uploaded in {ckpts} checkpoints ({ckpt_s:.3f} s); {lost_steps} steps redone "
          f"= {c['checkpoint']['seconds_per_failure']:.3f} s")
    print(f"bytes per failure, checkfree / checkpoint (incl. uploads): {c['bytes_ratio_checkfree_to_checkpoint']}")
    if args.edge:
        e = report["edge"]
        print(f"edge stage {S - 1} lost (head from the neighbour's copy in every case):")
        for pre in ("in_order", "with_swaps"):
            for m in ("none", "copy", "random"):
                lo = e[pre][m]
                print(f"  {pre:<10} {m:<7} " + " ".join(f"{lo['+' + str(n)]:>8.4f}" for n in marks))
            print(f"  {pre:<10} spike (copy +0 - none +0) = {e[pre]['spike']:.4f}")
        print(f"  swap schedule overhead (none with swaps - none in order, +0) = {e['swap_overhead']:.4f}")


def edge_experiment(args, arch: Arch, ds, pipe_noswap: Pipeline, record=None) -> dict:
    """CheckFree+: lose stage S-1, rebuild its body by copying stage S-2."""
    S, F = args.stages, args.pretrain
    swapped = Pipeline(arch.stages(args.seed, S), args.lr, ds, args.batch, args.seed, swaps=True)
    for t in range(F):
        swapped.step(t)
    out: dict = {}
    cf = CheckFreeConfig(swaps=True)
    for name, base in (("in_order", pipe_noswap), ("with_swaps", swapped)):
        marks = tuple(sorted({int(m) for m in args.marks.split(",")}))
        res = {"none": continuation(copy.deepcopy(base), F, marks)}
        for method in ("copy", "random"):
            p = copy.deepcopy(base)
            k = S - 1
            edge = {kk: v for kk, v in p.stages[k].state_dict().items() if not kk.startswith("blocks.")}
            if method == "copy":
                plan = plan_recovery(k, S, cf)
                state = rebuild_state(plan, p.stages[k].state_dict().keys(), {plan.sources[0]: p.stages[plan.sources[0]].state_dict()},
                                      {}, cf, edge_copy=edge)
            else:
                state = arch.stage_state(args.seed + 7, k, S)
                state.update(edge)
            fresh = arch.empty(k, S)
            fresh.load_state_dict(state)
            p.stages[k], p.opts[k] = fresh, fresh_optimizer(fresh.parameters(), args.lr, cf)
            if record is not None:
                record(f"edge_{name}_{method}", k, base.stages[k], p)
            res[method] = continuation(p, F, marks)
        out[name] = {m: {f"+{n}": round(v, 4) for n, v in r.items()} for m, r in res.items()}
        out[name]["spike"] = round(res["copy"][0] - res["none"][0], 4)
    out["swap_overhead"] = round(out["with_swaps"]["none"]["+0"] - out["in_order"]["none"]["+0"], 4)
    return out


if __name__ == "__main__":
    main()
