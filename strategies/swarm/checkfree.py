"""CheckFree / CheckFree+ stage recovery: rebuild a pipeline stage that lost every replica
from what its neighbours hold, with no checkpoint. Pure torch, no network; the live pipeline
(strategies/swarm/) and bench/bench_checkfree.py both call these functions.

Rules:
  * A stage's *body* is its transformer blocks (keys "blocks.*", the same shape on every
    stage); edge parts are the embedding (stage 0) and ln_f/lm_head (last stage).
  * Middle stage i (0 < i < S-1) -> "wavg": every float body tensor becomes
    (w_next * W[i+1] + w_prev * W[i-1]) / (w_next + w_prev), w = norm**exponent + eps with that
    neighbour's last gradient norm (post-clip by default); non-floats are copied from stage i-1.
  * Edge stage (0 or S-1) -> "copy" from its CheckFree+ swap partner (1 or S-2), only when the
    swap schedule was on (else the partner never learnt the edge role: `NotRecoverable`); edge
    parts come from the copy a neighbour keeps (`edge_copy`), else `NotRecoverable`.
  * The rebuilt stage gets a brand-new optimizer at base_lr * lr_scale (default 1.1), always
    from base_lr: the scale never compounds. Swap schedule: see `body_order`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch

BODY_PREFIX = "blocks."
METHODS = ("wavg", "copy")


class NotRecoverable(Exception):
    """The lost stage cannot be rebuilt from its neighbours under this configuration."""


@dataclass(frozen=True)
class CheckFreeConfig:
    exponent: float = 1.0  # w = norm**exponent + eps (the authors' code: 1; a summary says 2)
    eps: float = 1e-4
    lr_scale: float = 1.1  # recovered stage's lr = base lr * lr_scale
    swaps: bool = False  # CheckFree+: the swap schedule ran, so edge stages are recoverable

    def __post_init__(self) -> None:
        if not (math.isfinite(self.exponent) and self.exponent >= 0):
            raise ValueError(f"exponent must be finite and >= 0, got {self.exponent}")
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")
        if not self.lr_scale > 0:
            raise ValueError(f"lr_scale must be > 0, got {self.lr_scale}")


@dataclass(frozen=True)
class RecoveryPlan:
    stage: int
    method: str  # "wavg" | "copy"
    sources: tuple[int, ...]  # wavg: (prev, next); copy: (partner,)


def is_body_key(key: str) -> bool:
    return key.startswith(BODY_PREFIX)


def neighbour_weight(norm: float, cfg: CheckFreeConfig) -> float:
    if not math.isfinite(norm) or norm < 0:
        raise ValueError(f"gradient norm must be finite and >= 0, got {norm}")
    return norm ** cfg.exponent + cfg.eps


def swap_partner(stage: int, num_stages: int) -> int | None:
    """The stage whose body runs in `stage`'s place on swapped micro-batches (None: never swapped)."""
    if num_stages < 2:
        return None
    if stage == 0:
        return 1
    if stage == num_stages - 1:
        return num_stages - 2
    return None


def plan_recovery(stage: int, num_stages: int, cfg: CheckFreeConfig) -> RecoveryPlan:
    if not 0 <= stage < num_stages:
        raise ValueError(f"stage {stage} out of range for {num_stages} stages")
    if 0 < stage < num_stages - 1:
        return RecoveryPlan(stage, "wavg", (stage - 1, stage + 1))
    partner = swap_partner(stage, num_stages)
    if partner is None:
        raise NotRecoverable("a single-stage pipeline has no neighbour to rebuild from")
    if not cfg.swaps:
        raise NotRecoverable(f"edge stage {stage} has one neighbour; it is recoverable only with the CheckFree+ "
                             "swap schedule (swaps=True)")
    return RecoveryPlan(stage, "copy", (partner,))


