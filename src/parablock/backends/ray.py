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
import threading
from typing import Any

import ray
import torch

from parablock.backends.assembly import Placement
from parablock.backends.ray_actors import (  # noqa: F401  (what tests and tools reach here)
    ClientActor,
    RemoteServer,
    ServerActor,
    peak_rss_mb,
    ray_init,
)
from parablock.backends.ray_driver import _Fleet
from parablock.core.metrics import ClientLog
from parablock.core.server import Server
from parablock.errors import ConfigError

log = logging.getLogger(__name__)


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


def _adopt(server: Server, final: dict[str, Any]) -> None:
    """Copy the server actor's final state into the driver's ``Server`` (its model in place)."""
    with torch.no_grad():
        server.model.load_state_dict(final["model"])
    server.versions = final["versions"]
    server.next_round = final["next_round"]
    server.stats = final["stats"]


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
