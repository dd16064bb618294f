"""The server: global model, per-block versions, validation and aggregation of block updates.

Transport-agnostic: it takes bytes (or chunks of them) and typed control messages, and the caller
says which client is speaking (a network transport takes that from the authenticated session,
never from the payload). Once a round has every expected update (or its deadline passed with at
least ``min_clients``), the server aggregates them, advances the block's version, and serves the
new ``BlockValue``. A rejected update is logged and counted, never applied.

Trust: an update is checked whole before it is stored (identity from the caller, the open round
only, the round's block, the block's current version, exact names, shapes and dtype, finite values,
``num_examples`` within what a round can use, the delta's norm within ``max_update_norm``), and the
new block value is computed aside and checked finite before it is written. With a lossy
``link.compression`` an update must arrive in exactly the codec's wire form and is decoded to
float32 (``core.compress``) before those checks; the aggregate is compressed with the server's own
error feedback and the server applies the decoded aggregate, the one its clients apply. A client whose update
for the open round is rejected forfeits that round: the round goes on without it (as if it had sent
nothing) instead of waiting for its deadline, and the client is told why at once.

Participation: a client is expected in round r if the round is one it takes part in (every
round, or for an algorithm whose clients take turns, ``RunSettings.turns``, only its own), it has
not been dropped and it joined for a round <= r. A client missing at a round's deadline is dropped; it can join again (after a crash or a
lost connection) with what its checkpoint holds, catches up on every block that moved, and is
expected again from the round it is given.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from parablock.core.aggregate import AGGREGATORS, apply, capped_weights, delta_norm
from parablock.core.metrics import PHASES, ClientLog, RoundRecord, Span
from parablock.core.trust import MARGIN, UpdateBound
from parablock.errors import AggregationError, RoundFailedError, RunStopped  # noqa: F401
from parablock.model.blocks import Block, block_state, set_block
from parablock.model.train import lr_factor
from parablock.wire.compress import CODECS, ErrorFeedback, Shapes
from parablock.wire.messages import (
    BlockUpdate,
    BlockValue,
    Expected,
    MessageError,
    all_finite,
)
from parablock.wire.protocol import (
    BEHIND,
    MAX_REPORT_SPANS,
    PROTOCOL,
    AggregateReady,
    JoinReply,
    JoinRequest,
    RoundReport,
    RunSettings,
)

log = logging.getLogger(__name__)


class Rejections:
    """Rejected updates: ``len()`` counts them all, ``recent`` keeps the last reasons (a client
    that floods the server with bad payloads cannot grow this without bound), ``by_client``
    counts per client."""

    def __init__(self, count: int = 0) -> None:
        self.count = count
        self.recent: deque[str] = deque(maxlen=100)
        self.by_client: Counter[int] = Counter()

    def add(self, client: int, reason: str) -> None:
        self.count += 1
        self.recent.append(reason)
        self.by_client[client] += 1

    def __len__(self) -> int:
        return self.count


@dataclass
class ServerStats:
    accepted: int = 0
    rejected: Rejections = field(default_factory=Rejections)
    clipped: int = 0  # updates scaled down to federation.max_update_norm
    bound_ratio: float = 0.0  # the largest |delta| / honest bound of an accepted update
    aggregate_s: dict[int, float] = field(default_factory=dict)
    participants: dict[int, list[int]] = field(default_factory=dict)
    dropped: list[int] = field(default_factory=list)
    joins: list[tuple[int, int]] = field(default_factory=list)  # (client, start round)


KEEP_AGGREGATES = 4  # rounds whose aggregate stays downloadable (slow clients, rejoins)


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
        trim_fraction: float = 0.1,
        max_client_weight: float = 1.0,
        max_update_norm: float = 0.0,
        update_norm_action: str = "clip",
        update_bound: bool = True,
        round_timeout_s: float = 600.0,
        settings: RunSettings | None = None,
        fingerprint: str = "",
        compression: str = "none",
    ) -> None:
        self.model = model
        self.blocks = blocks
        self.plan = list(plan)
        self.clients = clients
        self.min_clients = min_clients or clients
        self.aggregate_fn = AGGREGATORS.get(aggregator)
        self.server_lr = server_lr
        self.trim_fraction = trim_fraction
        self.max_client_weight = max_client_weight
        self.max_update_norm = max_update_norm
        self.update_norm_action = update_norm_action
        # What one round can use: K steps of B examples (the server's own settings; with
        # local_steps_max, that many steps), so no client can claim more weight than an honest one.
        self.max_examples = (
            settings.overlap().most_steps(settings.local_steps) * settings.batch_size
            if settings
            else 0
        )
        # What an honest update can reach (core/trust.py): every coordinate within what the
        # announced AdamW steps can move it; None without settings (in-process unit tests).
        self.bound = _honest_bound(settings) if update_bound and settings else None
        self.round_timeout_s = round_timeout_s
        self.settings = settings  # handed to every client at join
        self.turns = list(settings.turns) if settings else []  # [] = every client, every round
        self.fingerprint = fingerprint  # of the base model; "" = not checked (in-process)
        self.versions = {b.index: -1 for b in blocks}  # -1: the pretrained value
        self.next_round = 0  # the next round to aggregate
        self.stats = ServerStats()
        self.reports: dict[int, ClientLog] = {}  # what clients reported (remote runs)
        self.finished: set[int] = set()  # clients whose final report arrived
        self._span_counts: dict[int, Counter[int]] = {}  # client -> round -> spans reported
        self._start: dict[int, int] = {}  # client -> first round it is expected in
        self._pending: dict[int, dict[int, BlockUpdate]] = {}
        self._first_arrival: dict[int, float] = {}
        self._opened = time.monotonic()  # when the open round opened (or the last join)
        self._aggregates: dict[int, BlockValue] = {}
        # link.compression: updates arrive in the codec's wire form and are decoded before any
        # check; each aggregate is sent back compressed too (``_deltas``: round -> the change
        # from the block's previous version), with the server's own error feedback per block.
        self.codec = CODECS.get(compression)
        self.feedback = ErrorFeedback(self.codec)
        self._deltas: dict[int, BlockValue] = {}
        self._failed: dict[int, str] = {}
        self._forfeit: dict[int, set[int]] = {}  # round -> clients whose update was rejected
        self._dropped: set[int] = set()
        self._cond = threading.Condition()
        self._stopped = False
        self._params = {n: p for n, p in model.named_parameters()}
        # Each is called as listener(round, block, new_value, aggregate_s, participants, residual)
        # after an aggregation, with the lock held (keep them cheap): the run records the
        # aggregate history there (evaluation of past rounds afterwards) and queues checkpoint
        # writes. ``residual``: the block's error-feedback residual ({} without compression),
        # which a checkpoint needs to resume bit for bit.
        self.aggregate_listeners: list[
            Callable[[int, int, dict, float, list[int], dict], None]
        ] = []

    # A copy of the server can be shipped to another process (the Ray backend hosts it in an
    # actor); the lock is not picklable, so the copy gets a fresh one.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_cond"], state["_params"]
        state["aggregate_listeners"] = []  # they belong to the process that registered them
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._cond = threading.Condition()
        self._params = {n: p for n, p in self.model.named_parameters()}

    # -- joining and catch-up -------------------------------------------------------------
    def join(self, request: JoinRequest, client: int) -> JoinReply:
        """Admit ``client`` (the caller authenticated it) and say where it starts.

        A fresh client starts at the round being trained. A restarted client whose pending delta
        is for the round still open keeps it and continues exactly where it stopped; otherwise it
        drops that delta and starts at the open round. Either way it downloads every block whose
        global version differs from what it holds.
        """
        if request.protocol != PROTOCOL:
            raise MessageError(
                f"protocol mismatch: the client speaks version {request.protocol}, "
                f"this server {PROTOCOL}; install the same ParaBlock version on both"
            )
        if not 0 <= client < self.clients:
            raise MessageError(f"client {client} is not one of this run's 0..{self.clients - 1}")
        if self.fingerprint and request.fingerprint != self.fingerprint:
            raise MessageError(
                f"client {client}'s base model differs from the server's (weights fingerprint "
                f"{request.fingerprint[:12] or 'none'} != {self.fingerprint[:12]}); "
                "load the same model on both (--model)"
            )
        with self._cond:
            open_round = self.next_round
            p = request.pending_round
            keep = p >= 0 and p == open_round and p not in self._failed
            start = request.next_round if keep else min(open_round, len(self.plan))
            stale = {
                b: v
                for b, v in self.versions.items()
                if request.versions.get(b, -1) != v or (not keep and b in request.dirty)
            }
            self._start[client] = p if keep else start
            if client in self._dropped:
                self._dropped.discard(client)
                log.info("client %d rejoins at round %d", client, start)
            self.stats.joins.append((client, start))
            if open_round == 0:  # the run's first round opens when its clients are in
                self._opened = time.monotonic()
            self._cond.notify_all()
        if stale:
            log.info("client %d joins: %d block(s) to catch up on", client, len(stale))
        settings = self.settings or _no_settings(self.plan)
        return JoinReply(PROTOCOL, settings, start, keep, stale)

    def block_value(self, block: int, version: int, base: int | None = None) -> BlockValue:
        """Block ``block`` at ``version``: the current value, or a recent round's aggregate.

        ``base``: the version the asking client holds; when round ``version``'s compressed
        aggregate was applied to exactly that version, the compressed change is sent instead."""
        with self._cond:
            if not 0 <= block < len(self.blocks):
                raise MessageError(f"no block {block}")
            change = self._deltas.get(version)
            if change is not None and change.block == block and change.base_version == base:
                return change
            if self.versions[block] == version:
                return BlockValue(block, version, block_state(self.model, self.blocks[block]))
            held = self._aggregates.get(version)
            if held is None or held.block != block:
                raise MessageError(f"block {block} version {version} is no longer held")
            return held

    def block_payload(self, block: int, version: int, base: int | None = None) -> bytes:
        return self.block_value(block, version, base).serialize()

    def block_chunks(self, block: int, version: int, chunk_bytes: int, base: int | None = None):
        return self.block_value(block, version, base).chunks(chunk_bytes)

    # -- updates ---------------------------------------------------------------------------
    def receive_update(self, payload, client: int) -> tuple[bool, str]:
        """Decode (bytes, or an iterable of chunks), validate and store ``client``'s update."""
        self._readmit(client)
        try:
            chunks = [payload] if isinstance(payload, bytes | bytearray) else payload
            update = BlockUpdate.from_chunks(chunks, self._expected)
        except MessageError as e:
            return self._reject(client, None, f"update from client {client}: {e}")
        if self.codec.lossy:  # to float32 before any other check (those see what is applied)
            try:
                tensors = self.codec.decode(update.tensors, self._shapes(update.block))
                update = replace(update, tensors=tensors)
            except MessageError as e:
                where = f"update from client {client} for round {update.round}"
                return self._reject(client, update.round, f"{where}: {e}")
        return self.submit(update, client)

    def _shapes(self, block: int) -> Shapes:
        return {n: tuple(self._params[n].shape) for n in self.blocks[block].param_names}

    def _expected(self, meta: dict) -> Expected:
        """The only tensors an update's header may announce: its block's, in the wire form of
        ``link.compression`` (float32 without compression)."""
        b = meta.get("block")
        if type(b) is not int or not 0 <= b < len(self.blocks):
            raise MessageError(f"update for unknown block {b!r:.20}")
        return self.codec.layout(self._shapes(b))

    def submit(self, update: BlockUpdate, client: int) -> tuple[bool, str]:
        """Validate and store one update; aggregate when the round is complete."""
        self._readmit(client)
        try:
            update = self._bounded(update, client)  # stateless checks, outside the lock
            with self._cond:
                self._validate(update, client)
                self._pending.setdefault(update.round, {})[client] = update
                self._first_arrival.setdefault(update.round, time.monotonic())
                self.stats.accepted += 1
                self._settle(update.round)
                self._cond.notify_all()
            return True, "accepted"
        except MessageError as e:
            return self._reject(client, update.round, str(e))

    def _readmit(self, client: int) -> None:
        """A client dropped at a deadline (a stall, a slow link) that sends again is expected
        again from the round open now; what it sent is judged like any other update."""
        with self._cond:
            if client in self._dropped and 0 <= client < self.clients:
                self._dropped.discard(client)
                self._start[client] = self.next_round
                log.info("client %d is back: expected again from round %d", client, self.next_round)

    def _reject(self, client: int, round: int | None, reason: str) -> tuple[bool, str]:
        """Count and log a rejection. If it was ``client``'s update for the open round or a later
        one (or one too broken to say which), the client forfeits the open round: the round stops
        waiting for it and aggregates (or fails, below min_clients) as soon as the others are in.
        A late update (a straggler's, a replay) forfeits nothing."""
        with self._cond:
            self.stats.rejected.add(client, reason)
            open_round = self.next_round
            if (
                (round is None or round >= open_round)
                and open_round < len(self.plan)
                and client in self._live(open_round)
                and client not in self._pending.get(open_round, {})
            ):
                self._forfeit.setdefault(open_round, set()).add(client)
                self._settle(open_round)
                self._cond.notify_all()
        log.warning("rejected an update: %s", reason)
        return False, reason

    def _settle(self, round: int) -> None:
        """With the lock held: aggregate ``round`` if nothing more is coming and it has enough
        updates; fail it at once if nothing more is coming and it has too few."""
        if round != self.next_round or round in self._failed:
            return
        if self._complete(round):
            self._aggregate(round)
        elif self._awaited(round) <= self._pending.get(round, {}).keys():
            got = len(self._pending.get(round, {}))
            self._fail(
                round,
                f"round {round} failed: {got} update(s) accepted and no more can come "
                f"(rejected: clients {sorted(self._forfeit.get(round, ()))}); "
                f"federation.min_clients needs {self._needed(round)}",
            )

    def _members(self, round: int) -> set[int]:
        """The clients that take part in ``round``: every client, or the round's turn."""
        if self.turns and 0 <= round < len(self.turns):
            return {self.turns[round]}
        return set(range(self.clients))

    def _needed(self, round: int) -> int:
        """Updates ``round`` needs: ``min_clients``, at most the clients that take part."""
        return min(self.min_clients, len(self._members(round)))

    def _live(self, round: int) -> set[int]:
        """The clients expected in ``round``."""
        return {
            c
            for c in self._members(round)
            if c not in self._dropped and self._start.get(c, 0) <= round
        }

    def _expected_count(self) -> int:
        return self.clients - len(self._dropped)

    def _awaited(self, round: int) -> set[int]:
        """The clients whose update ``round`` still waits for or has: live, not forfeited."""
        return self._live(round) - self._forfeit.get(round, set())

    def _complete(self, round: int) -> bool:
        """Every awaited client has sent its update, and that is at least ``min_clients``."""
        got = self._pending.get(round, {})
        return bool(got) and self._awaited(round) <= got.keys() and len(got) >= self._needed(round)

    def drop_client(self, client: int, reason: str) -> None:
        """Stop waiting for ``client`` (its process died, stopped answering or missed a deadline).

        Open rounds that already hold every remaining client's update aggregate now instead of
        at their deadline. Whether enough clients remain is ``min_clients``' business: a round
        with fewer updates still fails at its deadline.
        """
        with self._cond:
            self._drop(client, reason)
            if self.next_round in self._pending:
                self._settle(self.next_round)
            self._cond.notify_all()

    def _drop(self, client: int, reason: str) -> None:
        if client in self._dropped:
            return
        self._dropped.add(client)
        self.stats.dropped.append(client)
        log.warning(
            "client %d dropped (%s): %d of %d clients remain",
            client,
            reason,
            self._expected_count(),
            self.clients,
        )

    def _validate(self, u: BlockUpdate, client: int) -> None:
        where = f"update from client {client} for round {u.round}"
        if u.round < self.next_round or u.round in self._failed:
            raise MessageError(f"{where}: late, round {u.round} is already closed {BEHIND}")
        if u.round >= len(self.plan) or u.block != self.plan[u.round]:
            raise MessageError(f"{where}: block {u.block} is not the round's block")
        if u.round > self.next_round:
            raise MessageError(f"{where}: round {self.next_round} is the open round")
        if client not in self._members(u.round):
            raise MessageError(f"{where}: round {u.round} is client {self.turns[u.round]}'s turn")
        if client in self._pending.get(u.round, {}):
            raise MessageError(f"{where}: duplicate")
        if u.base_version != self.versions[u.block]:
            raise MessageError(
                f"{where}: trained from version {u.base_version} of block {u.block}, "
                f"but the block has moved on to version {self.versions[u.block]}"
            )
        if client in self._forfeit.get(u.round, ()):
            raise MessageError(f"{where}: an earlier update of this round was rejected")

    def _bounded(self, u: BlockUpdate, client: int) -> BlockUpdate:
        """What a client cannot claim, whatever the server's state: another identity, tensors
        other than its block's, non-finite values, more examples than a round uses, a delta above
        ``max_update_norm`` (scaled down to it, or rejected, per ``update_norm_action``)."""
        where = f"update from client {client} for round {u.round}"
        if u.client != client:
            raise MessageError(f"{where}: it claims to come from client {u.client}")
        if not 0 <= client < self.clients:
            raise MessageError(f"{where}: unknown client")
        if not 0 <= u.block < len(self.blocks):
            raise MessageError(f"{where}: no block {u.block}")
        block = self.blocks[u.block]
        if set(u.tensors) != set(block.param_names):
            raise MessageError(f"{where}: tensor names do not match block {u.block}")
        for n, t in u.tensors.items():
            if tuple(t.shape) != tuple(self._params[n].shape) or t.dtype != torch.float32:
                raise MessageError(f"{where}: {n} has shape {tuple(t.shape)} dtype {t.dtype}")
            if not all_finite(t):
                raise MessageError(f"{where}: {n} is not finite")
        if self.max_examples and u.num_examples > self.max_examples:
            raise MessageError(
                f"{where}: num_examples={u.num_examples} exceeds what a round uses "
                f"({self._steps_name()} x batch_size = {self.max_examples})"
            )
        if self.bound is not None:
            ratio = self.bound.excess(u.tensors, {n: self._params[n] for n in u.tensors})
            if not ratio <= MARGIN:
                raise MessageError(
                    f"{where}: it moves a coordinate {ratio:.3g}x as far as the announced "
                    f"training can ({self._steps_name()} AdamW steps at lr "
                    f"{self.settings.lr:g}); an honest update stays within 1x "
                    "(federation.update_bound)"
                )
            with self._cond:
                self.stats.bound_ratio = max(self.stats.bound_ratio, ratio)
        if self.max_update_norm > 0:
            norm = delta_norm(u.tensors)
            if norm > self.max_update_norm:
                if self.update_norm_action == "reject":
                    raise MessageError(
                        f"{where}: delta norm {norm:.4g} exceeds federation.max_update_norm="
                        f"{self.max_update_norm:g}"
                    )
                scale = self.max_update_norm / norm
                u = replace(u, tensors={n: t * scale for n, t in u.tensors.items()})
                with self._cond:
                    self.stats.clipped += 1
                log.info("%s: delta norm %.4g clipped to %g", where, norm, self.max_update_norm)
        return u

    def _steps_name(self) -> str:
        s = self.settings
        return "local_steps_max" if s and s.local_steps_max > s.local_steps else "local_steps"

    def _aggregate(self, round: int) -> None:
        """Called with the lock held."""
        start = time.perf_counter()
        updates = sorted(self._pending.pop(round).values(), key=lambda u: u.client)
        block = self.blocks[self.plan[round]]
        weights = capped_weights([u.num_examples for u in updates], self.max_client_weight)
        try:
            delta = self.aggregate_fn(updates, weights, self.trim_fraction)
        except AggregationError as e:
            self._fail(round, f"round {round} failed: {e}; the global model is unchanged")
            return
        wire, residual = None, {}
        if self.codec.lossy:  # the clients will apply the decoded aggregate: so does the server
            wire, residual = self.feedback.encode_aside(block.index, delta)
            delta = self.codec.decode(wire, self._shapes(block.index))
        value = apply(block_state(self.model, block), delta, self.server_lr)
        bad = [n for n, t in value.items() if not all_finite(t)]
        if bad:  # computed aside: the model and the versions stay as they were
            self._fail(
                round,
                f"round {round} failed: its aggregate of block {block.index} is not finite "
                f"({bad[0]}); the global model is unchanged",
            )
            return
        set_block(self.model, block, value)
        if wire is not None:
            self.feedback.keep(block.index, residual)
            self._deltas[round] = BlockValue(block.index, round, wire, self.versions[block.index])
            self._deltas.pop(round - KEEP_AGGREGATES, None)
        self.versions[block.index] = round
        self._aggregates[round] = BlockValue(block.index, round, value)
        self._aggregates.pop(round - KEEP_AGGREGATES, None)
        self.next_round = round + 1
        self._opened = time.monotonic()
        self.stats.aggregate_s[round] = time.perf_counter() - start
        self.stats.participants[round] = sorted(u.client for u in updates)
        for listener in self.aggregate_listeners:
            listener(
                round,
                block.index,
                value,
                self.stats.aggregate_s[round],
                self.stats.participants[round],
                residual,
            )
        log.debug(
            "round %d: aggregated block %d from clients %s",
            round,
            block.index,
            self.stats.participants[round],
        )

    # -- serving aggregates -----------------------------------------------------------------
    def wait_aggregate(
        self,
        round: int,
        timeout: float | None = None,
        alive: Callable[[], bool] | None = None,
    ) -> AggregateReady:
        """Block until round's aggregate exists; close the round at its deadline if needed.
        ``alive``: asked about once a second; a caller that is gone (a network call its peer
        cancelled) stops waiting with ``RunStopped``."""
        limit = self.round_timeout_s if timeout is None else timeout
        with self._cond:
            while True:
                ready = self._settled(round)
                if ready is not None:
                    return ready
                if alive is not None and not alive():
                    raise RunStopped("the caller is gone")
                left = self._deadline_left(round, limit)
                if left <= 0 and round == self.next_round:
                    self._close_at_deadline(round, limit)
                    continue
                self._cond.wait(timeout=max(0.01, min(1.0, left)))

    def poll_aggregate(self, round: int) -> AggregateReady | None:
        """``wait_aggregate`` without waiting: None while the round is still open."""
        with self._cond:
            return self._settled(round)

    def _settled(self, round: int) -> AggregateReady | None:
        """With the lock held: the round's aggregate, None while it is open, or the error a
        waiter gets (stopping, a failed round, no such round)."""
        if self._stopped:
            raise RunStopped("the run is stopping")
        if round in self._aggregates or (0 <= round < self.next_round):
            return AggregateReady(self.plan[round], round)
        failed = [r for r in self._failed if r <= round]
        if failed:  # this round, or one before it that it can never come after
            raise RoundFailedError(self._failed[min(failed)])
        if not 0 <= round < len(self.plan):
            raise MessageError(f"there is no round {round}")
        return None

    def _deadline_left(self, round: int, limit: float) -> float:
        """Seconds until the round's deadline: ``limit`` after its first accepted update, or
        twice that after it opened if none came. Only accepted updates count, so a client whose
        update was refused (or one that asks early) cannot close a round on the others."""
        first = self._first_arrival.get(round)
        if first is None:
            return self._opened + 2 * limit - time.monotonic()
        return first + limit - time.monotonic()

    def check_deadline(self) -> None:
        """Close the open round if its deadline has passed (the server's own clock, so rounds
        close even when no client is left waiting): ``round_timeout_s`` after its first update,
        or twice that after it opened when no update came at all."""
        with self._cond:
            r = self.next_round
            if r >= len(self.plan) or r in self._failed or self._stopped:
                return
            if self._deadline_left(r, self.round_timeout_s) <= 0:
                self._close_at_deadline(r, self.round_timeout_s)

    def wait_done(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for the last round's aggregate; a failed round raises."""
        with self._cond:
            self._cond.wait_for(
                lambda: self.next_round >= len(self.plan) or self._failed or self._stopped,
                timeout=timeout,
            )
            if self._failed:
                raise RoundFailedError(self._failed[min(self._failed)])
            return self.next_round >= len(self.plan)

    def _close_at_deadline(self, round: int, limit: float) -> None:
        got = self._pending.get(round, {})
        if len(got) >= self._needed(round) and got:
            for c in sorted(self._live(round) - got.keys()):
                self._drop(c, f"no update for round {round} within {limit:g}s")
            log.warning(
                "round %d: deadline passed, aggregating %d of %d updates",
                round,
                len(got),
                self.clients,
            )
            self._aggregate(round)
        else:
            self._fail(
                round,
                f"round {round} failed: {len(got)} update(s) arrived before its deadline "
                f"({limit:g}s), federation.min_clients needs {self._needed(round)}",
            )
        self._cond.notify_all()

    def _fail(self, round: int, reason: str) -> None:
        """With the lock held: the round is over without an aggregate; waiters get ``reason``."""
        self._failed[round] = reason
        self._pending.pop(round, None)
        log.error("%s", reason)

    # -- reports, stop, resume --------------------------------------------------------------
    def report(self, report: RoundReport, client: int) -> None:
        """Keep what ``client`` measured (remote runs build their metrics from these).

        Bounded: one record per round (a later one replaces it) and at most
        ``MAX_REPORT_SPANS`` spans per round over all of a client's reports; the run files take
        the spans away as they write them (``RunFiles``), so they are not held for the run."""
        r = report.record
        for rnd, phase in [(r.round, "compute")] + [(s.round, s.phase) for s in report.spans]:
            if not 0 <= rnd <= len(self.plan) or phase not in PHASES:
                raise MessageError(f"report from client {client}: bad round {rnd} or phase")
        if not 0 <= client < self.clients:
            raise MessageError(f"report from client {client}: not one of this run's clients")
        new = Counter(s.round for s in report.spans)
        with self._cond:
            had = self._span_counts.setdefault(client, Counter())
            over = sorted(t for t, n in new.items() if had[t] + n > MAX_REPORT_SPANS)
            if over:
                raise MessageError(
                    f"report from client {client}: more than {MAX_REPORT_SPANS} spans for round "
                    f"{over[0]}"
                )
            had.update(new)
        record = RoundRecord(
            client,
            r.round,
            r.block,
            r.compute_s,
            r.upload_s,
            r.wait_s,
            r.download_s,
            r.idle_s,
            r.round_s,
            r.bytes_up,
            r.bytes_down,
            float("nan") if r.train_loss is None else r.train_loss,
            r.examples,
            r.start,
            r.end,
            r.drain,
            r.steps,
        )
        spans = [Span(client, s.round, s.phase, s.start, s.end) for s in report.spans]
        with self._cond:
            lg = self.reports.setdefault(client, ClientLog(client))
            lg.rounds = [x for x in lg.rounds if x.round != r.round] + [record]
            with lg._lock:
                lg.spans.extend(spans)
            if report.final:
                self.finished.add(client)
            self._cond.notify_all()

    def dropped(self) -> set[int]:
        """The clients dropped (and not rejoined) so far."""
        with self._cond:
            return set(self._dropped)

    def wait_finished(self, timeout: float) -> bool:
        """Wait until every client not dropped has sent its final report (or ``timeout``)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not (set(range(self.clients)) - self._dropped) <= self.finished:
                left = deadline - time.monotonic()
                if left <= 0 or self._stopped:
                    return False
                self._cond.wait(timeout=min(1.0, left))
            return True

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
        residuals: dict[int, dict] | None = None,
    ) -> None:
        """Continue from a checkpoint: the global model after round ``round - 1`` (and, with
        compression, each block's error-feedback residual after its last aggregation)."""
        with self._cond:
            for b, (version, tensors) in blocks.items():
                set_block(self.model, self.blocks[b], tensors)
                self.versions[b] = version
            for b, residual in (residuals or {}).items():
                self.feedback.keep(b, residual)
            self.next_round = round
            self.stats.aggregate_s.update(aggregate_s)
            self.stats.participants.update(participants)

    def global_value(self, block: int) -> BlockValue:
        with self._cond:
            b = self.blocks[block]
            return BlockValue(block, self.versions[block], block_state(self.model, b))


def _honest_bound(s: RunSettings) -> UpdateBound:
    """The bound of the training ``s`` announces: its most steps, each at its scheduled lr."""
    train = s.train_settings()
    steps = s.overlap().most_steps(s.local_steps)
    return UpdateBound.of([s.lr * lr_factor(k, train) for k in range(steps)], s.weight_decay)


def _no_settings(plan: list[int]) -> RunSettings:
    """In-process clients get their settings from their spec; they only need the plan."""
    return RunSettings("", "", list(plan), "", 1, 1, 1.0, 0.0, 0, "constant", 0.0, 0, 16, 1, "")
