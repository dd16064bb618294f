"""Federated partitions: sizes add up, seeded, Dirichlet skew against alpha, by_label, stats, plot."""

from __future__ import annotations

import json

import numpy as np
import pytest

from parablock.data.examples import DataError, Example
from parablock.data.partition import PARTITIONS, client_stats, partition, save
from parablock.registry import UnknownNameError

LABELS = [f"L{i % 10}" for i in range(1000)]  # 10 labels, 100 examples each


def _label_shares(parts: list[list[int]]) -> np.ndarray:
    """Rows: clients; columns: the share of each label in that client's data."""
    out = np.zeros((len(parts), 10))
    for c, idx in enumerate(parts):
        for i in idx:
            out[c, int(LABELS[i][1:])] += 1
        out[c] /= max(1, len(idx))
    return out


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "by_label"])
def test_every_example_on_exactly_one_client_and_seeded(kind):
    parts = partition(LABELS, 4, kind, seed=1, alpha=0.3)
    assert sorted(i for p in parts for i in p) == list(range(len(LABELS)))
    assert all(parts)
    assert parts == partition(LABELS, 4, kind, seed=1, alpha=0.3)
    if kind != "by_label":  # by_label is deterministic by design
        assert parts != partition(LABELS, 4, kind, seed=2, alpha=0.3)


def test_dirichlet_small_alpha_is_skewed_large_alpha_is_near_iid():
    uniform = np.full(10, 0.1)
    skewed = _label_shares(partition(LABELS, 4, "dirichlet", seed=0, alpha=0.05))
    near = _label_shares(partition(LABELS, 4, "dirichlet", seed=0, alpha=1000.0))
    tv_skewed = 0.5 * np.abs(skewed - uniform).sum(1).mean()
    tv_near = 0.5 * np.abs(near - uniform).sum(1).mean()
    # Total-variation distance of each client's label mix from the global mix.
    assert tv_skewed > 0.5, tv_skewed
    assert tv_near < 0.08, tv_near
    # with small alpha most clients are dominated by a few labels
    assert np.mean(np.sort(skewed, 1)[:, -2:].sum(1)) > 0.7


def test_iid_client_weights_give_unequal_sizes():
    parts = partition(1000, 4, "iid", seed=0, weights=(4, 2, 1, 1))
    assert [len(p) for p in parts] == [500, 250, 125, 125]


def test_by_label_gives_each_label_to_one_client():
    parts = partition(LABELS, 3, "by_label", seed=0)
    owners = {}
    for c, idx in enumerate(parts):
        for i in idx:
            assert owners.setdefault(LABELS[i], c) == c
    assert sorted(len(p) for p in parts) == [300, 300, 400]


def test_a_client_left_empty_is_a_clear_error():
    with pytest.raises(DataError, match="label.* for 12 clients .*use fewer clients or more data"):
        partition(LABELS, 12, "by_label", seed=0)
    with pytest.raises(DataError, match="no examples; use fewer clients or more data"):
        partition(["a"] * 5, 4, "dirichlet", seed=0, alpha=0.001)
    with pytest.raises(DataError, match="use fewer clients or more data"):
        partition(3, 4, "iid", seed=0)
    with pytest.raises(
        UnknownNameError, match="valid: by_label, dirichlet, iid, per_client, replicate"
    ):
        partition(10, 2, "shards", seed=0)
    assert PARTITIONS.names() == ["by_label", "dirichlet", "iid", "per_client", "replicate"]


def test_stats_count_examples_tokens_labels_and_are_saved_with_a_plot(tmp_path):
    examples = [Example((1, 2, 3), (-100, 2, 3), "a"), Example((1, 2), (-100, 2), "b")] * 3
    parts = [[0, 1, 2], [3, 4, 5]]
    stats = client_stats(examples, parts)
    assert stats[0] == {
        "client": 0,
        "examples": 3,
        "tokens": 8,
        "response_tokens": 5,
        "labels": {"a": 2, "b": 1},
    }
    save(tmp_path, stats, "dirichlet", 0.5)
    saved = json.loads((tmp_path / "partition.json").read_text())
    assert saved["partition"] == "dirichlet" and saved["clients"] == stats
    assert (tmp_path / "partition.png").read_bytes()[:4] == b"\x89PNG"
