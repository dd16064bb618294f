"""The server's participation role: who is expected in which round, joins and rejoins, drops,
and the deadlines that close a round.

A client is expected in round r if the round is one it takes part in (every round, or for an
algorithm whose clients take turns, ``RunSettings.turns``, only its own), it has not been dropped
and it joined for a round <= r. A client missing at a round's deadline is dropped; it can join
again (after a crash or a lost connection) with what its checkpoint holds, catches up on every
block that moved, and is expected again from the round it is given. A round's deadline is
``round_timeout_s`` after its first accepted update, or twice that after it opened if none came.

A role of ``core.server.Server``: it shares the server's lock and state (the open round, the
pending updates), and every method named ``_x`` runs with that lock held.
"""

from __future__ import annotations

import logging
import time

from parablock.errors import MessageError
from parablock.wire.protocol import PROTOCOL, JoinReply, JoinRequest, RunSettings

log = logging.getLogger(__name__)


class Participation:
    """Joins, expected clients, drops and deadlines (state set by ``_init_participation``)."""

    def _init_participation(
        self, clients: int, min_clients: int, turns: list[int], round_timeout_s: float
    ) -> None:
        self.clients = clients
        self.min_clients = min_clients or clients
        self.turns = list(turns)  # [] = every client, every round
        self.round_timeout_s = round_timeout_s
        self._start: dict[int, int] = {}  # client -> first round it is expected in
        self._dropped: set[int] = set()
        self._forfeit: dict[int, set[int]] = {}  # round -> clients whose update was rejected
        self._first_arrival: dict[int, float] = {}
        self._opened = time.monotonic()  # when the open round opened (or the last join)

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
        mode = self.settings.privacy.mode if self.settings else "none"
        if mode not in request.privacy_modes:
            raise MessageError(
                f"this run needs privacy.mode={mode}, which client {client} cannot follow (it "
                f"follows {', '.join(request.privacy_modes) or 'none'}); install a ParaBlock with "
                "privacy support (opacus) at the site"
            )
        with self._cond:
            if self.secure is not None:  # its key for the masks (refused once spent)
                self.secure.register(client, request.secagg_key)
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

    def _readmit(self, client: int) -> None:
        """A client dropped at a deadline (a stall, a slow link) that sends again is expected
        again from the round open now; what it sent is judged like any other update."""
        with self._cond:
            spent = self.secure is not None and self.secure.spent(client)
            if client in self._dropped and 0 <= client < self.clients and not spent:
                self._dropped.discard(client)
                self._start[client] = self.next_round
                log.info("client %d is back: expected again from round %d", client, self.next_round)

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

    def _deadline_left(self, round: int, limit: float) -> float:
        """Seconds until the round's deadline: ``limit`` after its first accepted update, or
        twice that after it opened if none came. Only accepted updates count, so a client whose
        update was refused (or one that asks early) cannot close a round on the others."""
        recovery = self._recovery_left(round, limit)  # secure aggregation's reveals
        if recovery is not None:
            return recovery
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

    def dropped(self) -> set[int]:
        """The clients dropped (and not rejoined) so far."""
        with self._cond:
            return set(self._dropped)


def _no_settings(plan: list[int]) -> RunSettings:
    """In-process clients get their settings from their spec; they only need the plan."""
    return RunSettings("", "", list(plan), "", 1, 1, 1.0, 0.0, 0, "constant", 0.0, 0, 16, 1, "")
