"""Aggregators against hand computations, and what each does to one crafted outlier."""

from __future__ import annotations

import pytest
import torch

from parablock.core.aggregate import AGGREGATORS, capped_weights, delta_norm
from parablock.wire.messages import BlockUpdate


def _updates(values: list[list[float]], counts: list[int] | None = None) -> list[BlockUpdate]:
    counts = counts or [1] * len(values)
    return [
        BlockUpdate(i, 0, 0, -1, n, 0.0, {"w": torch.tensor(v, dtype=torch.float32)})
        for i, (v, n) in enumerate(zip(values, counts, strict=True))
    ]


def _agg(name, updates, weights=None, trim=0.0):
    weights = weights or capped_weights([u.num_examples for u in updates], 1.0)
    return AGGREGATORS.get(name)(updates, weights, trim)["w"].tolist()


def test_weighted_mean_and_mean_by_hand():
    ups = _updates([[1.0, 2.0], [4.0, 8.0]], counts=[3, 1])
    assert _agg("weighted_mean", ups) == [1.75, 3.5]  # (3*1 + 4) / 4, (3*2 + 8) / 4
    assert _agg("mean", ups) == [2.5, 5.0]


def test_median_odd_and_even_by_hand():
    assert _agg("median", _updates([[1.0, 9.0], [3.0, 7.0], [2.0, 8.0]])) == [2.0, 8.0]
    assert _agg("median", _updates([[1.0], [3.0], [2.0], [10.0]])) == [2.5]


def test_trimmed_mean_drops_k_from_each_end_per_coordinate():
    ups = _updates([[1.0, -5.0], [2.0, 0.0], [3.0, 1.0], [4.0, 2.0], [100.0, 3.0]])
    # n=5, trim 0.2 -> k=1: coordinate 0 keeps 2,3,4; coordinate 1 keeps 0,1,2
    assert _agg("trimmed_mean", ups, trim=0.2) == [3.0, 1.0]
    assert _agg("trimmed_mean", ups, trim=0.1) == _agg("mean", ups)  # k = 0


def test_norm_clipped_mean_scales_long_deltas_to_the_median_norm():
    ups = _updates([[3.0, 4.0], [0.0, 5.0], [0.0, 50.0]])  # norms 5, 5, 50
    assert _agg("norm_clipped_mean", ups) == pytest.approx([1.0, (4 + 5 + 5) / 3])


@pytest.mark.parametrize("name", ["median", "trimmed_mean", "norm_clipped_mean"])
def test_robust_aggregators_bound_a_crafted_outlier(name):
    honest = [[0.1, -0.1]] * 4
    ups = _updates(honest + [[1e6, -1e6]])
    out = _agg(name, ups, trim=0.2)
    assert max(abs(x) for x in out) < 0.5, out  # the outlier cannot drag the result away
    assert max(abs(x) for x in _agg("weighted_mean", ups)) > 1e5  # the plain mean can


def test_capped_weights():
    assert capped_weights([3, 1], 1.0) == [0.75, 0.25]  # exact n_i / sum when no cap binds
    w = capped_weights([1000, 1, 1, 1], 0.4)
    assert w[0] == pytest.approx(0.4) and sum(w) == pytest.approx(1.0)
    assert w[1] == w[2] == w[3] == pytest.approx(0.2)
    assert capped_weights([5, 1], 0.4) == [0.5, 0.5]  # the cap cannot hold: equal shares
    w = capped_weights([100, 90, 1, 1, 1], 0.3)  # two capped, the rest share what is left
    assert w[:2] == pytest.approx([0.3, 0.3]) and w[2:] == pytest.approx([0.4 / 3] * 3)


def test_delta_norm_is_over_the_whole_block():
    assert delta_norm({"a": torch.tensor([3.0]), "b": torch.tensor([4.0])}) == 5.0
