"""Pure tensor math of the DiLoCo family (DiLoCo, Streaming DiLoCo, NoLoCo): no network, no I/O.

Every function works on lists of tensors (one entry per parameter, in a fixed order that all
peers share) and returns fresh fp32 CPU tensors; the round drivers map it onto a transport.
Invariants
  * Sign: the pseudo-gradient is Delta = phi - theta (outer weights minus the weights after the
    local steps). It points uphill, so outer steps SUBTRACT it.
  * fp32 everywhere: inputs of any float dtype/device are read as fp32 CPU values and every
    sum is accumulated in fp32. Never in place: no input is mutated and no result aliases one.
  * Bit-reproducible: results depend only on the input values and their order. Our arithmetic
    uses separate elementwise mul/add/sub/div kernels (no `alpha=`, lerp or addcmul, which may
    fuse into FMAs), so each element is a chain of correctly rounded IEEE fp32 operations;
    `OuterOptimizer` delegates to `torch.optim.SGD` (foreach=False), outside this guarantee.
    Order matters for the last bit of a mean: members pass contributions in the same order.
  * Means divide by the sum of the weights and skip weight-0 contributions entirely.
"""
from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from swarm_node.protocol.averaging.mean import as_f32 as _f32
from swarm_node.protocol.averaging.mean import check_scalar as _check_scalar
from swarm_node.protocol.averaging.mean import check_same_shapes as _check_pair
from swarm_node.protocol.averaging.mean import weighted_mean

__all__ = [
    "pseudo_gradient",
    "weighted_mean",
    "OuterOptimizer",
    "heavy_ball_step",
    "noloco_update",
    "replica_spread",
    "pairing_seed",
    "pair_peers",
    "layer_fragments",
    "validate_streaming",
    "fragment_due",
    "fragment_apply_due",
    "merge",
    "round_digest",
]


# ---------------------------------------------------------------------------- helpers


# ---------------------------------------------------------------------------- DiLoCo


def pseudo_gradient(phi: Sequence[Tensor], theta: Sequence[Tensor]) -> list[Tensor]:
    """Delta = phi - theta per tensor, as new fp32 CPU tensors."""
    _check_pair(phi, theta, "pseudo_gradient(phi, theta)")
    return [_f32(p) - _f32(t) for p, t in zip(phi, theta)]


