"""Server-side aggregation of block deltas: x[b] <- x[b] + server_lr * combine(deltas)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from parablock.core.messages import BlockUpdate
from parablock.errors import AggregationError  # noqa: F401
from parablock.registry import Registry

Aggregator = Callable[[list[BlockUpdate]], dict[str, torch.Tensor]]
AGGREGATORS: Registry[Aggregator] = Registry("aggregator")


def _check(updates: list[BlockUpdate]) -> None:
    if not updates:
        raise AggregationError("no updates to aggregate")
    blocks = sorted({u.block for u in updates})
    rounds = sorted({u.round for u in updates})
    if len(blocks) > 1 or len(rounds) > 1:
        raise AggregationError(f"updates for blocks {blocks} / rounds {rounds} in one aggregation")


@AGGREGATORS.register("weighted_mean")
def weighted_mean(updates: list[BlockUpdate]) -> dict[str, torch.Tensor]:
    """Sum_i n_i delta_i / Sum_i n_i, summed in client order so the result is reproducible."""
    _check(updates)
    updates = sorted(updates, key=lambda u: u.client)
    total = sum(u.num_examples for u in updates)
    out = {}
    for name in updates[0].tensors:
        acc = torch.zeros_like(updates[0].tensors[name], dtype=torch.float32)
        for u in updates:
            acc += (u.num_examples / total) * u.tensors[name].float()
        out[name] = acc
    return out


@AGGREGATORS.register("mean")
def mean(updates: list[BlockUpdate]) -> dict[str, torch.Tensor]:
    """Unweighted mean over clients."""
    _check(updates)
    updates = sorted(updates, key=lambda u: u.client)
    return {
        name: torch.stack([u.tensors[name].float() for u in updates]).mean(0)
        for name in updates[0].tensors
    }


def apply(base: dict[str, torch.Tensor], delta: dict[str, torch.Tensor], server_lr: float):
    """The new global block value base + server_lr * delta (the one formula clients mirror)."""
    return {n: base[n] + server_lr * delta[n] for n in base}
