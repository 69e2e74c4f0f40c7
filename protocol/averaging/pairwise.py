"""Pairwise exchanges: two peers swap tensor lists for one round, with nobody else involved.

The lower id of a pair initiates: it streams its list and reads the partner's in the reply.
The other posts its list and waits for the push. Each side posts its list for round r once
(`post`); a push for a round not yet posted waits for it up to the request deadline. A waiting
peer gives up at once when its partner already pushed a later round (it is past this one:
waiting out every round would keep two peers a fixed number of rounds apart for good).
Whether a caller is this peer's partner for a round is the strategy's (`is_partner`).
Failures are `PairFailed` with a `PairOutcome`; nothing here changes any weights.
"""
from __future__ import annotations

import asyncio
import enum
import time
from typing import AsyncIterator, Callable

import torch

from swarm_node.protocol import codec
from swarm_node.protocol.averaging.deadlines import Deadlines
from swarm_node.protocol.averaging.star import PushResult, push_tensors, receive_push, tensor_messages
from swarm_node.protocol.messages import rounds as rpb
from swarm_node.protocol.transport import PeerUnavailable, Transport

PAIR = "pair.exchange"
PairStatus = rpb.PairReply.Status
KEEP_ROUNDS = 4  # rounds whose posted lists are kept for late partners
PUSH_POLL_S = 0.1  # how often a peer waiting for its partner checks whether the partner moved past


class PairOutcome(enum.Enum):
    TIMEOUT = "timeout"  # the partner did not arrive in time
    PARTNER_AHEAD = "partner_ahead"  # the partner pushed a later round: it will not come back for this one
    REFUSED = "refused"  # the partner answered, but not with its list (not its partner, too late, rejected)
    UNREACHABLE = "unreachable"  # the call failed, or the reply was malformed


class PairFailed(Exception):
    def __init__(self, outcome: PairOutcome, detail: str):
        super().__init__(detail)
        self.outcome = outcome


