"""The algorithms, each one entry: its client loop over the client's primitives, and what the
run must know of it (see ../shared/ALGORITHM.md).

Round t of ParaBlock or FedBCD = communicate round t-1's delta + compute round t's block. FedBCD
does the two strictly one after the other; ParaBlock runs them at the same time on two threads,
trains from the stale model, and applies the block-level correction at the barrier. After round
T-1 both drain: upload the last delta and apply its aggregate. ParaBlock's options
``local_steps_max`` (extra steps while the link is busy) and ``duplex`` (round t's delta starts
up before round t-1's aggregate is down) are explained in ``overlap.py``. ``fedit_lora`` is
FedBCD's sequence over a single block, the LoRA adapter; ``fedavg_full`` the same over one block
holding every parameter; ``cyclic`` (FedCyBGD-style) has clients train in turn, one block per
turn, each from the latest global model.

An ``Algorithm`` entry holds everything else that depends on the algorithm: the fewest blocks it
can alternate between, whether it trains an adapter or the whole model as one block, whether its
clients take turns, whether a checkpoint can resume it, whether the correction ablation applies,
its round-time model (``tools/estimate.py``) and its role in ``compare``. Adding an algorithm is
adding one entry here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from parablock.core.client import Client
from parablock.core.metrics import RoundRecord
from parablock.core.overlap import InFlight
from parablock.errors import ConfigError, RunStopped
from parablock.registry import Registry
from parablock.wire.messages import BlockValue
from parablock.wire.protocol import JoinReply

Loop = Callable[[Client], None]


@dataclass(frozen=True)
class Algorithm:
    """One algorithm: its client loop and everything the run needs to know of it."""

    name: str
    loop: Loop
    min_blocks: int = 1  # the fewest selected blocks it can run on
    adapter: bool = False  # it trains a LoRA adapter ([lora]) instead of blocks of the model
    whole_model: bool = False  # one block holds every parameter; model.blocks does not apply
    in_turn: bool = False  # one client per round, in turn: round t is client t mod N's
    resumable: bool = True  # --resume can continue it from its checkpoint
    ablation: bool = False  # federation.correction=none applies (it has an in-flight block)
    round_model: str | None = "sequential"  # its round time's shape (tools/estimate.py)
    compare: str = ""  # "baseline": compare's speed-ups are against it; "default": run by default


ALGORITHMS: Registry[Algorithm] = Registry("algorithm")


def algorithm(name: str) -> Algorithm:
    """The entry of ``name`` (an unknown name fails, listing the valid ones)."""
    return ALGORITHMS.get(name)


def check_plan(algorithm: str, selected: list[int]) -> None:
    """Refuse a block selection the algorithm cannot run, before any client starts (the config
    refuses what it can see without the model; this sees e.g. a 1-layer model with 'all')."""
    need = ALGORITHMS.get(algorithm).min_blocks
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


def run_client(client: Client, reply: JoinReply) -> None:
    """Take the join ``reply`` (catch up on the blocks it names), run the run's algorithm to the
    end, and release the client's threads."""
    run = ALGORITHMS.get(reply.settings.algorithm).loop
    try:
        client.restore()  # what its checkpoint holds: dirty blocks, pending delta, records
        client.join(reply)
        run(client)
        if client.log.rounds:
            client.report(client.log.rounds[-1], final=True)
    finally:
        client.close()


def cyclic(client: Client) -> None:
    """Train this client's turns in order, each from the latest global model (see the module
    docstring); every other round it neither trains nor sends."""
    turns = client.turns
    if len(turns) != len(client.plan):
        raise ConfigError(
            f"client {client.id}: federation.algorithm=cyclic needs the server's turn order "
            f"({len(turns)} turns for {len(client.plan)} rounds)"
        )
    for t in range(client.start_round, len(client.plan)):
        if turns[t] != client.id:
            continue
        if t > 0:
            client.connection.wait_aggregate(t - 1)  # the previous turn is in the global model
        record = client.new_record(t)
        idle_from = time.time()
        client.catch_up(t, record)
        record.idle_s = time.time() - idle_from  # the compute side waits for every transfer
        client.pending = client.compute(t, record)
        idle_from = time.time()
        client.correct(client.communicate(client.pending, record))
        record.idle_s += time.time() - idle_from
        client.pending = None
        client.barrier(record)
        if client.stopping():
            raise RunStopped(f"client {client.id} stopped")
    # The end: take the turns of the others since this client's last one.
    last = len(client.plan)
    client.connection.wait_aggregate(last - 1)
    record = client.new_record(last, drain=True)
    client.catch_up(last, record)
    client.barrier(record)


# ParaBlock trains round t+1's block while round t's is still in flight, so the schedule must
# alternate between at least two blocks; FedBCD waits for each aggregate and can train just one,
# and so can the baselines: cyclic (each turn starts from the latest model) and fedavg_full (its
# one block is every parameter, whatever model.blocks says).
for entry in (
    Algorithm(
        "parablock",
        parablock,
        min_blocks=2,
        ablation=True,
        round_model="parallel",
        compare="default",
    ),
    Algorithm("fedbcd", fedbcd, compare="baseline"),
    # FedIT (federated instruction tuning with LoRA): FedAvg over the adapter; its one block
    # trains every round, so the client does exactly FedBCD's sequence (no round model: its
    # blocks are not the model's)
    Algorithm("fedit_lora", fedbcd, adapter=True, round_model=None),
    # full-parameter FedAvg: FedBCD's ordering over one block holding every parameter
    Algorithm("fedavg_full", fedbcd, whole_model=True),
    # A client's barrier comes only at its own turns, so no round has every client's state,
    # which a local resume needs (checkpoint.load); its checkpoint files still serve restarts.
    Algorithm("cyclic", cyclic, in_turn=True, resumable=False, round_model="in_turn"),
):
    ALGORITHMS.add(entry.name, entry)
