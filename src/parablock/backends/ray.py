"""The Ray backend: every client a Ray actor in its own process, on one machine or a cluster.

Each client actor builds its client with ``assemble`` and runs it with ``run_placed``: the same code,
computation thread and communication thread as the local backend. Blocks cross as serialized bytes
through Ray, with the same emulated link pacing on top (``Connection`` paces in the client process
before an upload and after a download, so constrained links can be studied on a fast cluster).

The server: Ray actors can only call other actors, not plain objects in the driver, so the
driver's ``Server`` is shipped (pickled, state and all) into a threaded ``ServerActor`` pinned to
the driver's node, and clients reach it through ``RemoteServer``, a ``ServerEndpoint`` whose calls
are Ray calls with bytes in and out. At the end its final global weights, block versions and
statistics are copied back into the driver's ``Server``, so the runner evaluates and saves
``server.model`` exactly as with the local backend.

Progress: ``on_barrier`` and ``on_phase`` cannot be called from another process. The driver asks
every client for its new phase events and round records and replays them in the driver, in order:
``on_phase(client, round, phase, started)`` as in the local backend and ``on_barrier(view, round)``
with a ``ClientView`` (id, the log so far, the actor handle), at most about ``POLL_S`` after they
happened; the driver never sees the client's live model. The asks are long polls: a client answers
as soon as it has news, or after ``LONG_POLL_S`` with none, so a round costs a few Ray calls per
client rather than two every second (on a small machine those calls take CPU from training).

Failures: a client actor that dies (its process killed, out of memory, its node lost) is
replaced: the driver starts a new actor for the client from the client's latest checkpoint
(afresh without one), which rejoins the server like any restarted client (``Server.join`` sends
every block that moved; a pending delta for the round still open is kept) and takes part in
the rounds after; the driver's log of the client goes on across its actors. A client whose
actor died ``MAX_RESTARTS`` times already, or one that dies while the run is stopping, is
dropped instead, as is a client that does not answer a poll within the round timeout (a hung
process may still hold resources or write its checkpoint, so it is not restarted) or makes no
progress for a round timeout after every other client has finished: killed, logged, and the
server stops waiting for it (``Server.drop_client``). The run goes on while at least
``federation.min_clients`` remain and fails with ``RoundFailedError`` otherwise. An exception raised
by client code in a live actor stops the run and is re-raised, as in the local backend.
"""

from __future__ import annotations

import logging
import math
import os
import resource
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

import parablock
from parablock.core.checkpoint import CheckpointStore
from parablock.core.metrics import ClientLog, RoundRecord, Span
from parablock.core.server import Server
from parablock.errors import ConfigError, RoundFailedError, RunStopped
from parablock.run.assembly import MAX_RESTARTS, Host, Placement, assemble, run_placed
from parablock.transport.inprocess import InProcessConnection
from parablock.wire.protocol import AggregateReady, JoinReply, JoinRequest, RoundReport

log = logging.getLogger(__name__)

POLL_S = 0.5  # the shortest time between two progress asks to one client
LONG_POLL_S = 5.0  # the longest a client (or the server) holds an ask that has no news
MIN_ANSWER_S = 10.0  # a poll unanswered this long (or the round timeout, if longer): not answering


