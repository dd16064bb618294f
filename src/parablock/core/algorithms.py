"""The two client-side algorithms over the same primitives (see ../shared/ALGORITHM.md).

Round t of either algorithm = communicate round t-1's delta + compute round t's block. FedBCD does
the two strictly one after the other; ParaBlock runs them at the same time on two threads, trains
from the stale model, and applies the block-level correction at the barrier. After round T-1 both
drain: upload the last delta and apply its aggregate.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from parablock.core.client import Client
from parablock.core.protocol import JoinReply
from parablock.errors import RunStopped
from parablock.registry import Registry

Algorithm = Callable[[Client], None]
ALGORITHMS: Registry[Algorithm] = Registry("algorithm")


@ALGORITHMS.register("parablock")
def parablock(client: Client) -> None:
    if len(set(client.plan)) < 2:
        raise ValueError("parablock needs at least 2 selected blocks (see model.blocks)")
    for t in range(client.start_round, len(client.plan)):
        record = client.new_record(t)
        pending = client.pending
        # The communication thread moves round t-1's delta while this thread trains round t.
        inflight = client.communicate_async(pending, record) if pending is not None else None
        update = client.compute(t, record)
        if inflight is not None:
            idle_from = time.time()
            value = inflight.result()  # the barrier
            client.log.add_span(t, "idle", idle_from, time.time())
            record.idle_s = time.time() - idle_from
            client.correct(value)
        client.pending = update
        client.barrier(record)
        _check_stop(client)
    if client.correction.drain:
        _drain(client)


@ALGORITHMS.register("fedbcd")
def fedbcd(client: Client) -> None:
    for t in range(client.start_round, len(client.plan)):
        record = client.new_record(t)
        if client.pending is not None:
            idle_from = time.time()
            client.correct(client.communicate(client.pending, record))
            record.idle_s = time.time() - idle_from  # the compute side waits for the network
        client.pending = client.compute(t, record)
        client.barrier(record)
        _check_stop(client)
    _drain(client)


def _check_stop(client: Client) -> None:
    if client.stopping():  # this barrier's state is saved; leave before starting another round
        raise RunStopped(f"client {client.id} stopped")


def _drain(client: Client) -> None:
    """Upload the last delta and apply its aggregate, so the client ends equal to the server."""
    if client.pending is None:  # it rejoined after the last round: nothing of its own to send
        return
    record = client.new_record(len(client.plan), drain=True)
    client.correct(client.communicate(client.pending, record))
    client.pending = None
    client.barrier(record)


def run_client(client: Client, algorithm: str, reply: JoinReply | None = None) -> None:
    """Join (or use the join ``reply`` already received), run the algorithm to the end, and
    release the client's threads."""
    run = ALGORITHMS.get(algorithm)
    try:
        client.join(reply)
        run(client)
        if client.log.rounds:
            client.report(client.log.rounds[-1], final=True)
    finally:
        client.close()
