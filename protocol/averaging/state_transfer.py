"""Hand a peer's replica (model + optimizer state + step) to a joiner or a peer that drifted.

`snapshot()` and `restore()` are plain torch; they run on the compute thread so a snapshot
never interleaves with an optimizer step. `StateService` serves snapshots over the shared
transport and downloads them. A download is accepted only if, after loading, the local
parameter hash equals the hash the server advertised: a half-received or tampered state
is rejected and the local replica is left exactly as it was.
"""
from __future__ import annotations

import contextlib
import copy
import logging
from contextlib import AbstractAsyncContextManager
from typing import Any, AsyncIterator, Callable

import msgpack
import torch

from swarm_node.protocol import codec
from swarm_node.protocol.messages import wire
from swarm_node.protocol.transport import MAX_MESSAGE, PeerUnavailable, Transport, drain, first_message

log = logging.getLogger(__name__)
METHOD = "state.get"
MAX_META_BYTES = 1 << 20


class StateTransferError(Exception):
    pass


ExtraSnapshot = Callable[[], tuple[dict[str, Any], list[torch.Tensor]]]
ExtraRestore = Callable[[dict[str, Any], list[torch.Tensor]], None]
# An async context manager entered around taking a snapshot: a strategy whose shared state is
# mid-transaction (a Streaming DiLoCo fragment round in flight) waits there for a consistent point.
SnapshotGuard = Callable[[], AbstractAsyncContextManager[None]]


def snapshot(trainer, extra: ExtraSnapshot | None = None) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """(meta, tensors): model state in key order, per-parameter optimizer tensors, then the
    strategy's own state (e.g. DiLoCo's outer weights and momentum) if `extra` is given."""
    model_sd = trainer.model.state_dict()
    opt_state = trainer.optimizer.state_dict()["state"]
    opt_keys = [[int(i), k] for i in sorted(opt_state) for k in sorted(opt_state[i])
                if isinstance(opt_state[i][k], torch.Tensor)]
    # Copies, not views: on CPU .cpu() aliases the live tensors, and the snapshot is encoded
    # on the loop thread while the compute thread may already be applying the next step.
    tensors = [model_sd[k].detach().to("cpu", copy=True) for k in model_sd]
    tensors += [opt_state[i][k].detach().to("cpu", copy=True) for i, k in opt_keys]
    meta = {"step": trainer.step, "param_hash": trainer.param_hash(), "model_keys": list(model_sd),
            "opt_keys": opt_keys, "num_extra": 0, "extra": {}}
    if extra is not None:
        extra_meta, extra_tensors = extra()
        tensors += [t.detach().to("cpu", copy=True) for t in extra_tensors]
        meta["num_extra"], meta["extra"] = len(extra_tensors), extra_meta
    return meta, tensors


def restore(trainer, meta: dict[str, Any], tensors: list[torch.Tensor], extra: ExtraRestore | None = None) -> None:
    """Load a snapshot; on any inconsistency raise and leave the trainer untouched.
    `extra(meta["extra"], extra_tensors)` must validate before it changes anything."""
    num_extra = meta.get("num_extra", 0)
    if not isinstance(num_extra, int) or not 0 <= num_extra <= len(tensors):
        raise StateTransferError("bad extra-state count")
    extra_tensors = tensors[len(tensors) - num_extra:]
    tensors = tensors[:len(tensors) - num_extra]
    model_sd = trainer.model.state_dict()
    keys = meta.get("model_keys")
    opt_keys = meta.get("opt_keys")
    if keys != list(model_sd) or not isinstance(opt_keys, list):
        raise StateTransferError("snapshot describes a different model")
    if len(tensors) != len(keys) + len(opt_keys):
        raise StateTransferError(f"snapshot has {len(tensors)} tensors, meta describes {len(keys) + len(opt_keys)}")
    params = trainer.parameters_list()
    new_model = {}
    for k, t in zip(keys, tensors):
        if t.shape != model_sd[k].shape:
            raise StateTransferError(f"{k}: shape {tuple(t.shape)} != {tuple(model_sd[k].shape)}")
        new_model[k] = t
    new_opt: dict[int, dict[str, torch.Tensor]] = {}
    for (i, k), t in zip(opt_keys, tensors[len(keys):]):
        if not (isinstance(i, int) and 0 <= i < len(params)) or k not in ("step", "exp_avg", "exp_avg_sq"):
            raise StateTransferError(f"unexpected optimizer entry {i}/{k}")
        if k != "step" and t.shape != params[i].shape:
            raise StateTransferError(f"optimizer {k} for param {i} has shape {tuple(t.shape)}")
        new_opt.setdefault(i, {})[k] = t
    backup = copy.deepcopy(trainer.state_dict())  # state_dict() aliases live tensors
    try:
        trainer.model.load_state_dict(new_model)
        sd = trainer.optimizer.state_dict()
        sd["state"] = new_opt
        trainer.optimizer.load_state_dict(sd)
        trainer.align_step(int(meta["step"]))
        if trainer.param_hash() != meta.get("param_hash"):
            raise StateTransferError("parameter hash after loading differs from the advertised one")
        if extra is not None:
            extra(meta.get("extra") or {}, extra_tensors)
    except Exception:
        trainer.load_state_dict(backup)
        raise


