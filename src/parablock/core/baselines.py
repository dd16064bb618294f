"""The baselines beside ParaBlock and FedBCD, on the same server, links, messages and round loop.

- ``fedavg_full``: full-parameter FedAvg. The protocol has one block, ``all``, holding every
  parameter of the model; every round every client trains it for K steps with FedBCD's ordering
  (download the last aggregate, train, upload) and the whole model travels both ways. The cost
  ceiling that block methods avoid.
- ``cyclic``: cyclic block training in the manner of FedCyBGD. Clients train in turn, one block per
  turn: round t is client t mod N's, which first brings its copy up to the latest global model
  (waits for round t-1's aggregate, downloads every block that moved since its last turn), trains
  the round's block, uploads the delta and takes the aggregate; the server expects only that
  client's update in round t. Everyone catches up once more after the last round, so every client
  ends equal to the server.

What each algorithm asks of the run beyond its client loop (its blocks, who takes part in a round,
whether a checkpoint can resume it) is its ``Traits``; runner, server, clients and tools ask these
rather than the algorithm's name.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from torch import nn

from parablock.core.client import Client
from parablock.errors import ConfigError, RunStopped
from parablock.model.blocks import Block, model_blocks, select_blocks
from parablock.model.lora import LoraSettings, blocks_for

log = logging.getLogger(__name__)

WHOLE_MODEL = "all"  # the name of fedavg_full's one block


@dataclass(frozen=True)
class Traits:
    """What an algorithm needs from the run besides its client loop."""

    whole_model: bool = False  # one block holds every parameter; model.blocks does not apply
    in_turn: bool = False  # one client per round, in turn: round t is client t mod N's
    resumable: bool = True  # --resume can continue it from its checkpoint
    ablation: bool = False  # federation.correction=none applies (it has an in-flight block)


TRAITS: dict[str, Traits] = {
    "parablock": Traits(ablation=True),
    "fedavg_full": Traits(whole_model=True),
    # A client's barrier comes only at its own turns, so no round has every client's state, which
    # a local resume needs (checkpoint.load); its checkpoint files still serve client restarts.
    "cyclic": Traits(in_turn=True, resumable=False),
}


def traits(algorithm: str) -> Traits:
    return TRAITS.get(algorithm, Traits())


# -- blocks ----------------------------------------------------------------------------------


def protocol_blocks(
    model: nn.Module,
    algorithm: str,
    extra: str = "",
    lora: LoraSettings | None = None,
    seed: int = 0,
) -> list[Block]:
    """The blocks the run's messages, versions and checkpoints use: the model's blocks (one per
    decoder layer and the extra ones), for a whole-model algorithm one block of everything, and
    with ``lora`` the one adapter block (the adapter is injected into ``model`` here)."""
    if lora is not None:
        return blocks_for(model, extra, lora, seed)
    if traits(algorithm).whole_model:
        names = tuple(n for n, _ in model.named_parameters())  # tied weights appear once
        return [Block(0, WHOLE_MODEL, names)]
    return model_blocks(model, extra)


def layout(
    model: nn.Module,
    algorithm: str,
    extra: str,
    spec: str,
    lora: LoraSettings | None = None,
    seed: int = 0,
) -> tuple[list[Block], list[int]]:
    """The run's blocks and the ones that train (``model.blocks``; everything for fedavg_full
    and for a LoRA adapter)."""
    blocks = protocol_blocks(model, algorithm, extra, lora, seed)
    if lora is not None:
        return blocks, [b.index for b in blocks]
    if traits(algorithm).whole_model:
        log.info(
            "%s trains every parameter as one block; model.blocks=%r and model.extra_blocks do "
            "not apply",
            algorithm,
            spec,
        )
        return blocks, [0]
    return blocks, select_blocks(blocks, spec)


# -- participation ---------------------------------------------------------------------------


def round_turns(algorithm: str, rounds: int, clients: int) -> list[int]:
    """The one client that trains each round, for an in-turn algorithm; [] = every client."""
    if not traits(algorithm).in_turn:
        return []
    return [t % clients for t in range(rounds)]


# -- the cyclic client loop ------------------------------------------------------------------


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
