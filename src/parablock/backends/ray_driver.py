"""The Ray backend's driver: it starts the actors, polls their progress, relays the server's
aggregations to the run's listeners, restarts a client whose actor died and drops one that stops
answering (see ``ray.py`` for the whole backend)."""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from parablock.backends.assembly import MAX_RESTARTS, Placement
from parablock.backends.ray_actors import (
    LONG_POLL_S,
    MIN_ANSWER_S,
    POLL_S,
    ClientActor,
    ServerActor,
    _runtime_env,
)
from parablock.core.checkpoint import CheckpointStore
from parablock.core.metrics import ClientLog, RoundRecord, Span
from parablock.core.server import Server
from parablock.errors import RoundFailedError

log = logging.getLogger(__name__)


@dataclass
class ClientView:
    """What ``on_barrier`` sees of a remote client: its id, its log so far, its actor handle.

    ``log`` is the driver's one log of the client across the actors that ran it: records and
    spans are only appended to it, except that a round the client ran again after a restart
    replaces its earlier record. The cursors say how far the current actor's phase events and
    log have been taken."""

    id: int
    log: ClientLog
    actor: Any
    phases: int = 0  # phase events of the current actor replayed so far
    generation: int = 0  # the actor's log generation the two cursors below count in
    spans: int = 0  # spans of that log taken so far
    rounds: int = 0  # round records of that log taken so far
    restarts: int = 0  # actors started for this client after one died
    seen: set[Span] = field(default_factory=set, repr=False)  # every span in ``log``


