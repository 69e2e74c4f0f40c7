"""CheckFree vs random re-init vs checkpoint rollback after losing a middle pipeline stage.

Network-free: an in-process pipeline of the tiny byte GPT (node/model.py split_stages) on
the embedded corpus, one AdamW per stage, per-stage clipping at 1.0 (the post-clip norm is
what CheckFree weighs neighbours by). Every continuation starts from the same pretrained
state and sees the same batches (batch of step t is a function of (seed, t)), so the
comparison is paired.

For each middle stage k: pretrain F steps (a checkpoint of every stage, weights and
optimizer, is taken every C steps), lose stage k at step F, then continue 50 steps with:
  none        no failure (the baseline every ratio is against)
  checkfree   grad-norm weighted average of stages k-1, k+1; fresh optimizer; lr x 1.1
  random      stage k re-initialised from a fresh seed; fresh optimizer
  checkpoint  every stage rolled back to the last checkpoint (F - F mod C): F mod C steps
              of work are redone; its "+n" counts steps after the rollback
Prints eval loss at +0, +10, +50 (mean over the middle stages), the ratio to the
no-failure loss measured in this run, and the recovery cost: bytes moved and seconds.

    .venv/bin/python bench/bench_checkfree.py            # ~1 min on one thread
    .venv/bin/python bench/bench_checkfree.py --pretrain 600 --stages 6 --n-layer 6
"""
from __future__ import annotations

import argparse
import copy
import io
import json
import time

import torch

from swarm_node.data import ByteDataset, batch_generator_seed
from swarm_node.model import GPTConfig, PipelineStage, build_model, split_stages
from swarm_node.strategies.checkfree import (CheckFreeConfig, body_order, fresh_optimizer, plan_recovery,
                                             rebuild_state, state_bytes)

CLIP = 1.0