class ServerActor:
    """The ``Server`` inside a threaded actor: every client's blocking wait gets its own thread."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self._events: list[tuple] = []
        self._news = threading.Condition()
        self._closing = False
        server.aggregate_listeners.append(self._record)

    def _record(self, *event) -> None:
        with self._news:
            self._events.append(event)
            self._news.notify_all()

    def take_events(self, wait_s: float = 0.0, last: bool = False) -> list[tuple]:
        """Aggregations since the last call, for the driver's listeners (history, checkpoints);
        waits up to ``wait_s`` for one when there is none yet. ``last``: the run is over, and a
        call still waiting returns now."""
        with self._news:
            if last:
                self._closing = True
                self._news.notify_all()
            self._news.wait_for(lambda: self._events or self._closing, timeout=wait_s)
            events, self._events = self._events, []
        return events

    def stop(self) -> None:
        self.server.stop()

    def join(self, request: JoinRequest, client: int) -> JoinReply:
        return self.server.join(request, client)

    def receive_update(self, payload: bytes, client: int) -> tuple[bool, str]:
        return self.server.receive_update(payload, client)

    def wait_aggregate(self, round: int, timeout: float | None = None) -> AggregateReady:
        return self.server.wait_aggregate(round, timeout)

    def block_payload(self, block: int, version: int, base: int | None = None) -> bytes:
        return self.server.block_payload(block, version, base)

    def report(self, report: RoundReport, client: int) -> None:
        self.server.report(report, client)

    def drop_client(self, client: int, reason: str) -> None:
        self.server.drop_client(client, reason)

    def final(self) -> dict[str, Any]:
        s = self.server
        return {
            "model": s.model.state_dict(),
            "versions": s.versions,
            "next_round": s.next_round,
            "stats": s.stats,
        }


class RemoteServer:
    """The ``ServerEndpoint`` a client actor's ``Connection`` talks to: Ray calls to the server."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def join(self, request: JoinRequest, client: int) -> JoinReply:
        return ray.get(self.handle.join.remote(request, client))

    def receive_update(self, payload: bytes, client: int) -> tuple[bool, str]:
        return ray.get(self.handle.receive_update.remote(payload, client))

    def block_payload(self, block: int, version: int, base: int | None = None) -> bytes:
        return ray.get(self.handle.block_payload.remote(block, version, base))

    def report(self, report: RoundReport, client: int) -> None:
        ray.get(self.handle.report.remote(report, client))

    def wait_aggregate(self, round: int, timeout: float | None = None) -> AggregateReady:
        try:
            return ray.get(self.handle.wait_aggregate.remote(round, timeout))
        except RayTaskError as e:  # the server's own verdicts travel as themselves
            if isinstance(e.cause, (RunStopped, RoundFailedError)):
                raise e.cause from None
            raise


class ClientActor:
    """One client in its own process; ``progress`` answers from a second actor thread."""

    def __init__(self, spec: Placement, server: Any, threads: int) -> None:
        self.spec = spec
        self.server = server
        self.threads = threads
        self.client = None
        self.built = None  # (client, join reply) once set up
        self._stop = threading.Event()
        self._phases: list[tuple[int, int, str, bool]] = []  # every span start and end, in order
        self._news = threading.Condition()
        # The log ``progress`` reads, with a generation that changes when a restarted client
        # brings a new one (one tuple, so a poll never pairs one log with another's generation).
        self._log: tuple[int, ClientLog] = (0, ClientLog(spec.client_id))
        self._host = Host(stop=self._stop, on_phase=self._on_phase)  # kept across restarts

    def _build(self, p: Placement):
        link = InProcessConnection(RemoteServer(self.server), p.client_id, p.uplink, p.downlink)
        return assemble(p, link, self._host)

    def setup(self) -> str:
        """Load the model, join and build the client (errors surface here, not as a dead
        actor)."""
        torch.set_num_threads(self.threads)
        self.built = self._build(self.spec)
        self.client = self.built[0]
        self._log = (self._log[0], self.client.log)
        return (
            f"{os.uname().nodename} pid {os.getpid()} on {self.spec.train_device()}, "
            f"{peak_rss_mb():.0f} MB resident after loading its model"
        )

    def run(self) -> str:
        def current(client) -> None:  # a client that restarted is a new object, with a new log
            if client is not self.client:
                self._log = (self._log[0] + 1, client.log)
            self.client = client

        try:
            run_placed(self.spec, self._build, self.built, current)
        except RunStopped:
            pass  # its last barrier is saved; the driver knows why it stopped
        finally:
            if self.client.checkpoint is not None:
                self.client.checkpoint.flush()
        return f"peak resident memory {peak_rss_mb():.0f} MB"

    def request_stop(self) -> None:
        self._stop.set()

    def _on_phase(self, *event) -> None:
        with self._news:  # both client threads call this
            self._phases.append(event)
            self._news.notify_all()

    def progress(
        self, since: tuple[int, int, int, int], wait_s: float = 0.0
    ) -> tuple[tuple[int, int, int, int], list, list, list]:
        """Phase events, spans and round records from the given positions on, waiting up to
        ``wait_s`` for a new phase event or round record when there is none yet. Stateless, so a
        late or repeated poll can never lose or duplicate one (list slices are atomic).

        ``since`` is (log generation, phases, spans, rounds); asked about an older generation
        (the client restarted and its log was replaced) it answers with the whole current log,
        and the reply names the positions it answers from."""
        generation, lg = self._log
        asked, phases_from, spans_from, rounds_from = since
        if asked != generation:
            spans_from = rounds_from = 0
        with self._news:
            self._news.wait_for(
                lambda: len(self._phases) > phases_from or len(lg.rounds) > rounds_from,
                timeout=wait_s,
            )
        return (
            (generation, phases_from, spans_from, rounds_from),
            self._phases[phases_from:],
            lg.spans[spans_from:],
            lg.rounds[rounds_from:],
        )


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