class _Fleet:
    """The driver's view of the actors: starts them, polls them, restarts the ones that die and
    drops the ones that stop answering."""

    def __init__(
        self,
        specs: list[Placement],
        server: Server,
        threads: int,
        on_barrier,
        on_phase=None,
        stop: threading.Event | None = None,
    ) -> None:
        self.on_barrier = on_barrier
        self.on_phase = on_phase
        self.listeners = list(server.aggregate_listeners)  # run here, fed by relay_aggregates
        self.stop_event = stop
        self.stopping = False
        self.clients = len(specs)
        self.min_clients = server.min_clients
        self.answer_s = max(server.round_timeout_s, MIN_ANSWER_S)
        self.wait_s = min(LONG_POLL_S, self.answer_s / 2)  # a long poll ends well before a drop
        self.specs = {s.client_id: s for s in specs}
        self.threads = threads
        self.env = _runtime_env()
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        # Each client holds at most a join, an upload or a wait, a download (full duplex) and a
        # report at once, and a client that died may leave two more (a wait, an upload) held
        # until their round settles while its new actor joins; the driver adds a few (its long
        # poll for aggregations, a stop, a drop, the final state).
        self.server = (
            ray.remote(ServerActor)
            .options(
                num_cpus=0,
                max_concurrency=6 * len(specs) + 4,
                scheduling_strategy=here,
                runtime_env=self.env,
            )
            .remote(server)
        )
        self.views: dict[int, ClientView] = {}
        for s in specs:
            self.views[s.client_id] = ClientView(
                s.client_id, ClientLog(s.client_id), self._actor(s)
            )
        self.dropped: set[int] = set()
        self.stage = "setup"  # what the clients do now: "setup" (load models), then "run"
        self.running: dict[Any, int] = {}  # run (or setup) ref -> client
        self.starting: dict[Any, int] = {}  # setup ref of an actor that replaces one -> client
        self.polls: dict[Any, tuple[int, float]] = {}  # progress ref -> (client, sent at)
        self.next_poll: dict[int, float] = {}
        self.last_progress: dict[int, float] = {}
        self.relay = None  # the driver's long poll for the server actor's aggregations

    def _actor(self, spec: Placement):
        return (
            ray.remote(ClientActor)
            .options(
                num_cpus=spec.cpus, num_gpus=spec.gpus, max_concurrency=4, runtime_env=self.env
            )
            .remote(spec, self.server, self.threads or max(1, int(spec.cpus)))
        )

    def run(self) -> None:
        setup = {v.actor.setup.remote(): c for c, v in self.views.items()}
        self._wait_all(setup, lambda c, where: log.info("client %d runs on %s", c, where))
        self.stage = "run"
        now = time.monotonic()
        runs = {}
        for c, v in self.views.items():
            if c not in self.dropped:
                runs[v.actor.run.remote()] = c
                self.last_progress[c] = self.next_poll[c] = now
        self._wait_all(runs, self._collect)

    def _wait_all(self, refs: dict[Any, int], done) -> None:
        """Wait for every ref in ``refs``, polling progress, restarting dead actors and dropping
        the ones that stop answering."""
        self.running = refs
        while self.running or self.starting:
            now = time.monotonic()
            for c in set(self.running.values()):
                if now >= self.next_poll.get(c, math.inf) and c not in self._polled():
                    self.polls[self._progress(c)] = (c, now)
            if self.relay is None and self.listeners:
                self.relay = self.server.take_events.remote(self.wait_s)
            pending = [*self.running, *self.starting, *self.polls] + [self.relay] * bool(self.relay)
            ready, _ = ray.wait(pending, num_returns=1, timeout=POLL_S)
            if ready:
                ready, _ = ray.wait(pending, num_returns=len(pending), timeout=0)
            for ref in ready:
                if ref in self.polls:
                    c, _ = self.polls.pop(ref)
                    ok, value = self._get(ref, c)
                    if ok and c not in self.dropped:
                        self._merge(c, value)
                        self.next_poll[c] = time.monotonic() + POLL_S
                elif ref in self.running:
                    c = self.running.pop(ref)
                    ok, value = self._get(ref, c)
                    if ok:
                        done(c, value)
                elif ref in self.starting:
                    c = self.starting.pop(ref)
                    ok, value = self._get(ref, c)
                    if ok:
                        self._started(c, value)
                elif ref == self.relay:
                    self.relay_aggregates()  # and a new long poll goes out with the next loop
            self._check_liveness()
            if self.stop_event is not None and self.stop_event.is_set() and not self.stopping:
                self.stopping = True  # clients leave at their next barrier, state saved
                self.server.stop.remote()
                for c, v in self.views.items():
                    if c not in self.dropped:
                        v.actor.request_stop.remote()

    def relay_aggregates(self, last: bool = False) -> None:
        """Hand the server actor's aggregations to the driver's listeners, in order: those of the
        long poll in flight, then (``last``: the run is over) any left."""
        if not self.listeners:
            return
        rest = self.server.take_events.remote(0, True) if last else None  # ends the long poll
        events = ray.get(self.relay) if self.relay is not None else []
        self.relay = None
        if rest is not None:
            events += ray.get(rest)
        for event in events:
            for listener in self.listeners:
                listener(*event)

    def _polled(self) -> set[int]:
        return {c for c, _ in self.polls.values()}

    def _get(self, ref, c: int) -> tuple[bool, Any]:
        """``(True, ray.get(ref))``; a dead actor is restarted (or dropped), an error in client
        code re-raised."""
        try:
            return True, ray.get(ref)
        except RayTaskError as e:  # first: a client whose call to a dead server failed is this
            raise (e.cause if isinstance(e.cause, BaseException) else e) from None
        except RayActorError as e:
            self._died(c, f"its actor died: {_first_line(e)}")
        return False, None

    def _progress(self, c: int, wait_s: float | None = None):
        v = self.views[c]
        since = (v.generation, v.phases, v.spans, v.rounds)
        return v.actor.progress.remote(since, self.wait_s if wait_s is None else wait_s)

    def _merge(
        self, c: int, reply: tuple[tuple[int, int, int, int], list, list[Span], list[RoundRecord]]
    ):
        """Replay what is new in a progress reply (it may overlap one merged before it). A reply
        from a new log (the client restarted) starts at its beginning: what the driver already
        holds of it (the records and spans a checkpoint brought back) is skipped."""
        (generation, phases_from, spans_from, rounds_from), phases, spans, rounds = reply
        view = self.views[c]
        for event in phases[view.phases - phases_from :]:
            view.phases += 1
            if self.on_phase is not None:
                self.on_phase(*event)
        if generation != view.generation:
            view.generation, view.spans, view.rounds = generation, 0, 0
        for span in spans[view.spans - spans_from :]:
            view.spans += 1
            if span not in view.seen:
                view.seen.add(span)
                view.log.spans.append(span)
        for r in rounds[view.rounds - rounds_from :]:
            view.rounds += 1
            if self._record(view, r):
                self.last_progress[c] = time.monotonic()
                if self.on_barrier is not None:
                    self.on_barrier(view, r.round)

    @staticmethod
    def _record(view: ClientView, r: RoundRecord) -> bool:
        """Add ``r`` to the client's log: False when the log holds it already (a restarted
        client's checkpoint brings back its records); a round run again replaces its record."""
        held = view.log.rounds
        if held and r.round <= held[-1].round:
            for i in range(len(held) - 1, -1, -1):
                if held[i].round == r.round:
                    if held[i] == r:
                        return False
                    held[i] = r
                    return True
        held.append(r)
        return True

    def _collect(self, c: int, memory: str) -> None:
        """A finished client: fetch its last records."""
        log.info("client %d finished, %s", c, memory)
        self.polls = {r: v for r, v in self.polls.items() if v[0] != c}  # superseded
        try:
            self._merge(c, ray.get(self._progress(c, wait_s=0), timeout=self.answer_s))
        except (RayActorError, GetTimeoutError) as e:
            log.warning("client %d finished but its last records were lost: %s", c, e)

    def _check_liveness(self) -> None:
        now = time.monotonic()
        for c, sent in list(self.polls.values()):
            if now - sent > self.answer_s:
                self.drop(c, f"it did not answer for {self.answer_s:g}s")
        running = set(self.running.values()) | set(self.starting.values())
        finished = set(self.views) - running - self.dropped
        if len(running) < len(set(self.views) - self.dropped) and finished:
            for c in running:
                if now - self.last_progress.get(c, now) > self.answer_s:
                    self.drop(
                        c,
                        f"no progress for {self.answer_s:g}s after the other clients finished",
                    )

    def _died(self, c: int, reason: str) -> None:
        """A client's actor died: a new actor takes its place, unless the run is stopping or
        the client has used up its restarts (``MAX_RESTARTS``); then it is dropped."""
        if c in self.dropped:
            return
        restarts = self.views[c].restarts
        if self.stopping or restarts >= MAX_RESTARTS:
            if restarts:
                reason += f" (after {restarts} restart(s), at most {MAX_RESTARTS})"
            self.drop(c, reason)
            return
        self._restart(c, reason)

    def _restart(self, c: int, reason: str) -> None:
        """Start a new actor for client ``c`` from its latest checkpoint (afresh without one);
        it rejoins the server, which sends it every block that moved (``Server.join``). The
        server is not told to drop it: like a client restarted in-process (``run_placed``), it
        is late at most, and a round whose deadline passes without it drops it there, until it
        sends again. Its phase and log cursors start over with the new actor."""
        view = self.views[c]
        self._forget(c)
        ray.kill(view.actor, no_restart=True)  # dead already; make sure it writes nothing more
        spec = self.specs[c]
        state = None
        if spec.checkpoint_dir:
            state = CheckpointStore(spec.checkpoint_dir).latest_client(c)
        view.restarts += 1
        after = f"after round {state.round}" if state is not None else "afresh (no checkpoint)"
        log.warning(
            "client %d: %s; a new actor restarts it %s and it rejoins (restart %d of at most %d)",
            c,
            reason,
            after,
            view.restarts,
            MAX_RESTARTS,
        )
        view.actor = self._actor(replace(spec, resume=state))
        view.phases, view.generation = 0, -1  # a new actor: its log from its beginning
        # Set up first, unpolled: a process that is still starting is not a hung one.
        self.starting[view.actor.setup.remote()] = c
        if self.stage == "run":
            self.last_progress[c] = time.monotonic()

    def _started(self, c: int, where: str) -> None:
        """A replacing actor has its client built: it runs (in the run stage), polled from now."""
        log.info("client %d runs again, on %s", c, where)
        if self.stage == "run":
            self.running[self.views[c].actor.run.remote()] = c
            self.last_progress[c] = self.next_poll[c] = time.monotonic()

    def _forget(self, c: int) -> None:
        """Stop waiting for client ``c``'s calls in flight."""
        self.running = {r: x for r, x in self.running.items() if x != c}
        self.starting = {r: x for r, x in self.starting.items() if x != c}
        self.polls = {r: v for r, v in self.polls.items() if v[0] != c}

    def drop(self, c: int, reason: str) -> None:
        if c in self.dropped:
            return
        self.dropped.add(c)
        self._forget(c)
        ray.kill(self.views[c].actor, no_restart=True)
        remaining = self.clients - len(self.dropped)
        log.warning(
            "client %d dropped: %s; %d of %d clients remain (federation.min_clients=%d)",
            c,
            reason,
            remaining,
            self.clients,
            self.min_clients,
        )
        ray.get(self.server.drop_client.remote(c, reason))
        if remaining < self.min_clients:
            raise RoundFailedError(
                f"only {remaining} of {self.clients} clients remain after client {c} dropped "
                f"({reason}); federation.min_clients needs {self.min_clients}"
            )

    def stop(self) -> None:
        for actor in [v.actor for v in self.views.values()] + [self.server]:
            try:
                ray.kill(actor, no_restart=True)
            except Exception as e:  # already gone; nothing left to stop
                log.debug("stopping an actor: %s", e)


def _first_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__