class StateService:
    def __init__(self, transport: Transport, trainer, compute, *, timeout_s: float,
                 extra_snapshot: ExtraSnapshot | None = None, extra_restore: ExtraRestore | None = None,
                 snapshot_guard: SnapshotGuard | None = None):
        self.transport, self.trainer, self.compute, self.timeout_s = transport, trainer, compute, timeout_s
        self.extra_snapshot, self.extra_restore = extra_snapshot, extra_restore
        self.snapshot_guard = snapshot_guard or contextlib.nullcontext

    async def start(self) -> None:
        await self.transport.add_handler(METHOD, self._serve, wire.StateRequest, channel="state")

    async def _serve(self, requests: AsyncIterator[wire.StateRequest], caller: str) -> AsyncIterator[wire.StateChunk]:
        req = await first_message(requests, self.timeout_s)
        if req is None or req.run_id != self.transport.run_id:
            return
        await drain(requests, self.timeout_s)
        async with self.snapshot_guard():
            meta, tensors = await self.compute(snapshot, self.trainer, self.extra_snapshot)
        blob = msgpack.packb(meta, use_bin_type=True)
        first = True
        for chunk in codec.tensors_to_chunks(tensors, codec.NONE, MAX_MESSAGE):
            yield wire.StateChunk(step=meta["step"], param_hash=meta["param_hash"], num_tensors=len(tensors),
                                  chunk=chunk, meta=blob if first else b"")
            first = False
        if not tensors:
            yield wire.StateChunk(step=meta["step"], param_hash=meta["param_hash"], num_tensors=0, meta=blob)
        log.info("served state at step %d to %s", meta["step"], caller[-8:])

    async def adopt(self, peer_id: str, metrics, log: logging.Logger) -> int | None:
        """`download`, counted in swarm_recoveries_total{kind="state_download"} and logged; the
        new step, or None (local replica unchanged) when the download failed."""
        try:
            step = await self.download(peer_id)
        except (PeerUnavailable, StateTransferError, codec.CodecError) as e:
            metrics.recoveries.labels(kind="state_download", outcome="failed").inc()
            log.warning("state download from %s failed: %s", peer_id[-8:], e)
            return None
        metrics.recoveries.labels(kind="state_download", outcome="ok").inc()
        return step

    async def download(self, peer_id: str) -> int:
        """Replace the local replica with peer's; returns the new step. Raises on failure."""
        numel = sum(p.numel() for p in self.trainer.parameters_list())
        assembler: codec.ChunkAssembler | None = None
        meta: dict[str, Any] | None = None
        replies = self.transport.call(peer_id, METHOD, [wire.StateRequest(run_id=self.transport.run_id)],
                                      wire.StateChunk, timeout_s=self.timeout_s, channel="state")
        async for msg in replies:
            if meta is None:
                if not msg.meta or len(msg.meta) > MAX_META_BYTES:
                    raise StateTransferError("first state message carries no metadata")
                meta = msgpack.unpackb(msg.meta, raw=False)
                if not isinstance(meta, dict) or not 0 <= msg.num_tensors <= 6 * len(self.trainer.parameters_list()) + 64:
                    raise StateTransferError("malformed state metadata")
                # model + two Adam moments per parameter (+ outer weights and momentum), plus scalars
                assembler = codec.ChunkAssembler(msg.num_tensors, max_numel_total=6 * numel + (1 << 16))
            if msg.HasField("chunk"):
                assembler.add(msg.chunk)
        if meta is None or assembler is None:
            raise PeerUnavailable(f"{peer_id[-8:]} sent no state")
        tensors = assembler.result()
        await self.compute(restore, self.trainer, meta, tensors, self.extra_restore)
        return int(meta["step"])
