"""Evaluation: answer extraction on real GSM8K answers, scorers, batched greedy decoding, replaying
the aggregate history, and an end-to-end tiny run that evaluates accuracy every few rounds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import make_model, tiny_config
from parablock.backends.local import run_local
from parablock.data.examples import Record, encode_all
from parablock.data.sources import gsm8k_reference, reasoning_gym_records
from parablock.evaluation import evaluate as ev
from parablock.evaluation.evaluate import (
    AggregateHistory,
    EvalResult,
    EvalSettings,
    Evaluator,
    eval_rounds,
    extract_number,
    generate,
    normalise_number,
    score_number,
    score_reasoning_gym,
)
from parablock.evaluation.interval import accuracy_text, wilson_interval
from parablock.model.load import load_model
from parablock.run.runner import prepare, run

GSM8K = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "gsm8k" / "train.jsonl"


@pytest.mark.parametrize(
    "text, want",
    [
        ("She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18", "18"),
        ("#### 1,234", "1234"),
        ("so the total is $1,234.50.", "1234.5"),
        ("It drops by -3 degrees, i.e. -3.", "-3"),
        ("The answer is 5.0", "5"),
        ("#### -0", "0"),
        ("no number here", None),
        ("first 12 then #### 7 and later 99", "7"),
    ],
)
def test_extract_number(text, want):
    assert extract_number(text) == want


@pytest.mark.skipif(not GSM8K.is_file(), reason="../shared/data/gsm8k is not present")
def test_extraction_on_real_gsm8k_answers():
    rows = [json.loads(x) for x in GSM8K.read_text().splitlines()]
    assert len(rows) == 7473
    for row in rows:
        ref = gsm8k_reference(row["answer"])
        assert extract_number(row["answer"]) == normalise_number(ref), row["answer"]
        assert score_number(row["answer"], Record(row["question"], "", answer=ref))[1] == 1.0
    # Without the '#### N' line, the last number of the worked solution is usually the answer.
    body_hits = sum(
        extract_number(r["answer"].rsplit("####", 1)[0])
        == normalise_number(gsm8k_reference(r["answer"]))
        for r in rows
    )
    assert body_hits / len(rows) > 0.9


def test_reasoning_gym_scorer_is_the_tasks_own():
    (rec,) = reasoning_gym_records("basic_arithmetic", 1, seed=0)
    assert score_reasoning_gym(f"{rec.answer}", rec) == (rec.answer, 1.0)
    assert score_reasoning_gym("7", rec)[1] < 1.0
    (g,) = reasoning_gym_records("gsm_symbolic", 1, seed=0)
    assert score_reasoning_gym(g.response, g)[1] == 1.0  # the worked answer ends '#### N'


def test_batched_left_padded_greedy_equals_one_at_a_time(tiny_tokenizer):
    model = make_model(len(tiny_tokenizer), seed=3)
    recs = reasoning_gym_records("basic_arithmetic", 5, seed=1)
    recs.append(Record("Hi", ""))  # a much shorter prompt: heavy left padding in its batch
    batched = generate(model, tiny_tokenizer, recs, max_new_tokens=12, batch_size=6)
    single = [generate(model, tiny_tokenizer, [r], 12, 1)[0] for r in recs]
    assert batched == single
    assert any(batched)  # it generated something


def test_evaluator_scores_what_the_model_answered(tiny_tokenizer, monkeypatch):
    recs = reasoning_gym_records("gsm_symbolic", 4, seed=5) + [Record("no answer", "x")]
    examples = encode_all(recs, tiny_tokenizer, 320, "test")
    answers = [recs[0].response, "#### 0", recs[2].response + "\n", "garbage"]
    monkeypatch.setattr(ev, "generate", lambda model, tok, rs, n, b: answers[: len(rs)])
    evaluate = Evaluator(tiny_tokenizer, examples, recs, EvalSettings(4, 10, 8))
    assert len(evaluate.accuracy_records) == 4  # the unscorable record counts for the loss only
    result = evaluate(make_model(len(tiny_tokenizer)), 3, 1.5)
    assert result.accuracy == 0.5 and [it["correct"] for it in result.items] == [
        True,
        False,
        True,
        False,
    ]
    assert result.items[1]["output"] == "#### 0" and result.items[1]["extracted"] == "0"
    row = result.to_json()
    assert row["kind"] == "eval" and row["round"] == 3 and row["time_s"] == 1.5
    assert row["eval_loss"] == result.loss > 0 and row["eval_accuracy"] == 0.5
    assert row["eval_accuracy_ci"] == list(wilson_interval(2, 4))
    assert EvalResult.from_json(row).accuracy_ci == result.accuracy_ci == wilson_interval(2, 4)


# Newcombe (1998), "Two-sided confidence intervals for the single proportion", Table I, method 3
@pytest.mark.parametrize(
    "correct, n, low, high",
    [
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0, 0.1611),
        (1, 29, 0.0061, 0.1718),
    ],
)
def test_wilson_interval_matches_published_values(correct, n, low, high):
    got = wilson_interval(correct, n)
    assert got == pytest.approx((low, high), abs=5e-5)


def test_wilson_interval_edges_and_symmetry():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    low, high = wilson_interval(0, 64)
    assert low == 0.0 and 0.05 < high < 0.06  # never a point at 0/n
    assert wilson_interval(64, 64) == pytest.approx((1 - high, 1.0))
    assert wilson_interval(20, 64) == pytest.approx(
        tuple(1 - x for x in wilson_interval(44, 64)[::-1])
    )
    with pytest.raises(ValueError):
        wilson_interval(9, 8)
    scipy_stats = pytest.importorskip("scipy.stats")
    for k, n in ((3, 8), (40, 64), (1, 100)):
        ci = scipy_stats.binomtest(k, n).proportion_ci(method="wilson")
        assert wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-9)


def test_accuracy_text():
    assert accuracy_text(0.25, (0.1, 0.5)) == "0.250 (95% CI 0.100-0.500)"
    assert accuracy_text(0.25, None) == "0.250" and accuracy_text(None, None) == "-"


def test_eval_rounds():
    assert eval_rounds(16, 0) == [15]
    assert eval_rounds(16, 8) == [7, 15]
    assert eval_rounds(10, 4) == [3, 7, 9]


def test_replayed_aggregates_rebuild_the_global_model_of_every_round(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, str(tmp_path / "r"), federation={"rounds": 5})
    fed = prepare(cfg)
    history = AggregateHistory(eval_rounds(5, 2))
    snapshots = {}

    def hook(t, block, value, *_):
        history.record(t, block, value)
        snapshots[t] = {n: p.detach().clone() for n, p in fed.server.model.named_parameters()}

    fed.server.aggregate_listeners.append(hook)
    run_local(fed.placements, fed.server, threads=1)
    replica = load_model(tiny_model_dir)
    seen = []
    for t, time_s in history.replay(replica, fed.server.blocks):
        seen.append(t)
        assert time_s > 0
        for n, p in replica.named_parameters():
            assert torch.equal(p, snapshots[t][n]), (t, n)
    assert seen == [1, 3, 4]
    for n, p in replica.named_parameters():  # the last replay is the final global model
        assert torch.equal(p, dict(fed.server.model.named_parameters())[n])


def test_tiny_run_evaluates_loss_and_accuracy_before_during_and_after(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(
        tiny_model_dir,
        str(out),
        data={"partition": "dirichlet", "alpha": 0.5, "train_size": 24},
        eval={"size": 4, "accuracy_size": 3, "max_new_tokens": 6, "every": 2},
    )
    summary = run(cfg)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["round"] for r in evals] == [-1, 1, 3]
    assert evals[0]["time_s"] == 0 and evals[1]["time_s"] < evals[2]["time_s"]
    assert all(r["eval_accuracy"] is not None and r["eval_loss"] > 0 for r in evals)
    assert summary["initial_eval_accuracy"] == evals[0]["eval_accuracy"]
    for when, row in (("initial", evals[0]), ("final", evals[-1])):
        correct = round(row["eval_accuracy"] * 3)
        assert summary[f"{when}_eval_accuracy_ci"] == list(wilson_interval(correct, 3))
        assert row["eval_accuracy_ci"] == summary[f"{when}_eval_accuracy_ci"]
    assert summary["final_eval_accuracy"] == evals[-1]["eval_accuracy"]
    assert summary["final_eval_loss"] == evals[-1]["eval_loss"] != summary["initial_eval_loss"]
    items = [json.loads(x) for x in (out / "eval_items.jsonl").read_text().splitlines()]
    assert len(items) == 3 * 3 and {"prompt", "reference", "output", "correct"} <= set(items[0])
    part = json.loads((out / "partition.json").read_text())
    assert sum(c["examples"] for c in part["clients"]) == 24
    assert (out / "partition.png").is_file()
    data = json.loads((out / "data.json").read_text())
    assert data["train"]["kept"] + data["train"]["dropped"] == 24
