"""The server: global model, per-block versions, validation and aggregation of block updates.

Transport-agnostic: it takes and returns bytes. Clients upload ``BlockUpdate`` payloads; once a
round has every expected update (or its deadline passed with at least ``min_clients``), the server
aggregates them, advances the block's version, and serves the new ``BlockValue`` to every client.
A rejected update is logged and counted, never applied.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from parablock.core.aggregate import AGGREGATORS, apply
from parablock.core.blocks import Block, block_state, set_block
from parablock.core.messages import BlockUpdate, BlockValue, MessageError
from parablock.errors import RoundFailedError, RunStopped  # noqa: F401

log = logging.getLogger(__name__)


@dataclass
class ServerStats:
    accepted: int = 0
    rejected: list[str] = field(default_factory=list)
    aggregate_s: dict[int, float] = field(default_factory=dict)
    participants: dict[int, list[int]] = field(default_factory=dict)
    dropped: list[int] = field(default_factory=list)


class Server:
    def __init__(
        self,
        model: nn.Module,
        blocks: list[Block],
        plan: list[int],
        *,
        clients: int,
        min_clients: int = 0,
        aggregator: str = "weighted_mean",
        server_lr: float = 1.0,
        round_timeout_s: float = 600.0,
    ) -> None:
        self.model = model
        self.blocks = blocks
        self.plan = list(plan)
        self.clients = clients
        self.min_clients = min_clients or clients
        self.aggregate_fn = AGGREGATORS.get(aggregator)
        self.server_lr = server_lr
        self.round_timeout_s = round_timeout_s
        self.versions = {b.index: -1 for b in blocks}  # -1: the pretrained value
        self.next_round = 0  # the next round to aggregate
        self.stats = ServerStats()
        self._pending: dict[int, dict[int, BlockUpdate]] = {}
        self._first_arrival: dict[int, float] = {}
        self._aggregates: dict[int, bytes] = {}
        self._failed: dict[int, str] = {}
        self._dropped: set[int] = set()
        self._cond = threading.Condition()
        self._stopped = False
        self._shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        # Each is called as listener(round, block, new_value, aggregate_s, participants) after an
        # aggregation, with the lock held (keep them cheap): the run records the aggregate history
        # there (evaluation of past rounds afterwards) and queues checkpoint writes.
        self.aggregate_listeners: list[Callable[[int, int, dict, float, list[int]], None]] = []

    # A copy of the server can be shipped to another process (the Ray backend hosts it in an
    # actor); the lock is not picklable, so the copy gets a fresh one.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_cond"]
        state["aggregate_listeners"] = []  # they belong to the process that registered them
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._cond = threading.Condition()

    # -- joining and catch-up -------------------------------------------------------------
    def join(self, client: int, versions: dict[int, int]) -> tuple[list[int], list[bytes]]:
        """The round plan, plus every block whose version differs from the client's."""
        with self._cond:
            stale = [b for b in self.blocks if versions.get(b.index, -1) != self.versions[b.index]]
            payloads = [
                BlockValue(b.index, self.versions[b.index], block_state(self.model, b)).serialize()
                for b in stale
            ]
        if stale:
            log.info("client %d joins: sending %d stale block(s)", client, len(stale))
        return list(self.plan), payloads

    # -- updates ---------------------------------------------------------------------------
    def receive_update(self, payload: bytes) -> tuple[bool, str]:
        """Validate and store one update; aggregate when the round is complete."""
        try:
            update = BlockUpdate.deserialize(payload)
            with self._cond:
                self._validate(update)
                self._pending.setdefault(update.round, {})[update.client] = update
                self._first_arrival.setdefault(update.round, time.monotonic())
                self.stats.accepted += 1
                if self._complete(update.round):
                    self._aggregate(update.round)
                self._cond.notify_all()
            return True, "accepted"
        except MessageError as e:
            reason = str(e)
            with self._cond:
                self.stats.rejected.append(reason)
            log.warning("rejected an update: %s", reason)
            return False, reason

    def _expected(self) -> int:
        return self.clients - len(self._dropped)

    def _complete(self, round: int) -> bool:
        """Every client not dropped has sent its update, and that is at least ``min_clients``."""
        got = self._pending.get(round, {})
        live = set(range(self.clients)) - self._dropped
        return bool(got) and live <= got.keys() and len(got) >= self.min_clients

    def drop_client(self, client: int, reason: str) -> None:
        """Stop waiting for ``client`` (its process died or stopped answering).

        Open rounds that already hold every remaining client's update aggregate now instead of
        at their deadline. Whether enough clients remain is ``min_clients``' business: a round
        with fewer updates still fails at its deadline.
        """
        with self._cond:
            if client in self._dropped:
                return
            self._dropped.add(client)
            self.stats.dropped.append(client)
            log.info(
                "client %d dropped (%s): %d of %d clients remain",
                client,
                reason,
                self._expected(),
                self.clients,
            )
            for round in sorted(self._pending):
                if self._complete(round):
                    self._aggregate(round)
            self._cond.notify_all()

    def _validate(self, u: BlockUpdate) -> None:
        where = f"update from client {u.client} for round {u.round}"
        if not 0 <= u.client < self.clients:
            raise MessageError(f"{where}: unknown client")
        if u.round < self.next_round or u.round in self._failed:
            raise MessageError(f"{where}: late, round {u.round} is already closed")
        if u.round >= len(self.plan) or u.block != self.plan[u.round]:
            raise MessageError(f"{where}: block {u.block} is not the round's block")
        if u.client in self._pending.get(u.round, {}):
            raise MessageError(f"{where}: duplicate")
        if u.base_version != self.versions[u.block]:
            raise MessageError(
                f"{where}: trained from version {u.base_version} of block {u.block}, "
                f"but the block has moved on to version {self.versions[u.block]}"
            )
        block = self.blocks[u.block]
        if set(u.tensors) != set(block.param_names):
            raise MessageError(f"{where}: tensor names do not match block {u.block}")
        for n, t in u.tensors.items():
            if tuple(t.shape) != self._shapes[n] or not t.is_floating_point():
                raise MessageError(f"{where}: {n} has shape {tuple(t.shape)} dtype {t.dtype}")

    def _aggregate(self, round: int) -> None:
        """Called with the lock held."""
        start = time.perf_counter()
        updates = list(self._pending.pop(round).values())
        block = self.blocks[self.plan[round]]
        delta = self.aggregate_fn(updates)
        value = apply(block_state(self.model, block), delta, self.server_lr)
        set_block(self.model, block, value)
        self.versions[block.index] = round
        self._aggregates[round] = BlockValue(block.index, round, value).serialize()
        self._aggregates.pop(round - 2, None)  # every client has it by now
        self.next_round = round + 1
        self.stats.aggregate_s[round] = time.perf_counter() - start
        self.stats.participants[round] = sorted(u.client for u in updates)
        for listener in self.aggregate_listeners:
            listener(
                round,
                block.index,
                value,
                self.stats.aggregate_s[round],
                self.stats.participants[round],
            )
        log.debug(
            "round %d: aggregated block %d from clients %s",
            round,
            block.index,
            self.stats.participants[round],
        )

    # -- serving aggregates -----------------------------------------------------------------
    def wait_aggregate(self, round: int, timeout: float | None = None) -> bytes:
        """Block until round's aggregate exists; close the round at its deadline if needed."""
        limit = self.round_timeout_s if timeout is None else timeout
        started = time.monotonic()
        with self._cond:
            while True:
                if self._stopped:
                    raise RunStopped("the run is stopping")
                if round in self._aggregates:
                    return self._aggregates[round]
                if round in self._failed:
                    raise RoundFailedError(self._failed[round])
                now = time.monotonic()
                first = self._first_arrival.get(round, started)
                if now - first >= limit:
                    got = len(self._pending.get(round, {}))
                    if got >= self.min_clients and got > 0:
                        log.warning(
                            "round %d: deadline passed, aggregating %d of %d updates",
                            round,
                            got,
                            self.clients,
                        )
                        self._aggregate(round)
                    else:
                        self._failed[round] = (
                            f"round {round} failed: {got} update(s) arrived before its deadline "
                            f"({limit:g}s), federation.min_clients needs {self.min_clients}"
                        )
                        self._pending.pop(round, None)
                    self._cond.notify_all()
                    continue
                self._cond.wait(timeout=min(1.0, limit - (now - first)))

    def stop(self) -> None:
        """Wake every waiting client with RunStopped (their last barrier state is saved)."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def restore(
        self,
        round: int,
        blocks: dict[int, tuple[int, dict]],
        aggregate_s: dict[int, float],
        participants: dict[int, list[int]],
    ) -> None:
        """Continue from a checkpoint: the global model after round ``round - 1``."""
        with self._cond:
            for b, (version, tensors) in blocks.items():
                set_block(self.model, self.blocks[b], tensors)
                self.versions[b] = version
            self.next_round = round
            self.stats.aggregate_s.update(aggregate_s)
            self.stats.participants.update(participants)

    def global_value(self, block: int) -> BlockValue:
        with self._cond:
            b = self.blocks[block]
            return BlockValue(block, self.versions[block], block_state(self.model, b))
