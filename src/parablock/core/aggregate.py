"""Server-side aggregation of block deltas: x[b] <- x[b] + server_lr * combine(deltas).

An aggregator is called as ``fn(updates, weights, trim_fraction, at)``: the round's validated
updates (one block, one round), each update's weight (its ``num_examples`` after the server's
caps, normalised to sum to 1), ``federation.trim_fraction`` and where it runs (``core/pipeline.py``'s
``At``: the round, the block and a seeded generator; the aggregators here need none of them). It returns the combined delta in float32.
Every aggregator works in client order, so a result is reproducible bit for bit.

- ``weighted_mean``: sum_i w_i delta_i (FedAvg).
- ``mean``: the unweighted mean.
- ``median``: the coordinate-wise median (robust to fewer than half of the clients being hostile).
- ``trimmed_mean``: per coordinate, drop the ``floor(trim_fraction * n)`` largest and smallest
  values and average the rest.
- ``norm_clipped_mean``: scale every delta whose L2 norm exceeds the round's median norm down to
  it, then the weighted mean (an outlier keeps its direction but loses its size).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from parablock.errors import AggregationError  # noqa: F401
from parablock.registry import Registry
from parablock.wire.messages import BlockUpdate

Aggregator = Callable[..., dict[str, torch.Tensor]]  # (updates, weights, trim_fraction, at)
AGGREGATORS: Registry[Aggregator] = Registry("aggregator")


def _check(updates: list[BlockUpdate], weights: list[float]) -> None:
    if not updates:
        raise AggregationError("no updates to aggregate")
    if len(weights) != len(updates):
        raise AggregationError(f"{len(weights)} weights for {len(updates)} updates")
    blocks = sorted({u.block for u in updates})
    rounds = sorted({u.round for u in updates})
    if len(blocks) > 1 or len(rounds) > 1:
        raise AggregationError(f"updates for blocks {blocks} / rounds {rounds} in one aggregation")


def _ordered(updates: list[BlockUpdate], weights: list[float]):
    _check(updates, weights)
    return sorted(zip(updates, weights, strict=True), key=lambda uw: uw[0].client)


def _weighted(pairs, scale=None) -> dict[str, torch.Tensor]:
    out = {}
    for name in pairs[0][0].tensors:
        acc = torch.zeros_like(pairs[0][0].tensors[name], dtype=torch.float32)
        for i, (u, w) in enumerate(pairs):
            s = w if scale is None else w * scale[i]
            acc += s * u.tensors[name].float()
        out[name] = acc
    return out


@AGGREGATORS.register("weighted_mean")
def weighted_mean(updates, weights, trim_fraction=0.0, at=None) -> dict[str, torch.Tensor]:
    """Sum_i w_i delta_i, summed in client order."""
    return _weighted(_ordered(updates, weights))


@AGGREGATORS.register("mean")
def mean(updates, weights, trim_fraction=0.0, at=None) -> dict[str, torch.Tensor]:
    """Unweighted mean over clients."""
    pairs = _ordered(updates, weights)
    return {
        name: torch.stack([u.tensors[name].float() for u, _ in pairs]).mean(0)
        for name in pairs[0][0].tensors
    }


@AGGREGATORS.register("median")
def median(updates, weights, trim_fraction=0.0, at=None) -> dict[str, torch.Tensor]:
    """Coordinate-wise median; with an even count, the mean of the two middle values."""
    pairs = _ordered(updates, weights)
    n = len(pairs)
    out = {}
    for name in pairs[0][0].tensors:
        values = torch.stack([u.tensors[name].float() for u, _ in pairs]).sort(0).values
        lo, hi = (n - 1) // 2, n // 2
        out[name] = (values[lo] + values[hi]) / 2 if lo != hi else values[lo].clone()
    return out


@AGGREGATORS.register("trimmed_mean")
def trimmed_mean(updates, weights, trim_fraction=0.1, at=None) -> dict[str, torch.Tensor]:
    """Per coordinate, the mean of the values left after dropping k = floor(trim_fraction * n)
    from each end (k = 0: the plain mean)."""
    pairs = _ordered(updates, weights)
    n = len(pairs)
    k = min(math.floor(trim_fraction * n), (n - 1) // 2)
    return {
        name: torch.stack([u.tensors[name].float() for u, _ in pairs])
        .sort(0)
        .values[k : n - k]
        .mean(0)
        for name in pairs[0][0].tensors
    }


def delta_norm(tensors: dict[str, torch.Tensor]) -> float:
    """The L2 norm of a whole block delta (all its tensors as one vector), in float64."""
    return math.sqrt(sum(float(t.double().square().sum()) for t in tensors.values()))


@AGGREGATORS.register("norm_clipped_mean")
def norm_clipped_mean(updates, weights, trim_fraction=0.0, at=None) -> dict[str, torch.Tensor]:
    """Deltas longer than the round's median norm are scaled down to it, then weighted-averaged."""
    pairs = _ordered(updates, weights)
    norms = [delta_norm(u.tensors) for u, _ in pairs]
    bound = sorted(norms)[(len(norms) - 1) // 2]
    scale = [1.0 if n <= bound or n == 0 else bound / n for n in norms]
    return _weighted(pairs, scale)


def capped_weights(counts: list[int], max_share: float) -> list[float]:
    """``counts`` normalised to shares, none above ``max_share`` (the excess goes to the others in
    proportion to their counts). When no cap binds the shares are exactly ``n_i / sum(n)``;
    when the cap cannot hold (fewer than ``1 / max_share`` updates) the shares are equal."""
    total = sum(counts)
    shares = [c / total for c in counts]
    if max_share >= 1.0 or max(shares) <= max_share:
        return shares
    n = len(counts)
    if n * max_share <= 1.0:
        return [1.0 / n] * n
    capped: set[int] = set()
    while True:  # water-filling: fix the capped ones, spread the rest by count
        free = [i for i in range(n) if i not in capped]
        left = 1.0 - max_share * len(capped)
        free_total = sum(counts[i] for i in free)
        shares = [max_share if i in capped else left * counts[i] / free_total for i in range(n)]
        over = {i for i in free if shares[i] > max_share}
        if not over:
            return shares
        capped |= over


def apply(base: dict[str, torch.Tensor], delta: dict[str, torch.Tensor], server_lr: float):
    """The new global block value base + server_lr * delta (the one formula clients mirror)."""
    return {n: base[n] + server_lr * delta[n] for n in base}
