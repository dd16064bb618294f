"""Data: chat formatting with response-only labels, truncation, partitions, batches, schedules."""

from __future__ import annotations

import pytest

from parablock.core.schedule import SCHEDULES, make_plan
from parablock.data.examples import IGNORE, DataError, DataStats, Record, encode, round_indices
from parablock.data.partition import partition


def test_loss_only_on_response_tokens(tiny_tokenizer):
    rec = Record("What is 2+2?", "2+2 = 4\n#### 4")
    ex = encode(rec, tiny_tokenizer, 512)
    n_prompt = sum(1 for t in ex.labels if t == IGNORE)
    prompt_text = tiny_tokenizer.decode(ex.input_ids[:n_prompt])
    response_text = tiny_tokenizer.decode([t for t in ex.labels if t != IGNORE])
    assert "What is 2+2?" in prompt_text and "#### 4" not in prompt_text
    assert response_text.startswith("2+2 = 4\n#### 4")
    assert list(ex.labels[n_prompt:]) == list(ex.input_ids[n_prompt:])


def test_truncation_and_dropping_are_counted(tiny_tokenizer):
    stats = DataStats()
    rec = Record("short question", "a " * 200)
    ex = encode(rec, tiny_tokenizer, 64, stats)
    assert ex is not None and len(ex.input_ids) == 64 and stats.truncated == 1
    assert encode(Record("q " * 200, "a"), tiny_tokenizer, 64, stats) is None
    assert stats.dropped == 1 and stats.kept == 1


def test_iid_partition_is_seeded_disjoint_and_complete():
    parts = partition(103, 4, "iid", seed=1)
    assert sorted(i for p in parts for i in p) == list(range(103))
    assert [len(p) for p in parts] == [26, 26, 26, 25]
    assert parts == partition(103, 4, "iid", seed=1) != partition(103, 4, "iid", seed=2)
    with pytest.raises(DataError, match="use fewer clients or more data"):
        partition(3, 4, "iid", seed=0)


def test_round_batches_are_a_function_of_seed_and_round():
    assert round_indices(50, 3, 2, 4, seed=0) == round_indices(50, 3, 2, 4, seed=0)
    assert round_indices(50, 3, 2, 4, seed=0) != round_indices(50, 4, 2, 4, seed=0)
    b = round_indices(5, 0, 2, 4, seed=0)  # more than the data: sampled with replacement
    assert len(b) == 2 and all(len(x) == 4 for x in b)


@pytest.mark.parametrize("name", SCHEDULES.names())
def test_schedules_never_repeat_the_block_in_flight(name):
    plan = make_plan(name, [3, 5, 7, 9], 40, seed=4)
    assert len(plan) == 40 and set(plan) <= {3, 5, 7, 9}
    assert all(a != b for a, b in zip(plan, plan[1:], strict=False))
    assert plan == make_plan(name, [3, 5, 7, 9], 40, seed=4)


def test_cyclic_orders():
    assert make_plan("cyclic", [1, 2, 3], 5, 0) == [1, 2, 3, 1, 2]
    assert make_plan("cyclic_desc", [1, 2, 3], 4, 0) == [3, 2, 1, 3]
