"""In-process reference for the DiLoCo family: the same outer math as the live strategies,
with N replicas stepped in one process and no transport, to calibrate the loss targets.

Each configuration trains N `LocalTrainer` replicas (peer i draws batch stream i) on the
node's default model and data for the same number of local steps, then reports the mean
held-out loss and g = (L_solo - L_x) / (L_solo - L_sync), the fraction of the solo-to-sync
gap each strategy closes. The outer updates are the functions the strategies call
(`OuterOptimizer`, `noloco_update`, `merge`, the fragment schedule), so a gap here is a
property of the algorithm and its hyperparameters at this scale, not of the transport; the
live bench (`bench_strategies.py`) at the same settings should land within ±0.05 nats.
Targets (on 2000 steps, cosine LR, 4 replicas): DiLoCo H=10 g >= 0.85; DiLoCo H=50 and
Streaming g >= 0.5; NoLoCo g >= DiLoCo g - 0.15 at the same H and momentum.

  .venv/bin/python bench/ref_diloco.py [--steps 2000] [--replicas 4] [--schedule cosine] [--only sync diloco-h10]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass

import torch

from swarm_node.train.data import ByteDataset
from swarm_node.train.model import GPTConfig
from swarm_node.train.trainer import LocalTrainer, TrainConfig, build_trainer
from swarm_node.strategies.lowcomm.outer_math import (OuterOptimizer, fragment_due, layer_fragments, merge, noloco_update,
                                              pair_peers, pseudo_gradient, weighted_mean)


@dataclass(frozen=True)
class Config:
    kind: str  # solo | sync | diloco | streaming | noloco
    H: int = 1
    momentum: float = 0.9
    P: int = 1
    tau: int = 0
    alpha: float = 0.0


CONFIGS: dict[str, Config] = {
    "solo": Config("solo"),
    "sync": Config("sync"),
    "diloco-h10": Config("diloco", 10),
    "diloco-h10-m0.5": Config("diloco", 10, 0.5),
    "diloco-h50": Config("diloco", 50),
    "diloco-h50-m0.5": Config("diloco", 50, 0.5),
    "streaming-h50-p5": Config("streaming", 50, P=5, tau=2, alpha=0.5),
    "noloco-h50-m0.5": Config("noloco", 50, 0.5),
}


class Replicas:
    def __init__(self, n: int, args: argparse.Namespace, dataset: ByteDataset):
        model_cfg = GPTConfig(vocab_size=256, seq_len=args.seq_len, n_layer=args.n_layer, n_head=args.n_head,
                              d_model=args.d_model)
        # the trainer applies the schedule itself, from its step count, as in a live node
        train_cfg = TrainConfig(lr=args.lr, batch_size=args.batch_size, seed=args.seed, lr_schedule=args.schedule,
                                warmup_steps=args.warmup if args.schedule == "cosine" else 0, total_steps=args.steps)
        self.trainers: list[LocalTrainer] = [build_trainer(model_cfg, train_cfg, dataset, peer=i) for i in range(n)]
        self.args = args

    def params(self, i: int) -> list[torch.Tensor]:
        return [p.detach().float().clone() for p in self.trainers[i].parameters_list()]

    def load(self, i: int, values: list[torch.Tensor], idx: list[int] | None = None) -> None:
        ps = self.trainers[i].parameters_list()
        with torch.no_grad():
            for j, v in zip(idx if idx is not None else range(len(ps)), values):
                ps[j].copy_(v)

    def val(self) -> float:
        return sum(t.evaluate(max_batches=self.args.eval_batches) for t in self.trainers) / len(self.trainers)


def run(cfg: Config, args: argparse.Namespace, dataset: ByteDataset) -> float:
    n = 1 if cfg.kind == "solo" else args.replicas
    reps = Replicas(n, args, dataset)
    T = args.steps
    if cfg.kind in ("solo",):
        for s in range(T):
            reps.trainers[0].train_step()
        return reps.val()
    if cfg.kind == "sync":  # data parallel: the mean gradient applied on every replica
        for s in range(T):
            results = [t.compute_gradients(s) for t in reps.trainers]
            mean = weighted_mean((r.grads, 1.0) for r in results)
            for t in reps.trainers:
                t.apply_gradients(mean)
        return reps.val()
    phi0 = reps.params(0)
    for i in range(1, n):
        reps.load(i, phi0)
    if cfg.kind == "diloco":
        outer = OuterOptimizer(phi0, lr=args.outer_lr, momentum=cfg.momentum, nesterov=True)
        for s in range(1, T + 1):
            for t in reps.trainers:
                t.train_step()
            if s % cfg.H == 0:
                mean = weighted_mean((pseudo_gradient(outer.phi, reps.params(i)), 1.0) for i in range(n))
                phi = outer.step(mean)
                for i in range(n):
                    reps.load(i, phi)
        return reps.val()
    if cfg.kind == "streaming":
        frags = layer_fragments(reps.trainers[0].parameter_names(), [p.numel() for p in phi0], cfg.P)
        phi = [p.clone() for p in phi0]
        outers = [OuterOptimizer([phi[j] for j in idx], lr=args.outer_lr, momentum=cfg.momentum, nesterov=True)
                  for idx in frags]
        pending: dict[int, tuple[int, list[torch.Tensor]]] = {}  # apply step -> (fragment, mean Δ)
        for s in range(1, T + 1):
            for t in reps.trainers:
                t.train_step()
            f = fragment_due(s, cfg.H, cfg.P)
            if f is not None:  # the mean Δ of the θ at send time, applied τ steps later
                idx = frags[f]
                mean = weighted_mean((pseudo_gradient([phi[j] for j in idx], [reps.params(i)[j] for j in idx]), 1.0)
                                     for i in range(n))
                pending[s + cfg.tau] = (f, mean)
            if s in pending:
                f, mean = pending.pop(s)
                idx = frags[f]
                new_phi = outers[f].step(mean)
                for j, v in zip(idx, new_phi):
                    phi[j] = v
                for i in range(n):
                    theta = [reps.params(i)[j] for j in idx]
                    reps.load(i, merge(theta, new_phi, cfg.alpha), idx)
        return reps.val()
    if cfg.kind == "noloco":
        phis = [[p.clone() for p in phi0] for _ in range(n)]
        moms: list[list[torch.Tensor] | None] = [None] * n
        ids = [f"p{i}" for i in range(n)]
        for s in range(1, T + 1):
            for t in reps.trainers:
                t.train_step()
            if s % cfg.H == 0:
                partner = pair_peers(ids, s // cfg.H)
                thetas = [reps.params(i) for i in range(n)]
                for i in range(n):
                    j = partner[ids[i]]
                    if j is None:
                        continue
                    j = ids.index(j)
                    phis[i], moms[i] = noloco_update(phis[i], moms[i], [phis[i], phis[i]], [thetas[i], thetas[j]],
                                                     lr=args.outer_lr, gamma=args.outer_lr, beta=cfg.momentum)
                    reps.load(i, phis[i])
        return reps.val()
    raise ValueError(cfg.kind)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--replicas", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--outer-lr", type=float, default=0.7)
    ap.add_argument("--schedule", choices=["constant", "cosine"], default="cosine")
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--n-layer", type=int, default=1)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--data-max-bytes", type=int, default=600_000)
    ap.add_argument("--eval-batches", type=int, default=8)  # as a node evaluates
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", nargs="*", choices=sorted(CONFIGS))
    ap.add_argument("--json")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    dataset = ByteDataset.from_source("stdlib", max_bytes=args.data_max_bytes)
    names = args.only or list(CONFIGS)
    for need in ("solo", "sync"):
        if need not in names:
            names.insert(0, need)
    print(f"{args.replicas} replicas, {args.steps} steps, lr {args.lr} {args.schedule}, outer lr {args.outer_lr}, "
          f"batch {args.batch_size}, seed {args.seed}", flush=True)
    losses: dict[str, float] = {}
    for name in names:
        t0 = time.perf_counter()
        losses[name] = run(CONFIGS[name], args, dataset)
        print(f"  {name:18s} val {losses[name]:.3f}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    gap = losses["solo"] - losses["sync"]
    print(f"\n{'config':18s} {'val':>6s} {'g':>6s}")
    rows = {}
    for name, loss in losses.items():
        g = (losses["solo"] - loss) / gap if gap > 0 else float("nan")
        rows[name] = {"val": loss, "g": g}
        print(f"{name:18s} {loss:6.3f} {g:6.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