class OuterOptimizer:
    """`torch.optim.SGD` over private fp32 CPU copies of phi (DiLoCo's outer step).

    `step(mean_delta)` uses the averaged pseudo-gradient as phi's gradient and returns the
    new phi (fresh copies). With the defaults (lr 0.7, momentum 0.9, Nesterov) this is
    PyTorch's Nesterov form: b <- mu*b + g (b = g at the first step), phi <- phi - lr*(g + mu*b).
    `state_dict()` holds phi and the momentum buffers (deep copies): loading it into an
    optimizer built over tensors of the same shapes continues bit-identically.
    """

    def __init__(self, phi: Sequence[Tensor], *, lr: float = 0.7, momentum: float = 0.9, nesterov: bool = True):
        if not phi:
            raise ValueError("OuterOptimizer needs at least one tensor")
        self._phi = [_f32(p).clone() for p in phi]
        # momentum 0 is plain SGD on the pseudo-gradient (lr 1: plain averaging); Nesterov has no
        # meaning there, and torch refuses the combination
        self._opt = torch.optim.SGD(self._phi, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0,
                                    dampening=0.0, weight_decay=0.0, foreach=False)

    @property
    def phi(self) -> list[Tensor]:
        """Copies of the current outer weights."""
        return [p.clone() for p in self._phi]

    @property
    def hyperparameters(self) -> dict[str, Any]:
        g = self._opt.param_groups[0]
        return {"lr": g["lr"], "momentum": g["momentum"], "nesterov": g["nesterov"]}

    def step(self, mean_delta: Sequence[Tensor]) -> list[Tensor]:
        """One outer step with gradient `mean_delta` (not modified); returns the new phi."""
        _check_pair(self._phi, mean_delta, "OuterOptimizer.step(mean_delta)")
        grads = [_f32(d) for d in mean_delta]
        if not all(bool(torch.isfinite(g).all()) for g in grads):
            raise ValueError("OuterOptimizer.step: mean_delta holds NaN/inf")
        for p, g in zip(self._phi, grads):
            p.grad = g  # SGD (weight_decay 0, no maximize) reads grad without writing it
        try:
            self._opt.step()
        finally:
            for p in self._phi:
                p.grad = None
        return self.phi

    def state_dict(self) -> dict[str, Any]:
        return {"phi": self.phi, "optimizer": copy.deepcopy(self._opt.state_dict())}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore phi, momentum buffers and hyperparameters (deep copies: the caller's
        dict is never aliased, so it stays a valid snapshot)."""
        phi = list(state["phi"])
        _check_pair(self._phi, phi, "OuterOptimizer.load_state_dict(phi)")
        opt_state = copy.deepcopy(state["optimizer"])
        for idx, buf in opt_state.get("state", {}).items():  # validate before touching anything
            if not (isinstance(idx, int) and 0 <= idx < len(self._phi)):
                raise ValueError(f"OuterOptimizer.load_state_dict: state for unknown tensor {idx!r}")
            mb = buf.get("momentum_buffer")
            if mb is not None and (not isinstance(mb, Tensor) or mb.shape != self._phi[idx].shape):
                raise ValueError(f"OuterOptimizer.load_state_dict: bad momentum buffer for tensor {idx}")
        self._opt.load_state_dict(opt_state)  # checks group/param counts, casts to fp32 CPU
        with torch.no_grad():
            for p, src in zip(self._phi, phi):
                p.copy_(_f32(src))


def heavy_ball_step(
    phi: Sequence[Tensor],
    momentum: Sequence[Tensor] | None,
    mean_delta: Sequence[Tensor],
    *,
    lr: float,
    beta: float,
) -> tuple[list[Tensor], list[Tensor]]:
    """Heavy-ball outer step in NoLoCo's form: delta <- beta*delta - lr*mean_delta; phi <- phi + delta.

    `momentum` is the previous delta (None = zeros, the first round). Returns
    (new_phi, new_delta). Equals SGD(momentum=beta, nesterov=False) up to rounding.
    """
    _check_pair(phi, mean_delta, "heavy_ball_step(phi, mean_delta)")
    mom = _momentum_or_zeros(phi, momentum, "heavy_ball_step")
    new_mom = [m * beta - _f32(d) * lr for m, d in zip(mom, mean_delta)]
    return [_f32(p) + m for p, m in zip(phi, new_mom)], new_mom


def _momentum_or_zeros(phi: Sequence[Tensor], momentum: Sequence[Tensor] | None, what: str) -> list[Tensor]:
    if momentum is None:
        return [torch.zeros(p.shape, dtype=torch.float32) for p in phi]
    _check_pair(phi, momentum, f"{what}(phi, momentum)")
    return [_f32(m) for m in momentum]


# ---------------------------------------------------------------------------- NoLoCo


def noloco_update(
    phi_i: Sequence[Tensor],
    delta_i_momentum: Sequence[Tensor] | None,
    group_phis: Sequence[Sequence[Tensor]],
    group_thetas: Sequence[Sequence[Tensor]],
    *,
    lr: float,
    gamma: float,
    beta: float,
) -> tuple[list[Tensor], list[Tensor]]:
    """One NoLoCo outer step of peer i; returns (new_phi_i, new_delta_i).

    delta_i <- beta*delta_i - lr*mean_j(phi_j - theta_j) - gamma*(phi_i - mean_j phi_j); phi_i <- phi_i + delta_i.
    `group_phis` / `group_thetas` list the WHOLE group G (peer i included), in the same
    order on every member. `delta_i_momentum` None = zeros. The consensus term is
    computed as mean_j(phi_i - phi_j), which equals phi_i - mean_j phi_j and is exactly 0
    when every phi_j equals phi_i: with G = all peers (identical phi) this is bit for bit
    `heavy_ball_step` with mean_delta = weighted_mean of the pseudo-gradients (weights 1).
    """
    if not group_phis or len(group_phis) != len(group_thetas):
        raise ValueError(f"noloco_update: {len(group_phis)} phis vs {len(group_thetas)} thetas (need >= 1)")
    mom = _momentum_or_zeros(phi_i, delta_i_momentum, "noloco_update")
    mean_delta = weighted_mean((pseudo_gradient(p, t), 1.0) for p, t in zip(group_phis, group_thetas))
    consensus = weighted_mean((pseudo_gradient(phi_i, p), 1.0) for p in group_phis)
    _check_pair(phi_i, mean_delta, "noloco_update(phi_i, group)")
    new_mom = [m * beta - d * lr - c * gamma for m, d, c in zip(mom, mean_delta, consensus)]
    return [_f32(p) + m for p, m in zip(phi_i, new_mom)], new_mom


def replica_spread(replicas: Sequence[Sequence[Tensor]]) -> float:
    """NoLoCo's divergence metric: RMS over all elements of the (population) standard
    deviation across replicas. Computed in float64, where means of fp32 values over up to
    2^29 replicas are exact, so bit-identical replicas give exactly 0.0."""
    if not replicas:
        raise ValueError("replica_spread of no replicas")
    for r in replicas[1:]:
        _check_pair(replicas[0], r, "replica_spread")
    sq, n = 0.0, 0
    for i in range(len(replicas[0])):
        stack = torch.stack([r[i].detach().to("cpu", torch.float64) for r in replicas])
        sq += float(((stack - stack.mean(dim=0)) ** 2).mean(dim=0).sum())
        n += stack[0].numel()
    return math.sqrt(sq / n) if n else 0.0


def pairing_seed(run_id: str, round_index: int) -> int:
    """Seed for `pair_peers`: the first 8 bytes (big-endian) of
    sha256("swarm-node/noloco-pairing/v1|<run_id>|<round_index>")."""
    blob = f"swarm-node/noloco-pairing/v1|{run_id}|{int(round_index)}".encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "big")


def _uniform_below(seed: int, i: int, bound: int) -> int:
    """Uniform integer in [0, bound) drawn from sha256(seed, i, counter), rejection-sampled
    (no modulo bias)."""
    limit = (1 << 64) - (1 << 64) % bound
    counter = 0
    while True:
        digest = hashlib.sha256(f"swarm-node/pairing-draw/v1|{seed}|{i}|{counter}".encode()).digest()
        value = int.from_bytes(digest[:8], "big")
        if value < limit:
            return value % bound
        counter += 1


def pair_peers(sorted_peer_ids: Sequence[str], round_seed: int) -> dict[str, str | None]:
    """A seeded random perfect matching that every peer computes identically, without messages.

    The ids are sorted here (so the caller's order is irrelevant) and must be unique. A
    Fisher-Yates shuffle whose i-th draw (i = n-1 .. 1) is `_uniform_below(round_seed, i,
    i + 1)` permutes them; positions (0,1), (2,3), ... are partners, and with an odd count
    the last one maps to None (it skips the round). Use `pairing_seed(run_id, round)`.
    """
    ids = sorted(sorted_peer_ids)
    if len(set(ids)) != len(ids):
        raise ValueError("pair_peers: duplicate peer ids")
    perm = list(ids)
    for i in range(len(perm) - 1, 0, -1):
        j = _uniform_below(round_seed, i, i + 1)
        perm[i], perm[j] = perm[j], perm[i]
    partner: dict[str, str | None] = {}
    for k in range(0, len(perm) - 1, 2):
        a, b = perm[k], perm[k + 1]
        partner[a], partner[b] = b, a
    if len(perm) % 2:
        partner[perm[-1]] = None
    return partner


# ---------------------------------------------------------------------------- Streaming DiLoCo


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def layer_of(name: str) -> int | None:
    """The block index in a parameter's dotted name ("blocks.3.attn.qkv.weight" -> 3,
    "model.layers.12.mlp.up_proj.weight" -> 12), or None outside the repeated blocks."""
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None


def _units(names: Sequence[str], key) -> list[list[int]]:
    """Runs of consecutive tensors with one `key(name)`."""
    units: list[list[int]] = []
    last: object = object()
    for i, name in enumerate(names):
        k = key(name)
        if units and k == last:
            units[-1].append(i)
        else:
            units.append([i])
            last = k
    return units


def _block_key(name: str) -> object:
    layer = layer_of(name)
    return ("block", layer) if layer is not None else ("outside", name)


def _module_key(name: str) -> object:
    return name.rsplit(".", 1)[0]  # a module's weight and bias stay together


def _balanced_cuts(sizes: Sequence[int], parts: int) -> list[int]:
    """Start indices of `parts` contiguous, non-empty groups whose largest deviation from an
    equal share is as small as possible (exact, by dynamic programming over the cut points)."""
    n = len(sizes)
    prefix = [0]
    for x in sizes:
        prefix.append(prefix[-1] + x)
    target = prefix[-1] / parts
    inf = float("inf")
    cost = [[inf] * (n + 1) for _ in range(parts + 1)]  # cost[k][j]: first j units in k groups
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    cost[0][0] = 0.0
    for k in range(1, parts + 1):
        for j in range(k, n - (parts - k) + 1):
            for i in range(j - 1, k - 2, -1):
                group = prefix[j] - prefix[i]
                c = max(cost[k - 1][i], abs(group - target))
                if c < cost[k][j]:
                    cost[k][j], cut[k][j] = c, i
                if group > 3 * target:  # longer groups only deviate more
                    break
    starts, j = [], n
    for k in range(parts, 0, -1):
        j = cut[k][j]
        starts.append(j)
    return starts[::-1]


def layer_fragments(names: Sequence[str], numels: Sequence[int], num_fragments: int,
                    tolerance: float = 0.2) -> list[list[int]]:
    """Streaming DiLoCo's P fragments: contiguous groups of whole blocks (embeddings join the
    first, the final norm and head the last), each about 1/P of the parameters, so a layer syncs
    at once and each exchange moves about 1/P of the model. Where whole blocks cannot come
    within `tolerance` of 1/P (fewer blocks than P, or a count P does not divide), groups are
    cut between modules (a weight and its bias stay together), then between tensors.
    Returns, per fragment, its tensor indices in order; every tensor is in exactly one."""
    _check_positive_int("num_fragments", num_fragments)
    if len(names) != len(numels):
        raise ValueError(f"{len(names)} names for {len(numels)} tensors")
    if num_fragments > len(names):
        raise ValueError(f"{num_fragments} fragments for a model of {len(names)} tensors")
    target = sum(numels) / num_fragments
    best: tuple[float, list[list[int]]] | None = None
    for units in (_units(names, _block_key), _units(names, _module_key), [[i] for i in range(len(names))]):
        if len(units) < num_fragments:
            continue
        bounds = [*_balanced_cuts([sum(numels[i] for i in u) for u in units], num_fragments), len(units)]
        frags = [[i for u in units[bounds[f]:bounds[f + 1]] for i in u] for f in range(num_fragments)]
        worst = max(abs(sum(numels[i] for i in f) / target - 1) for f in frags)
        if worst <= tolerance:
            return frags
        if best is None or worst < best[0]:
            best = (worst, frags)
    assert best is not None  # the tensor level always has enough units
    return best[1]


def validate_streaming(H: int, P: int, tau: int) -> None:
    """Raise ValueError unless H >= 1, P >= 1, H % P == 0 and 0 <= tau < H / P."""
    _check_positive_int("H (inner steps per round)", H)
    _check_positive_int("P (number of fragments)", P)
    if H % P:
        raise ValueError(f"H={H} is not a multiple of P={P}: fragments would sync at uneven offsets")
    if isinstance(tau, bool) or not isinstance(tau, int) or tau < 0:
        raise ValueError(f"tau (overlap steps) must be an int >= 0, got {tau!r}")
    if tau >= H // P:
        raise ValueError(f"tau={tau} must be < H/P={H // P}: a fragment's exchange would still be in "
                         f"flight when the next fragment is due")


def fragment_due(step: int, H: int, P: int) -> int | None:
    """The fragment whose pseudo-gradient is sent after inner step `step` (counted from 1),
    or None. Fragment f is due at every step t with t = (f + 1) * H / P (mod H): with
    H = 12, P = 4, fragments 0, 1, 2, 3 at t = 3, 6, 9, 12, then 15, 18, ..."""
    validate_streaming(H, P, 0)
    _check_positive_int("step", step)
    every = H // P
    if step % every:
        return None
    return (step // every - 1) % P


def fragment_apply_due(step: int, H: int, P: int, tau: int) -> int | None:
    """The fragment whose outer step and merge happen after inner step `step`: the one
    sent at step - tau (None before any was sent)."""
    validate_streaming(H, P, tau)
    _check_positive_int("step", step)
    return fragment_due(step - tau, H, P) if step - tau >= 1 else None


def merge(theta_f: Sequence[Tensor], phi_f: Sequence[Tensor], alpha: float) -> list[Tensor]:
    """alpha*theta + (1 - alpha)*phi per tensor, as new fp32 CPU tensors (inputs untouched).
    alpha = 0 returns exact copies of phi, alpha = 1 exact copies of theta."""
    alpha = _check_scalar("alpha", alpha, lo=0.0, hi=1.0)
    _check_pair(theta_f, phi_f, "merge(theta, phi)")
    if alpha == 0.0:
        return [_f32(p).clone() for p in phi_f]
    if alpha == 1.0:
        return [_f32(t).clone() for t in theta_f]
    return [_f32(t) * alpha + _f32(p) * (1.0 - alpha) for t, p in zip(theta_f, phi_f)]


# ---------------------------------------------------------------------------- agreement


def round_digest(tensors: Iterable[Tensor], length: int = 16) -> str:
    """First `length` hex chars of sha256 over, for each tensor in order, "dtype|shape|"
    followed by its raw little-endian bytes (row-major). Equal digests = bit-identical
    tensors (note: -0.0 and +0.0 differ)."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().to("cpu").contiguous()
        h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))  # in place, no copy
    return h.hexdigest()[:length]
