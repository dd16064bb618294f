"""Block schedules: which block every client trains in round t.

Every schedule is computed up front from a seed, so round t+1's block is known before round t's
aggregate arrives, and consecutive rounds never pick the same block when two or more are selected
(ParaBlock must not train the block still in flight). FedBCD uses the same schedules, so the two
algorithms see identical block orders.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from parablock.registry import Registry

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