def run_ray(
    specs: list[Placement],
    server: Server,
    *,
    threads: int = 0,
    on_barrier=None,
    on_phase=None,
    stop: threading.Event | None = None,
    address: str = "",
) -> list[ClientLog]:
    started = _connect(address, specs)
    fleet = None
    try:
        _check_resources(specs)
        fleet = _Fleet(specs, server, threads, on_barrier, on_phase, stop)
        fleet.run()
        fleet.relay_aggregates(last=True)
        _adopt(server, ray.get(fleet.server.final.remote()))
        return [fleet.views[s.client_id].log for s in specs]
    finally:
        if fleet is not None:
            fleet.stop()
        if started:
            ray.shutdown()


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


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _first_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def _adopt(server: Server, final: dict[str, Any]) -> None:
    """Copy the server actor's final state into the driver's ``Server`` (its model in place)."""
    with torch.no_grad():
        server.model.load_state_dict(final["model"])
    server.versions = final["versions"]
    server.next_round = final["next_round"]
    server.stats = final["stats"]


def ray_init(address: str = "", **kwargs: Any) -> None:
    """``ray.init`` for ParaBlock: a local instance (empty ``address``) is started with this
    process's parablock on its workers' path, so actors start from Ray's pool of ready workers
    with no per-actor runtime environment; a cluster gets the environment per actor instead."""
    global _INHERITING_NODE
    if not address:
        os.environ.update(_worker_env())  # the local raylet and its workers inherit it
    ray.init(address=address or None, include_dashboard=False, **kwargs)
    _INHERITING_NODE = "" if address else ray.get_runtime_context().get_node_id()


_INHERITING_NODE = ""  # the node of a local instance started by ray_init (workers inherit env)


def _connect(address: str, specs: list[Placement]) -> bool:
    """Join ``address`` or start a local Ray instance; True when this call started Ray."""
    if ray.is_initialized():
        return False  # a caller (a test, a notebook, a benchmark) owns the Ray session
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING}
    if not address:  # a local instance with enough logical CPUs for every client
        kwargs["num_cpus"] = max(os.cpu_count() or 1, math.ceil(sum(s.cpus for s in specs)))
    try:
        ray_init(address, **kwargs)
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise ConfigError(f"run.ray_address={address!r}: cannot connect to Ray: {e}") from None
    return True


def _check_resources(specs: list[Placement]) -> None:
    """Fail now, not hang, when the cluster cannot place every client."""
    have = ray.cluster_resources()
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    for key, option, need in (
        ("CPU", "client_cpus", [s.cpus for s in specs]),
        ("GPU", "client_gpus", [s.gpus for s in specs]),
    ):
        total, biggest = have.get(key, 0.0), max((n.get(key, 0.0) for n in nodes), default=0.0)
        if sum(need) > total + 1e-9 or max(need) > biggest + 1e-9:
            raise ConfigError(
                f"run.{option}={max(need):g} for {len(specs)} clients needs {sum(need):g} {key}s "
                f"(at most {biggest:g} per machine here), but the Ray cluster has {total:g}"
            )


def _worker_env() -> dict[str, str]:
    """Actors import the same parablock as the driver and never download from a hub."""
    env = {"HF_HUB_OFFLINE": "1"}
    if os.environ.get("PARABLOCK_CACHE"):
        env["PARABLOCK_CACHE"] = os.environ["PARABLOCK_CACHE"]
    src = Path(parablock.__file__).resolve().parent.parent
    if "site-packages" not in src.parts:  # a source checkout: put it first on the actors' path
        paths = [str(src)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def _runtime_env() -> dict[str, Any]:
    """Nothing on a local instance from ``ray_init`` (its workers already have the environment:
    a per-actor one would make Ray start fresh workers, several seconds each); else env_vars."""
    if _INHERITING_NODE and _INHERITING_NODE == ray.get_runtime_context().get_node_id():
        return {}
    return {"env_vars": _worker_env()}
