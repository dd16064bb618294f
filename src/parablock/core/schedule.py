"""Which blocks a run has, which it trains in round t, and (for an algorithm whose clients take
turns) which client trains it.

The run's blocks (``protocol_blocks``): one per decoder layer and the extra ones; for a
whole-model algorithm one block of every parameter (named ``all``); with a LoRA adapter the one
adapter block. Block schedules:

Every schedule is computed up front from a seed, so round t+1's block is known before round t's
aggregate arrives, and consecutive rounds never pick the same block when two or more are selected
(ParaBlock must not train the block still in flight). FedBCD uses the same schedules, so the two
algorithms see identical block orders.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
from torch import nn

from parablock.core.algorithms import ALGORITHMS
from parablock.model.blocks import Block, model_blocks, select_blocks
from parablock.model.lora import LoraSettings, blocks_for
from parablock.registry import Registry

log = logging.getLogger(__name__)

WHOLE_MODEL = "all"  # the name of fedavg_full's one block

Schedule = Callable[[list[int], int, int], list[int]]
SCHEDULES: Registry[Schedule] = Registry("block schedule")


@SCHEDULES.register("cyclic")
def cyclic(blocks: list[int], rounds: int, seed: int) -> list[int]:
    """Ascending over the selected blocks, wrapping around."""
    return [blocks[t % len(blocks)] for t in range(rounds)]


@SCHEDULES.register("cyclic_desc")
def cyclic_desc(blocks: list[int], rounds: int, seed: int) -> list[int]:
    """Descending (top block first), wrapping around."""
    return cyclic(sorted(blocks, reverse=True), rounds, seed)


@SCHEDULES.register("reshuffle")
def reshuffle(blocks: list[int], rounds: int, seed: int) -> list[int]:
    """A fresh seeded permutation for every pass over the blocks."""
    rng = np.random.default_rng([seed, 3])
    out: list[int] = []
    while len(out) < rounds:
        perm = [blocks[i] for i in rng.permutation(len(blocks))]
        if out and len(perm) > 1 and perm[0] == out[-1]:
            perm[0], perm[1] = perm[1], perm[0]
        out.extend(perm)
    return out[:rounds]


@SCHEDULES.register("random")
def random(blocks: list[int], rounds: int, seed: int) -> list[int]:
    """Seeded uniform choice, redrawn when it repeats the previous round's block."""
    rng = np.random.default_rng([seed, 5])
    out: list[int] = []
    for _ in range(rounds):
        b = blocks[int(rng.integers(len(blocks)))]
        while out and len(blocks) > 1 and b == out[-1]:
            b = blocks[int(rng.integers(len(blocks)))]
        out.append(b)
    return out


def make_plan(name: str, blocks: list[int], rounds: int, seed: int) -> list[int]:
    plan = SCHEDULES.get(name)(list(blocks), rounds, seed)
    assert len(plan) == rounds
    return plan


def protocol_blocks(
    model: nn.Module,
    algorithm: str,
    extra: str = "",
    lora: LoraSettings | None = None,
    seed: int = 0,
    block_size: int = 1,
) -> list[Block]:
    """The blocks the run's messages, versions and checkpoints use: the model's blocks (one per
    decoder layer and the extra ones), for a whole-model algorithm one block of everything, and
    with ``lora`` the one adapter block (the adapter is injected into ``model`` here)."""
    if lora is not None:
        return blocks_for(model, extra, lora, seed, block_size)
    if algorithm and ALGORITHMS.get(algorithm).whole_model:  # "": the model's own blocks
        names = tuple(n for n, _ in model.named_parameters())  # tied weights appear once
        return [Block(0, WHOLE_MODEL, names)]
    return model_blocks(model, extra, block_size)


def layout(
    model: nn.Module,
    algorithm: str,
    extra: str,
    spec: str,
    lora: LoraSettings | None = None,
    seed: int = 0,
    block_size: int = 1,
) -> tuple[list[Block], list[int]]:
    """The run's blocks and the ones that train (``model.blocks``; everything for fedavg_full
    and for a LoRA adapter)."""
    blocks = protocol_blocks(model, algorithm, extra, lora, seed, block_size)
    if lora is not None:
        return blocks, [b.index for b in blocks]
    if algorithm and ALGORITHMS.get(algorithm).whole_model:  # "": the model's own blocks
        log.info(
            "%s trains every parameter as one block; model.blocks=%r and model.extra_blocks do "
            "not apply",
            algorithm,
            spec,
        )
        return blocks, [0]
    return blocks, select_blocks(blocks, spec)


def round_turns(algorithm: str, rounds: int, clients: int) -> list[int]:
    """The one client that trains each round, for an in-turn algorithm; [] = every client."""
    if not algorithm or not ALGORITHMS.get(algorithm).in_turn:
        return []
    return [t % clients for t in range(rounds)]
