"""SAPO math: group advantages, the GRPO clipped objective, the I+J training-set builder, guards.

Pure functions over tensors and plain records; no network, no model.

- Advantages: A = r - mean(group), divided by (std(group) + eps) when `normalize_std` (the
  population std, as GRPO does). A group whose rewards are all equal has A = 0 exactly.
- External negatives: advantages < 0 of *external* groups are multiplied by `negative_scale`
  (default 0.0: pushing down foreign wrong answers this node never samples moves mass to tokens
  nobody samples, which made a small prototype worse; 1.0 is the paper).
- GRPO objective (no KL term): per token, -min(ratio * A, clip(ratio, 1 - eps_low,
  1 + eps_high) * A) with ratio = exp(logp_new - logp_old), averaged over valid tokens;
  each token's loss is clamped to [-10, 10] so one wild ratio cannot dominate a step.
- Builder: exactly I own groups plus up to J eligible external ones (`build_training_set`).
- Guards: a step whose advantages are all zero, or whose loss or gradients are non-finite,
  is skipped (the caller leaves parameters untouched).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Sequence

import torch

CLIP_LOW, CLIP_HIGH = 0.2, 0.28
TOKEN_LOSS_CLAMP = 10.0


def group_advantages(rewards: torch.Tensor, *, normalize_std: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """rewards [N, G] -> advantages [N, G]."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [groups, G], got shape {tuple(rewards.shape)}")
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    if not normalize_std:
        return centered
    std = rewards.std(dim=1, unbiased=False, keepdim=True)
    return centered / (std + eps)


def scale_external_negatives(adv: torch.Tensor, external: torch.Tensor, scale: float) -> torch.Tensor:
    """adv [N, G], external [N] bool -> adv with negative entries of external rows times `scale`."""
    factor = torch.where((adv < 0) & external[:, None], torch.as_tensor(scale, dtype=adv.dtype), torch.ones_like(adv))
    return adv * factor


def grpo_loss(logp_new: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, *,
              clip_low: float = CLIP_LOW, clip_high: float = CLIP_HIGH) -> torch.Tensor:
    """Token-mean clipped surrogate. logp_* and mask: [B, T]; adv: [B] (one per sequence)."""
    ratio = torch.exp(logp_new - logp_old)
    a = adv[:, None]
    surrogate = torch.minimum(ratio * a, torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * a)
    per_token = torch.clamp(-surrogate, -TOKEN_LOSS_CLAMP, TOKEN_LOSS_CLAMP)
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp_min(1.0)


def all_zero(adv: torch.Tensor) -> bool:
    return bool((adv == 0).all())


def finite_grads(grads: Sequence[torch.Tensor | None]) -> bool:
    return all(g is None or bool(torch.isfinite(g).all()) for g in grads)


# ---- training-set builder --------------------------------------------------------------
@dataclass(frozen=True)
class ScoredGroup:
    """A group scored by THIS node's verifier."""

    sender: str
    group_id: str
    task_key: tuple[str, int, int]  # (task, seed, index)
    prompt: str
    completions: tuple[str, ...]
    rewards: tuple[float, ...]
    external: bool

    @property
    def zero_variance(self) -> bool:
        return max(self.rewards) - min(self.rewards) <= 1e-12


@dataclass
class TrainingSet:
    groups: list[ScoredGroup] = field(default_factory=list)
    local_used: int = 0
    external_used: int = 0
    dropped_zero_variance: int = 0
    dropped_own: int = 0
    dropped_duplicate: int = 0
    shortfall: int = 0  # J minus external groups used


def pick_local(local: Sequence[ScoredGroup], num_local: int, rng: random.Random,
               local_select: str = "informative") -> list[ScoredGroup]:
    """`num_local` of the node's own Q >= I groups. With `local_select="informative"`
    (default), drawn uniformly from the groups with non-zero reward variance, padded in order
    with zero-variance ones when fewer than I are informative (the same filter as for external
    groups: a zero-variance group has A = 0 and teaches nothing); with "first", the first I.
    With I = Q both are all of them."""
    if len(local) < num_local:
        raise ValueError(f"{len(local)} local groups given, I = {num_local}")
    if local_select == "first" or num_local == len(local):
        return list(local[:num_local])
    if local_select != "informative":
        raise ValueError(f"local_select must be 'informative' or 'first', not {local_select!r}")
    informative = [g for g in local if not g.zero_variance]
    picked = rng.sample(informative, min(num_local, len(informative)))
    return picked + [g for g in local if g.zero_variance][: num_local - len(picked)]


def build_training_set(local: Sequence[ScoredGroup], external: Sequence[ScoredGroup], *, my_peer_id: str,
                       num_local: int, num_external: int, rng: random.Random,
                       local_select: str = "informative") -> TrainingSet:
    """Exactly `num_local` local groups (`pick_local`) + up to `num_external` eligible
    external groups drawn uniformly without replacement. Eligible: not from this node, not a
    duplicate (same group id, or same sender and task triple), and with non-zero reward
    variance *under this node's verifier* (the caller scores them; the sender's rewards are
    never seen). Fewer than `num_external` eligible is a counted shortfall."""
    ts = TrainingSet(groups=pick_local(local, num_local, rng, local_select), local_used=num_local)
    seen_ids = {g.group_id for g in ts.groups}
    seen_keys = {(g.sender, g.task_key) for g in ts.groups}
    eligible: list[ScoredGroup] = []
    for g in external:
        if g.sender == my_peer_id:
            ts.dropped_own += 1
        elif g.group_id in seen_ids or (g.sender, g.task_key) in seen_keys:
            ts.dropped_duplicate += 1
        elif g.zero_variance:
            ts.dropped_zero_variance += 1
        else:
            eligible.append(g)
        seen_ids.add(g.group_id)
        seen_keys.add((g.sender, g.task_key))
    picked = rng.sample(eligible, min(num_external, len(eligible))) if num_external > 0 else []
    ts.groups += [ScoredGroup(g.sender, g.group_id, g.task_key, g.prompt, g.completions, g.rewards, True)
                  for g in picked]
    ts.external_used = len(picked)
    ts.shortfall = num_external - len(picked)
    return ts


def training_advantages(ts: TrainingSet, *, negative_scale: float, normalize_std: bool = True) -> torch.Tensor:
    """[N, G] advantages of a training set, external negatives scaled."""
    if not ts.groups:
        return torch.zeros(0, 0)
    rewards = torch.tensor([g.rewards for g in ts.groups], dtype=torch.float32)
    adv = group_advantages(rewards, normalize_std=normalize_std)
    external = torch.tensor([g.external for g in ts.groups], dtype=torch.bool)
    out = scale_external_negatives(adv, external, negative_scale)
    assert math.isfinite(float(out.abs().sum()))
    return out
