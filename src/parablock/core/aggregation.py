"""The server's aggregation role: from "update received" to "aggregate committed".

An update is checked whole before it is stored (identity from the caller, the open round only,
the round's block, the block's current version, exact names, shapes and dtype, finite values,
``num_examples`` within what a round can use, every coordinate within what the announced training
can move it, ``core/trust.py``, the delta's norm within ``max_update_norm``). With a lossy
``link.compression`` it must arrive in exactly the codec's wire form and is decoded to float32
(``wire.compress``) before those checks. A rejected update is logged and counted, never applied;
a client whose update for the open round is rejected forfeits that round (it goes on without it).

Once a round has every expected update (or its deadline passed with at least ``min_clients``),
the round's updates pass through the server's delta pipeline (``core/pipeline.py``: the
aggregator, then the server-side stages), the new block value is computed aside and checked
finite, and only then written into the global model and the block's version advanced; a failed
check leaves model and versions untouched. With compression the aggregate is compressed with the
server's own error feedback and the server applies the decoded aggregate, the one its clients
apply.

A role of ``core.server.Server``: it shares the server's lock and state (participation), and
every method named ``_x`` runs with that lock held.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import torch

from parablock.core.aggregate import apply, capped_weights, delta_norm
from parablock.core.privacy import Ledger
from parablock.core.trust import MARGIN
from parablock.errors import AggregationError, Refused
from parablock.model.blocks import block_state, set_block
from parablock.wire.compress import Shapes
from parablock.wire.messages import BlockUpdate, BlockValue, Expected, MessageError, all_finite
from parablock.wire.protocol import BEHIND

log = logging.getLogger(__name__)

KEEP_AGGREGATES = 4  # rounds whose aggregate stays downloadable (slow clients, rejoins)


class Aggregation:
    """Validation, pending updates, aggregation, versions (the server sets the state)."""

    # -- updates ---------------------------------------------------------------------------
    def receive_update(self, payload, client: int) -> tuple[bool, str]:
        """Decode (bytes, or an iterable of chunks), validate and store ``client``'s update."""
        self._readmit(client)
        try:
            chunks = [payload] if isinstance(payload, bytes | bytearray) else payload
            update = BlockUpdate.from_chunks(chunks, self._expected)
        except MessageError as e:
            kind = getattr(e, "kind", "malformed")
            return self._reject(client, None, f"update from client {client}: {e}", kind)
        if self.codec.lossy:  # to float32 before any other check (those see what is applied)
            try:
                tensors = self.codec.decode(update.tensors, self._shapes(update.block))
                update = replace(update, tensors=tensors)
            except MessageError as e:
                where = f"update from client {client} for round {update.round}"
                kind = getattr(e, "kind", "malformed")
                return self._reject(client, update.round, f"{where}: {e}", kind)
        return self.submit(update, client)

    def _shapes(self, block: int) -> Shapes:
        return {n: tuple(self._params[n].shape) for n in self.blocks[block].param_names}

    def _expected(self, meta: dict) -> Expected:
        """The only tensors an update's header may announce: its block's, in the wire form of
        ``link.compression`` (float32 without compression)."""
        b = meta.get("block")
        if type(b) is not int or not 0 <= b < len(self.blocks):
            raise MessageError(f"update for unknown block {b!r:.20}")
        if self.secure is not None:  # masked: the same shapes as int64 (uint64 bits)
            return {n: (shape, torch.int64) for n, shape in self._shapes(b).items()}
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
            return self._reject(client, update.round, str(e), getattr(e, "kind", "malformed"))

    def _reject(self, client: int, round: int | None, reason: str, kind: str) -> tuple[bool, str]:
        """Count and log a rejection. If it was ``client``'s update for the open round or a later
        one (or one too broken to say which), the client forfeits the open round: the round stops
        waiting for it and aggregates (or fails, below min_clients) as soon as the others are in.
        A late update (a straggler's, a replay) forfeits nothing."""
        with self._cond:
            open_round = self.next_round
            claimed = round if round is not None and 0 <= round < len(self.plan) else open_round
            self.stats.rejected.add(client, reason, kind, claimed)
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

    def _validate(self, u: BlockUpdate, client: int) -> None:
        where = f"update from client {client} for round {u.round}"
        self._secure_refuse(client, where)
        if u.round < self.next_round or u.round in self._failed:
            raise Refused("late", f"{where}: late, round {u.round} is already closed {BEHIND}")
        if u.round >= len(self.plan) or u.block != self.plan[u.round]:
            raise Refused("wrong_block", f"{where}: block {u.block} is not the round's block")
        if u.round > self.next_round:
            raise Refused("future", f"{where}: round {self.next_round} is the open round")
        if client not in self._members(u.round):
            raise Refused(
                "not_its_turn", f"{where}: round {u.round} is client {self.turns[u.round]}'s turn"
            )
        if client in self._pending.get(u.round, {}):
            raise Refused("duplicate", f"{where}: duplicate")
        if u.base_version != self.versions[u.block]:
            raise Refused(
                "stale",
                f"{where}: trained from version {u.base_version} of block {u.block}, "
                f"but the block has moved on to version {self.versions[u.block]}",
            )
        if client in self._forfeit.get(u.round, ()):
            raise Refused("forfeited", f"{where}: an earlier update of this round was rejected")

    def _bounded(self, u: BlockUpdate, client: int) -> BlockUpdate:
        """What a client cannot claim, whatever the server's state: another identity, tensors
        other than its block's, non-finite values, more examples than a round uses, a delta above
        ``max_update_norm`` (scaled down to it, or rejected, per ``update_norm_action``)."""
        where = f"update from client {client} for round {u.round}"
        if u.client != client:
            raise Refused("impersonation", f"{where}: it claims to come from client {u.client}")
        if not 0 <= client < self.clients:
            raise Refused("unknown_client", f"{where}: unknown client")
        if not 0 <= u.block < len(self.blocks):
            raise Refused("shape", f"{where}: no block {u.block}")
        block = self.blocks[u.block]
        if set(u.tensors) != set(block.param_names):
            raise Refused("shape", f"{where}: tensor names do not match block {u.block}")
        dtype = torch.int64 if self.secure is not None else torch.float32  # masked: int64
        for n, t in u.tensors.items():
            if tuple(t.shape) != tuple(self._params[n].shape) or t.dtype != dtype:
                raise Refused("shape", f"{where}: {n} has shape {tuple(t.shape)} dtype {t.dtype}")
            if t.is_floating_point() and not all_finite(t):
                raise Refused("not_finite", f"{where}: {n} is not finite")
        if self.max_examples and u.num_examples > self.max_examples:
            raise Refused(
                "too_many_examples",
                f"{where}: num_examples={u.num_examples} exceeds what a round uses "
                f"({self._steps_name()} x batch_size = {self.max_examples})",
            )
        if self.bound is not None:
            ratio = self.bound.excess(u.tensors, {n: self._params[n] for n in u.tensors})
            if not ratio <= MARGIN:
                raise Refused(
                    "over_bound",
                    f"{where}: it moves a coordinate {ratio:.3g}x as far as the announced "
                    f"training can ({self._steps_name()} AdamW steps at lr "
                    f"{self.settings.lr:g}); an honest update stays within 1x "
                    "(federation.update_bound)",
                )
            with self._cond:
                self.stats.bound_ratio = max(self.stats.bound_ratio, ratio)
        if self.max_update_norm > 0:
            norm = delta_norm(u.tensors)
            if norm > self.max_update_norm:
                if self.update_norm_action == "reject":
                    raise Refused(
                        "over_norm",
                        f"{where}: delta norm {norm:.4g} exceeds federation.max_update_norm="
                        f"{self.max_update_norm:g}",
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
        if self._unmasked(round):  # secure aggregation: waiting for reveals, or failed
            return
        start = time.perf_counter()
        updates = sorted(self._pending.pop(round).values(), key=lambda u: u.client)
        block = self.blocks[self.plan[round]]
        weights = capped_weights([u.num_examples for u in updates], self.max_client_weight)
        try:  # the aggregator, then the server's stages (core/pipeline.py)
            delta, notes = self.pipeline(updates, weights, round, block.index)
        except AggregationError as e:
            self._fail(round, f"round {round} failed: {e}; the global model is unchanged")
            return
        # with compression: the wire form the clients decode, and the residual to keep
        wire, residual = notes.get("wire"), notes.get("residual", {})
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
        self.stats.aggregated_at[round] = time.time()
        self.stats.participants[round] = sorted(u.client for u in updates)
        if self.privacy.mode == "client":  # one Gaussian release of the whole aggregate
            self.ledger.add(self.privacy.noise_multiplier, 1.0, 1)
            self.stats.epsilon[round] = self.ledger.epsilon(self.privacy.delta)
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

    def _fail(self, round: int, reason: str) -> None:
        """With the lock held: the round is over without an aggregate; waiters get ``reason``."""
        self._failed[round] = reason
        self._pending.pop(round, None)
        log.error("%s", reason)

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
            if self.privacy.mode == "client":  # one release per aggregated round
                self.ledger = Ledger(self.privacy.accountant)
                self.ledger.add(self.privacy.noise_multiplier, 1.0, round)
            self.stats.aggregate_s.update(aggregate_s)
            self.stats.participants.update(participants)
