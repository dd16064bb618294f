"""The server's secure-aggregation role: the one exchange after the joins, and the recovery of a
round whose sum still holds the masks of clients that dropped before their upload.

``secagg`` serves ``SecAggCall``: ``roster`` waits until every client has joined with its key and
returns them; ``shares`` stores a client's sealed shares and waits until every client has sent
its own (no round can be masked before that); ``reveal`` takes a contributor's opened shares.
``_unmasked`` is asked by aggregation before a round's updates are combined: True when the
round must wait (the contributors are asked to reveal through ``AggregateReady.reveal``) or has
failed (fewer contributors than ``privacy.secagg_threshold``, or shares that do not come before
the deadline), so the global model stays unchanged.

A role of ``core.server.Server``: it shares the server's lock and state (``self.secure`` is
``core.secure.SecureSum``, None without secure aggregation); every ``_x`` runs with the lock held.
"""

from __future__ import annotations

import logging
import time

from parablock.errors import MessageError, Refused, RunStopped
from parablock.wire.protocol import AggregateReady, SecAggCall, SecAggReply

log = logging.getLogger(__name__)


class Unmasking:
    """Secure aggregation's exchange and dropout recovery (the server sets ``self.secure``)."""

    def secagg(self, call: SecAggCall, client: int) -> SecAggReply:
        if self.secure is None:
            raise MessageError("this run does not use secure aggregation")
        if not 0 <= client < self.clients:
            raise MessageError(f"client {client} is not one of this run's clients")
        s = self.secure
        with self._cond:
            if call.kind == "roster":
                self._await_all(lambda: len(s.keys) == self.clients, "joined with its key")
                return s.roster()
            if call.kind == "shares":
                s.post(client, call.sealed)
                self._cond.notify_all()
                self._await_all(s.ready, "sent its sealed shares")
                return SecAggReply(s.session.hex())
            if client not in self._pending.get(call.round, {}):
                raise MessageError(
                    f"client {client}: reveals for round {call.round}, to which it has no "
                    "masked update the server is summing"
                )
            s.reveal(call.round, client, call.shares)
            if call.round == self.next_round and call.round in self._pending:
                if not s.missing(call.round):
                    self._aggregate(call.round)
            self._cond.notify_all()
            return SecAggReply(s.session.hex())

    def _await_all(self, done, what: str) -> None:
        """With the lock held: wait until ``done()`` (every client has ...), up to the round
        timeout; a client gone before the exchange ends leaves no one to mask with."""
        limit = time.monotonic() + self.round_timeout_s
        while not done():
            if self._stopped:
                raise RunStopped("the run is stopping")
            left = limit - time.monotonic()
            if left <= 0:
                raise MessageError(
                    f"secure aggregation: not every client has {what} within "
                    f"{self.round_timeout_s:g}s; every client must take part in the exchange"
                )
            self._cond.wait(timeout=min(1.0, left))

    def _unmasked(self, round: int) -> bool:
        """With the lock held, before ``round``'s updates are combined: False when they can be
        (no mask of a dropped client is left, or its key is recovered); True when the round
        must wait for reveals, or has failed."""
        s = self.secure
        if s is None:
            return False
        contributors = set(self._pending.get(round, {}))
        if len(contributors) < s.threshold:
            self._fail(
                round,
                f"round {round} failed: {len(contributors)} masked update(s), secure "
                f"aggregation needs privacy.secagg_threshold={s.threshold}; the global model is "
                "unchanged",
            )
            return True
        gone = s.gone(contributors)
        if not gone:
            return False
        if round not in s.asked:  # ask the contributors, through their wait for the aggregate
            s.asked[round] = (gone, time.monotonic())
            log.warning(
                "round %d: clients %s dropped before their masked upload; asking clients %s to "
                "reveal their shares",
                round,
                sorted(gone),
                sorted(contributors),
            )
            self._cond.notify_all()
        elif time.monotonic() - s.asked[round][1] > self.round_timeout_s:
            got = {g: len(s.revealed.get(round, {}).get(g, {})) for g in s.missing(round)}
            self._fail(
                round,
                f"round {round} failed: shares of dropped clients did not come within "
                f"{self.round_timeout_s:g}s (client: shares {got}, privacy.secagg_threshold="
                f"{s.threshold}); the global model is unchanged",
            )
        return True

    def _reveal_for(self, round: int, client: int | None) -> AggregateReady | None:
        """With the lock held: the shares ``client`` must reveal for the open ``round``."""
        if self.secure is None or client is None or round != self.next_round:
            return None
        if client not in self._pending.get(round, {}):
            return None
        sealed = self.secure.request(round, client)
        return AggregateReady(self.plan[round], round, sealed) if sealed else None

    def _secure_refuse(self, client: int, where: str) -> None:
        """An update (or a rejoin) of a client whose key the server has reconstructed."""
        if self.secure is not None and self.secure.spent(client):
            raise Refused(
                "secagg_spent",
                f"{where}: client {client} dropped and its masks were removed with its "
                "reconstructed key; it cannot take part again in this run",
            )

    def _recovery_left(self, round: int, limit: float) -> float | None:
        """Seconds left for the reveals of ``round`` (None when it asked for none)."""
        asked = self.secure.asked.get(round) if self.secure is not None else None
        return None if asked is None else asked[1] + limit - time.monotonic()
