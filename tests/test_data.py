"""Data: chat formatting with response-only labels, truncation, partitions, batches, schedules."""

from __future__ import annotations

import random
import time

import pytest

from parablock.core.schedule import SCHEDULES, make_plan
from parablock.data import examples
from parablock.data.examples import (
    IGNORE,
    DataError,
    DataStats,
    Record,
    encode,
    head_ids,
    round_indices,
)
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


def test_a_huge_record_is_tokenised_only_as_far_as_max_length(tiny_tokenizer):
    """A 4 MB response (or prompt) costs the tokens it keeps, not gigabytes: fast, and still
    counted as truncated (or dropped)."""
    stats = DataStats()
    started = time.monotonic()
    ex = encode(Record("What is this?", "word " * 800_000), tiny_tokenizer, 64, stats)
    assert encode(Record("q " * 2_000_000, "a"), tiny_tokenizer, 64, stats) is None
    assert time.monotonic() - started < 2.0  # whole: ~4 s and over 1 GB of memory
    assert ex is not None and len(ex.input_ids) == 64
    assert (stats.kept, stats.truncated, stats.dropped) == (1, 1, 1)
    full = encode(Record("What is this?", "word " * 200), tiny_tokenizer, 64)
    assert full == ex  # the same tokens as tokenising the whole text


@pytest.mark.parametrize("text", ["prose", "no spaces", "mixed scripts", "spaces"])
def test_head_ids_are_the_leading_ids_of_the_whole_text(tiny_tokenizer, monkeypatch, text):
    """Cut pieces (forced small here) give exactly the whole text's leading token ids, and more
    than n of them exactly when the whole text has more than n."""
    rng = random.Random(text)
    alphabet = {
        "prose": "the cat sat on 12 mats, then 3.5 more. ",
        "no spaces": "abcxyz0123",
        "mixed scripts": "ab cdé\n\t  12,.;\U0001f600中文\u2028xyz<|im_end|>",
        "spaces": " \n",
    }[text]
    s = "".join(rng.choice(alphabet) for _ in range(6000))
    whole = list(tiny_tokenizer(s, add_special_tokens=False)["input_ids"])
    monkeypatch.setattr(examples, "CHARS_PER_TOKEN", 2)
    for n in (1, 7, 50, 300, len(whole) - 1, len(whole), len(whole) + 5):
        ids = head_ids(tiny_tokenizer, s, n)
        assert ids == whole[: len(ids)]
        assert (len(ids) > n) == (len(whole) > n)
        assert len(ids) >= min(n + 1, len(whole))


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