class PairExchange:
    def __init__(self, transport: Transport, *, run_id: str, shapes: list[tuple[int, ...]], compression: int,
                 deadlines: Deadlines, is_partner: Callable[[int, str], bool], on_reject: Callable[[str], None]):
        self.transport, self.run_id, self.shapes, self.compression = transport, run_id, shapes, compression
        self.deadlines, self.is_partner, self.on_reject = deadlines, is_partner, on_reject
        # round -> (my list for that round, my partner in it, event set when posted);
        # (round, peer) -> that peer's list, as it pushed it
        self._mine: dict[int, list[torch.Tensor]] = {}
        self._partner_for: dict[int, str | None] = {}
        self._posted: dict[int, asyncio.Event] = {}
        self._incoming: dict[tuple[int, str], asyncio.Future] = {}
        self._active_round = -1  # the round this peer is exchanging in
        self._pushed_by: dict[str, int] = {}  # the latest round each peer pushed to us as our partner

    async def start(self) -> None:
        await self.transport.add_handler(PAIR, self._serve, rpb.PairPush, channel="averaging")

    def post(self, round_no: int, mine: list[torch.Tensor], partner: str | None) -> None:
        """This peer's list for `round_no` (the round it now exchanges in) and its partner there
        (None: the odd one out). Only that partner gets the list: a peer whose view paired it with
        us differently is refused, so a round counts on both sides of a pair or on neither."""
        self._active_round = round_no
        self._mine[round_no] = mine
        self._partner_for[round_no] = partner
        self._slot(round_no).set()

    async def exchange(self, round_no: int, partner: str, initiate: bool) -> list[torch.Tensor]:
        """The partner's list for the posted round; raises PairFailed."""
        try:
            if initiate:
                return await self._initiate(partner, round_no, self._mine[round_no])
            return await self._await_push(partner, round_no)
        except asyncio.TimeoutError:
            raise PairFailed(PairOutcome.TIMEOUT, "partner did not arrive in time") from None
        except (PeerUnavailable, codec.CodecError) as e:
            raise PairFailed(PairOutcome.UNREACHABLE, str(e)[:200]) from None

    # ---------------------------------------------------------------- the two sides
    def _slot(self, round_no: int) -> asyncio.Event:
        if round_no not in self._posted:
            self._posted[round_no] = asyncio.Event()
            for old in sorted(self._posted)[:-KEEP_ROUNDS]:
                # partners far ahead must not evict the round we wait in, nor a late partner's push
                # the round it is asked for (it was gone before it was returned: a KeyError)
                if old in (self._active_round, round_no):
                    continue
                self._posted.pop(old, None)
                self._mine.pop(old, None)
                self._partner_for.pop(old, None)
                for key in [k for k in self._incoming if k[0] == old]:
                    fut = self._incoming.pop(key)
                    if not fut.done():
                        fut.cancel()
        return self._posted[round_no]

    def _from(self, round_no: int, peer: str) -> asyncio.Future:
        key = (round_no, peer)
        if key not in self._incoming:
            self._incoming[key] = asyncio.get_running_loop().create_future()
        return self._incoming[key]

    async def _await_push(self, partner: str, round_no: int) -> list[torch.Tensor]:
        fut = self._from(round_no, partner)
        deadline = time.monotonic() + self.deadlines.gather
        while not fut.done():
            ahead = self._pushed_by.get(partner, -1)
            if ahead > round_no:
                raise PairFailed(PairOutcome.PARTNER_AHEAD, f"partner already at round {ahead}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise asyncio.TimeoutError
            try:
                await asyncio.wait_for(asyncio.shield(fut), min(PUSH_POLL_S, left))
            except asyncio.TimeoutError:
                pass
        return fut.result()

    async def _initiate(self, partner: str, round_no: int, mine: list[torch.Tensor]) -> list[torch.Tensor]:
        pushes = tensor_messages(mine, lambda chunk: rpb.PairPush(
            run_id=self.run_id, round=round_no, num_tensors=len(mine), chunk=chunk), self.compression)
        answer = await push_tensors(self.transport, partner, PAIR, pushes, rpb.PairReply,
                                    timeout_s=self.deadlines.exchange, shapes=self.shapes,
                                    is_ok=lambda r: r.status == PairStatus.PAIR_STATUS_OK)
        if not answer.complete:
            r = answer.reply
            what = f"{PairStatus.Name(r.status)} {r.detail}" if r is not None else "no reply"
            raise PairFailed(PairOutcome.REFUSED, f"{partner[-8:]}: {what}")
        return answer.tensors

    async def _serve(self, requests: AsyncIterator[rpb.PairPush], caller: str) -> AsyncIterator[rpb.PairReply]:
        timeout = self.deadlines.request
        got = await receive_push(requests, timeout_s=timeout, shapes=self.shapes, on_reject=self.on_reject)
        if got.result is PushResult.REJECTED:
            yield rpb.PairReply(status=PairStatus.PAIR_STATUS_REJECTED, detail=str(got.error))
            return
        if got.result is not PushResult.OK:
            return
        round_no = got.first.round
        if got.first.run_id != self.run_id or round_no < 0 or not self.is_partner(round_no, caller):
            yield rpb.PairReply(status=PairStatus.PAIR_STATUS_REFUSED, detail="not my partner for this round")
            return
        self._pushed_by[caller] = max(self._pushed_by.get(caller, -1), round_no)
        posted = self._slot(round_no)
        fut = self._from(round_no, caller)
        if not fut.done():
            fut.set_result(got.tensors)
        try:
            await asyncio.wait_for(posted.wait(), timeout)
        except asyncio.TimeoutError:
            yield rpb.PairReply(status=PairStatus.PAIR_STATUS_TIMEOUT, detail="did not reach the round in time")
            return
        if self._partner_for.get(round_no, caller) != caller:  # our own loop paired us otherwise this round
            yield rpb.PairReply(status=PairStatus.PAIR_STATUS_REFUSED, detail="paired with another peer this round")
            return
        mine = self._mine.get(round_no)
        if mine is None:  # that round was dropped meanwhile (we moved far on)
            yield rpb.PairReply(status=PairStatus.PAIR_STATUS_TIMEOUT, detail="round no longer held")
            return
        for reply in tensor_messages(mine, lambda chunk: rpb.PairReply(status=PairStatus.PAIR_STATUS_OK, chunk=chunk),
                                     self.compression):
            yield reply
