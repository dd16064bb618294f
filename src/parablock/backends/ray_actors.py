"""The Ray backend's actors: the server inside a threaded actor (``ServerActor``), the
``ServerEndpoint`` its clients call (``RemoteServer``), and one client in its own process
(``ClientActor``), built by the one assembly and polled by the driver (``ray_driver.py``)."""

from __future__ import annotations

import logging
import os
import resource
import threading
from pathlib import Path
from typing import Any

import ray
import torch
from ray.exceptions import RayTaskError

import parablock
from parablock.backends.assembly import Host, Placement, assemble, run_placed
from parablock.core.metrics import ClientLog
from parablock.core.server import Server
from parablock.errors import MessageError, RoundFailedError, RunStopped
from parablock.transport.inprocess import InProcessConnection
from parablock.wire.protocol import (
    AggregateReady,
    JoinReply,
    JoinRequest,
    RoundReport,
    SecAggCall,
    SecAggReply,
)

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

    def wait_aggregate(
        self, round: int, timeout: float | None = None, client: int | None = None
    ) -> AggregateReady:
        return self.server.wait_aggregate(round, timeout, client=client)

    def secagg(self, call: SecAggCall, client: int) -> SecAggReply:
        return self.server.secagg(call, client)

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
    """The ``ServerEndpoint`` (``wire/seams.py``) a client actor's connection talks to: Ray calls
    to the server actor (the run-driving half stays with the driver, which holds the server)."""

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

    def block_chunks(self, block: int, version: int, chunk_bytes: int, base: int | None = None):
        payload = self.block_payload(block, version, base)
        return (payload[i : i + chunk_bytes] for i in range(0, len(payload), chunk_bytes))

    def drop_client(self, client: int, reason: str) -> None:
        ray.get(self.handle.drop_client.remote(client, reason))

    def wait_aggregate(self, round: int, timeout: float | None = None, alive=None, client=None):
        """``alive`` is not asked: the client actor's own process is the caller."""
        try:
            return ray.get(self.handle.wait_aggregate.remote(round, timeout, client))
        except RayTaskError as e:  # the server's own verdicts travel as themselves
            if isinstance(e.cause, (RunStopped, RoundFailedError)):
                raise e.cause from None
            raise

    def secagg(self, call: SecAggCall, client: int) -> SecAggReply:
        try:
            return ray.get(self.handle.secagg.remote(call, client))
        except RayTaskError as e:  # a refusal travels as itself
            if isinstance(e.cause, (MessageError, RunStopped)):
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


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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