class Pipeline:
    """S stages + one optimizer per stage; `step(t)` trains on the batch of step t."""

    def __init__(self, stages: list[PipelineStage], lr: float, dataset: ByteDataset, batch: int, seed: int,
                 swaps: bool = False):
        self.stages, self.lr, self.dataset, self.batch, self.seed = stages, lr, dataset, batch, seed
        self.swaps = swaps  # CheckFree+: the batch is 2 micro-batches, the odd one runs swapped bodies
        self.opts = [torch.optim.AdamW(s.parameters(), lr=lr, betas=(0.9, 0.999)) for s in stages]
        self.norms = [0.0] * len(stages)  # post-clip grad norm of each stage's last step

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
            pre = float(torch.nn.utils.clip_grad_norm_(s.parameters(), CLIP))
            self.norms[k] = min(pre, CLIP)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", type=int, default=4)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3 * 3)
    ap.add_argument("--pretrain", type=int, default=430, help="failure step F")
    ap.add_argument("--ckpt-every", type=int, default=100, help="C of the checkpoint baseline")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--edge", action="store_true", help="also: lose the LAST stage after pretraining with and "
                    "without the CheckFree+ swap schedule; recover by copying stage S-2 (head from its copy)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    S = args.stages
    if S < 3:
        raise SystemExit("need >= 3 stages to have a middle stage")
    cfg = GPTConfig(n_layer=args.n_layer, n_head=4, d_model=args.d_model, seq_len=args.seq_len)
    ds = ByteDataset.from_source("stdlib", max_bytes=1 << 20)
    pipe = Pipeline(split_stages(build_model(cfg, args.seed), S), args.lr, ds, args.batch, args.seed)

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
    results: dict[str, list[dict[int, float]]] = {m: [] for m in ("none", "checkfree", "random", "checkpoint")}
    cf_bytes, cf_s = [], []
    for k in range(1, S - 1):
        results["none"].append(continuation(copy.deepcopy(base), F))
        # --- CheckFree: download neighbours' bodies + norms, rebuild, fresh optimizer at lr x 1.1
        p = copy.deepcopy(base)
        r0 = time.perf_counter()
        plan = plan_recovery(k, S, cf)
        neigh = {j: p.stages[j].state_dict() for j in plan.sources}
        state = rebuild_state(plan, p.stages[k].state_dict().keys(), neigh, {j: p.norms[j] for j in plan.sources}, cf)
        fresh = PipelineStage(cfg, k, S)
        fresh.load_state_dict(state)
        p.stages[k] = fresh
        p.opts[k] = fresh_optimizer(fresh.parameters(), args.lr, cf)
        cf_s.append(time.perf_counter() - r0)
        cf_bytes.append(sum(state_bytes({kk: v for kk, v in neigh[j].items() if kk.startswith("blocks.")})
                            for j in plan.sources))
        results["checkfree"].append(continuation(p, F))
        # --- random re-init
        p = copy.deepcopy(base)
        fresh = split_stages(build_model(cfg, args.seed + 1000 + k), S)[k]
        p.stages[k] = fresh
        p.opts[k] = torch.optim.AdamW(fresh.parameters(), lr=args.lr, betas=(0.9, 0.999))
        results["random"].append(continuation(p, F))
        # --- checkpoint: global rollback to the last checkpoint, redo the lost steps' data
        p = copy.deepcopy(base)
        saved = torch.load(io.BytesIO(ckpt), weights_only=True)
        for s, o, sd, od in zip(p.stages, p.opts, saved["stages"], saved["opts"]):
            s.load_state_dict(sd)
            o.load_state_dict(od)
        results["checkpoint"].append(continuation(p, ckpt_step))

    def mean(method: str, n: int) -> float:
        return sum(r[n] for r in results[method]) / len(results[method])

    lost_steps = F - ckpt_step
    stage_state = state_bytes(base.stages[1].state_dict())
    report = {
        "config": vars(args), "step_s": round(step_s, 5), "middle_stages": list(range(1, S - 1)),
        "loss": {m: {f"+{n}": round(mean(m, n), 4) for n in (0, 10, 50)} for m in results},
        "ratio_to_none": {m: {f"+{n}": round(mean(m, n) / mean("none", n), 4) for n in (0, 10, 50)} for m in results},
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
    c = report["cost"]
    report["cost"]["bytes_ratio_checkfree_to_checkpoint"] = round(
        c["checkfree"]["bytes_per_failure"] / max(c["checkpoint"]["bytes_per_failure"] + ckpt_bytes, 1), 4)
    if args.edge:
        report["edge"] = edge_experiment(args, cfg, ds, pipe_noswap=base)
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(f"pipeline S={S}, n_layer={args.n_layer}, d={args.d_model}; failure at step {F} of each middle stage "
          f"{report['middle_stages']}; {step_s * 1e3:.1f} ms/step")
    print(f"{'method':<11} {'+0':>8} {'+10':>8} {'+50':>8}   ratio to none (+0/+10/+50)")
    for m in results:
        lo, ra = report["loss"][m], report["ratio_to_none"][m]
        print(f"{m:<11} {lo['+0']:>8.4f} {lo['+10']:>8.4f} {lo['+50']:>8.4f}   "
              f"{ra['+0']:.3f} / {ra['+10']:.3f} / {ra['+50']:.3f}")
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
                print(f"  {pre:<10} {m:<7} {lo['+0']:>8.4f} {lo['+10']:>8.4f} {lo['+50']:>8.4f}")
            print(f"  {pre:<10} spike (copy +0 - none +0) = {e[pre]['spike']:.4f}")
        print(f"  swap schedule overhead (none with swaps - none in order, +0) = {e['swap_overhead']:.4f}")


def edge_experiment(args, cfg: GPTConfig, ds: ByteDataset, pipe_noswap: Pipeline) -> dict:
    """CheckFree+ (note §3): lose stage S-1, rebuild its body by copying stage S-2."""
    S, F = args.stages, args.pretrain
    swapped = Pipeline(split_stages(build_model(cfg, args.seed), S), args.lr, ds, args.batch, args.seed, swaps=True)
    for t in range(F):
        swapped.step(t)
    out: dict = {}
    cf = CheckFreeConfig(swaps=True)
    for name, base in (("in_order", pipe_noswap), ("with_swaps", swapped)):
        res = {"none": continuation(copy.deepcopy(base), F)}
        for method in ("copy", "random"):
            p = copy.deepcopy(base)
            k = S - 1
            edge = {kk: v for kk, v in p.stages[k].state_dict().items() if not kk.startswith("blocks.")}
            if method == "copy":
                plan = plan_recovery(k, S, cf)
                state = rebuild_state(plan, p.stages[k].state_dict().keys(), {plan.sources[0]: p.stages[plan.sources[0]].state_dict()},
                                      {}, cf, edge_copy=edge)
            else:
                state = split_stages(build_model(cfg, args.seed + 7), S)[k].state_dict()
                state.update(edge)
            fresh = PipelineStage(cfg, k, S)
            fresh.load_state_dict(state)
            p.stages[k], p.opts[k] = fresh, fresh_optimizer(fresh.parameters(), args.lr, cf)
            res[method] = continuation(p, F)
        out[name] = {m: {f"+{n}": round(v, 4) for n, v in r.items()} for m, r in res.items()}
        out[name]["spike"] = round(res["copy"][0] - res["none"][0], 4)
    out["swap_overhead"] = round(out["with_swaps"]["none"]["+0"] - out["in_order"]["none"]["+0"], 4)
    return out


if __name__ == "__main__":
    main()