def weighted_average(prev: Mapping[str, torch.Tensor], nxt: Mapping[str, torch.Tensor], prev_norm: float,
                     next_norm: float, cfg: CheckFreeConfig, keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """(w_next*next + w_prev*prev)/(w_next + w_prev) over `keys` (default: prev's keys).
    Accumulates in float64 and casts back, so the result equals the formula to fp32 rounding."""
    w_prev, w_next = neighbour_weight(prev_norm, cfg), neighbour_weight(next_norm, cfg)
    total = w_prev + w_next
    out: dict[str, torch.Tensor] = {}
    for k in (list(keys) if keys is not None else list(prev)):
        if k not in prev or k not in nxt:
            raise NotRecoverable(f"neighbour states disagree: {k!r} missing")
        a, b = prev[k], nxt[k]
        if a.shape != b.shape:
            raise NotRecoverable(f"{k}: neighbour shapes differ {tuple(a.shape)} vs {tuple(b.shape)}")
        if a.is_floating_point():
            mixed = (w_next * b.detach().double() + w_prev * a.detach().double()) / total
            out[k] = mixed.to(a.dtype)
        else:
            out[k] = a.detach().clone()  # counters, masks: nothing meaningful to average
    return out


def body_of(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if is_body_key(k)}


def rebuild_state(plan: RecoveryPlan, template_keys: Iterable[str], neighbours: Mapping[int, Mapping[str, torch.Tensor]],
                  norms: Mapping[int, float], cfg: CheckFreeConfig,
                  edge_copy: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The lost stage's full state dict: body per `plan`, edge keys from `edge_copy`.
    `neighbours[j]` is stage j's state dict (at least its body); `norms[j]` its last grad norm."""
    keys = list(template_keys)
    body_keys = [k for k in keys if is_body_key(k)]
    for j in plan.sources:
        if j not in neighbours:
            raise NotRecoverable(f"stage {plan.stage}: neighbour stage {j}'s weights are not available")
    if plan.method == "wavg":
        p, n = plan.sources
        for j in plan.sources:
            if j not in norms:
                raise NotRecoverable(f"stage {plan.stage}: neighbour stage {j}'s gradient norm is not available")
        state = weighted_average(neighbours[p], neighbours[n], norms[p], norms[n], cfg, body_keys)
    elif plan.method == "copy":
        src = neighbours[plan.sources[0]]
        missing = [k for k in body_keys if k not in src]
        if missing:
            raise NotRecoverable(f"partner stage lacks {missing[0]!r}")
        state = {k: src[k].detach().clone() for k in body_keys}
    else:
        raise ValueError(f"unknown recovery method {plan.method!r}")
    edge_keys = [k for k in keys if not is_body_key(k)]
    if edge_keys:
        if edge_copy is None or any(k not in edge_copy for k in edge_keys):
            raise NotRecoverable(f"stage {plan.stage}: no copy of its edge parts ({edge_keys[0]!r}, ...) is held by a "
                                 "neighbour")
        state.update({k: edge_copy[k].detach().clone() for k in edge_keys})
    return state


def fresh_optimizer(params: Iterable[torch.nn.Parameter], base_lr: float, cfg: CheckFreeConfig, *,
                    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                    weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """A brand-new AdamW (no moments carried over) at base_lr * lr_scale."""
    return torch.optim.AdamW(list(params), lr=base_lr * cfg.lr_scale, betas=betas, eps=eps, weight_decay=weight_decay)


def body_order(num_stages: int, microbatch: int, swaps: bool) -> list[int]:
    """Which stage's body runs at each body position for this micro-batch. CheckFree+ swap
    schedule: on odd micro-batches the bodies of stages 0<->1 and S-2<->S-1 run in swapped
    order. With S == 3 the two pairs overlap, so odd micro-batches alternate between them
    (mb 1, 5, 9.. swap the first pair; 3, 7, .. the last)."""
    order = list(range(num_stages))
    if not swaps or num_stages < 2 or microbatch % 2 == 0:
        return order
    pairs = [(0, 1)]
    if num_stages - 2 > 0:
        pairs.append((num_stages - 2, num_stages - 1))
    if num_stages == 3:  # (0,1) and (1,2) share stage 1: alternate them on odd micro-batches
        pairs = [pairs[(microbatch // 2) % 2]]
    for a, b in pairs:
        order[a], order[b] = order[b], order[a]
    return order


def swapped_pairs(num_stages: int, microbatch: int, swaps: bool) -> list[str]:
    """Which swap pairs `body_order` swaps for this micro-batch: "first" (0<->1), "last"
    (S-2<->S-1; with S == 2 the one pair is called "first")."""
    order = body_order(num_stages, microbatch, swaps)
    out = ["first"] if num_stages >= 2 and order[0] != 0 else []
    if num_stages > 2 and order[-1] != num_stages - 1:
        out.append("last")
    return out


def stage_route(num_stages: int, microbatch: int, swaps: bool) -> list[tuple[int, str]]:
    """The calls one micro-batch makes, in forward order, as (stage, part): stage 0's
    embedding, every body in `body_order`, the last stage's head, with consecutive pieces of
    one stage merged (a stage run whole is "full"). Without swaps this is
    [(0, "full"), (1, "full"), ..., (S-1, "full")]; a swapped last pair reads
    ..., (S-1, "body"), (S-2, "full"), (S-1, "head")."""
    if num_stages < 1:
        raise ValueError(f"need at least one stage, got {num_stages}")
    last = num_stages - 1
    pieces = [(0, "embed"), *((j, "body") for j in body_order(num_stages, microbatch, swaps)), (last, "head")]
    groups: list[tuple[int, list[str]]] = []
    for k, part in pieces:
        if groups and groups[-1][0] == k:
            groups[-1][1].append(part)
        else:
            groups.append((k, [part]))
    route = []
    for k, parts in groups:
        whole = [p for p, has in (("embed", k == 0), ("body", True), ("head", k == last)) if has]
        if parts == whole:
            route.append((k, "full"))
        elif len(parts) == 1:
            route.append((k, parts[0]))
        else:  # body_order only swaps adjacent bodies, so a stage is never split another way
            raise AssertionError(f"stage {k} split into {parts}")
    return route


def state_bytes(state: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


__all__ = ["CheckFreeConfig", "NotRecoverable", "RecoveryPlan", "body_of", "body_order", "fresh_optimizer",
           "neighbour_weight", "plan_recovery", "rebuild_state", "stage_route", "state_bytes", "swap_partner",
           "swapped_pairs", "weighted_average"]
