"""The client-side algorithms over the same primitives (see ../shared/ALGORITHM.md).

Round t of either algorithm = communicate round t-1's delta + compute round t's block. FedBCD does
the two strictly one after the other; ParaBlock runs them at the same time on two threads, trains
from the stale model, and applies the block-level correction at the barrier. After round T-1 both
drain: upload the last delta and apply its aggregate. ``fedit_lora`` is FedBCD's sequence over
a single block, the LoRA adapter.
drain: upload the last delta and apply its aggregate. ParaBlock's options ``local_steps_max`` (extra
steps while the link is busy) and ``duplex`` (round t's delta starts up before round t-1's
aggregate is down) are explained in ``overlap.py``.
The baselines ``fedavg_full`` and ``cyclic``
(``baselines.py``) are registered here too, so every algorithm is chosen from one registry.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future

from parablock.core.baselines import cyclic
from parablock.core.client import Client
from parablock.core.metrics import RoundRecord
from parablock.core.overlap import InFlight
from parablock.errors import ConfigError, RunStopped
from parablock.registry import Registry
from parablock.wire.messages import BlockValue
from parablock.wire.protocol import JoinReply

Algorithm = Callable[[Client], None]
ALGORITHMS: Registry[Algorithm] = Registry("algorithm")

# ParaBlock trains round t+1's block while round t's is still in flight, so the schedule must
# alternate between at least two blocks; FedBCD waits for each aggregate and can train just one,
# and so can the baselines: cyclic (each turn starts from the latest model) and fedavg_full (its
# one block is every parameter, whatever model.blocks says).
MIN_SELECTED: dict[str, int] = {"parablock": 2, "fedbcd": 1, "cyclic": 1, "fedavg_full": 1}
# Algorithms that train a LoRA adapter (``core/lora.py``) instead of blocks of the model itself.
ADAPTER_ALGORITHMS = frozenset({"fedit_lora"})


def check_plan(algorithm: str, selected: list[int]) -> None:
    """Refuse a block selection the algorithm cannot run, before any client starts (the config
    refuses what it can see without the model; this sees e.g. a 1-layer model with 'all')."""
    need = MIN_SELECTED.get(algorithm, 1)
    if len(set(selected)) < need:
        raise ConfigError(
            f"model.blocks selects {len(set(selected))} block(s) ({sorted(set(selected))}) but "
            f"federation.algorithm={algorithm} needs at least {need} (it trains the next block "
            "while the previous one is in flight); select more blocks or use "
            "federation.algorithm=fedbcd"
        )


def _check_in_flight(plan: list[int]) -> None:
    """ParaBlock must never train the block whose delta is still in flight (the schedules
    guarantee it whenever two or more blocks are selected; a one-round plan is fine)."""
    repeats = [t for t in range(1, len(plan)) if plan[t] == plan[t - 1]]
    if repeats:
        t = repeats[0]
        raise ConfigError(
            f"federation.algorithm=parablock: rounds {t - 1} and {t} both train block "
            f"{plan[t]}, which is still in flight; model.blocks must select at least 2 blocks"
        )


@ALGORITHMS.register("parablock")
def parablock(client: Client) -> None:
    _check_in_flight(client.plan)
    if client.overlap.duplex:
        _parablock_duplex(client)
        return
    for t in range(client.start_round, len(client.plan)):
        record = client.new_record(t)
        pending = client.pending
        # The communication thread moves round t-1's delta while this thread trains round t.
        inflight = client.communicate_async(pending, record) if pending is not None else None
        update = client.compute(t, record, _running(inflight))
        if inflight is not None:
            _await(client, t, record, inflight.result)  # the barrier
        client.pending = update
        client.barrier(record)
        _check_stop(client)
    if client.correction.drain:
        _drain(client)


def _running(inflight: Future | None) -> Callable[[], bool] | None:
    return None if inflight is None else (lambda: not inflight.done())


def _parablock_duplex(client: Client) -> None:
    """ParaBlock in full duplex: round t's delta starts up right after compute t, while round
    t-1's aggregate may still be coming down; compute t+1 still starts only after that aggregate
    is down and corrected (the same barrier, the same staleness, the same updates per round)."""
    last = len(client.plan) - 1
    ahead: tuple[InFlight, RoundRecord] | None = None  # round t-1's delta, sent before barrier t-1
    for t in range(client.start_round, len(client.plan)):
        if ahead is not None:
            flight, record = ahead
            record.start = time.time()
        else:  # the first round here: a pending delta from a checkpoint starts up now
            record = client.new_record(t)
            pending = client.pending
            flight = client.send_async(pending, record) if pending is not None else None
        update = client.compute(t, record, flight.busy if flight is not None else None)
        ahead = None
        if (t < last or client.correction.drain) and not client.stopping():
            following = client.new_record(t + 1, drain=t == last)
            ahead = (client.send_async(update, following), following)
        if flight is not None:
            _await(client, t, record, flight.result)  # the barrier
        client.pending = update
        client.barrier(record)
        _check_stop(client)
    if ahead is None:
        if client.correction.drain:
            _drain(client)
        return
    flight, record = ahead  # the drain: round T-1's delta is on its way already
    record.start = time.time()
    client.correct(flight.result())
    client.pending = None
    client.barrier(record)


def _await(client: Client, t: int, record: RoundRecord, result: Callable[[], BlockValue]) -> None:
    """The barrier: wait (idle) for round t-1's aggregate, then apply the correction."""
    idle_from = time.time()
    value = result()
    client.log.add_span(t, "idle", idle_from, time.time())
    record.idle_s = time.time() - idle_from
    client.correct(value)


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


# FedIT (federated instruction tuning with LoRA): FedAvg over the adapter. Its one block (every
# adapter tensor) trains every round, so the client does exactly FedBCD's sequence: download the
# aggregate, train K steps, upload the delta; the drain uploads the last one.
ALGORITHMS.add("fedit_lora", fedbcd)
# The baselines (baselines.py): full-parameter FedAvg is FedBCD's ordering (download, train,
# upload) over one block holding every parameter; cyclic block training has its own loop.
ALGORITHMS.add("fedavg_full", fedbcd)
ALGORITHMS.add("cyclic", cyclic)


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
