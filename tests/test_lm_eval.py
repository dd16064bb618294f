"""Standard evaluation through the lm-evaluation-harness on the tiny Llama: task specs fail fast,
the tasks are local files, generation and log-likelihood tasks both run on the in-memory model,
a run records them before and after training, compare shows them, and ``parablock eval`` works."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from conftest import make_model, tiny_config  # noqa: E402
from parablock.cli.main import main  # noqa: E402
from parablock.config import load  # noqa: E402
from parablock.errors import UserError  # noqa: E402
from parablock.evaluation.harness import HarnessSettings, run_tasks  # noqa: E402
from parablock.evaluation.tasks import parse_tasks, prepare  # noqa: E402
from parablock.run.rundir import _free  # noqa: E402
from parablock.run.runner import run  # noqa: E402
from parablock.tools.compare import markdown, table_rows  # noqa: E402
from parablock.tools.status import summary_table  # noqa: E402

SHARED_TEST = (
    Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "gsm8k" / "test.jsonl"
)
FAST = HarnessSettings(size=3, batch_size=4, max_new_tokens=4)


@pytest.fixture
def gsm8k_file(tmp_path) -> Path:
    """Three GSM8K-format items (the real test split stays out of the repository)."""
    rows = [
        {
            "question": f"Tom has {a} apples and buys {b} more. How many now?",
            "answer": f"#### {a + b}",
        }
        for a, b in ((2, 3), (10, 5), (7, 8))
    ]
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    "spec, message",
    [
        ("bogus", "unknown kind 'bogus'; valid: gsm8k:PATH.jsonl, reasoning_gym:TASK, syllogism"),
        ("gsm8k", "needs an argument: gsm8k:PATH.jsonl"),
        ("gsm8k:/no/such.jsonl", "no such file /no/such.jsonl"),
        ("reasoning_gym:nope", "unknown reasoning-gym task 'nope'; valid: "),
        ("syllogism_choice:x", "takes no argument"),
    ],
)
def test_a_bad_task_spec_is_one_line_naming_it(spec, message):
    with pytest.raises(UserError, match=message.replace("?", r"\?")):
        parse_tasks([spec])
    with pytest.raises(UserError, match="more than once"):
        parse_tasks(["syllogism_choice", "syllogism_choice"])


def test_prepare_writes_local_data_and_the_harness_yaml(gsm8k_file, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    specs = parse_tasks(
        [f"gsm8k:{gsm8k_file}", "reasoning_gym:basic_arithmetic", "syllogism_choice"]
    )
    prepared = prepare(specs, 2, 0, work, 16)
    assert [p.spec.key for p in prepared] == [
        "gsm8k",
        "reasoning_gym:basic_arithmetic",
        "syllogism_choice",
    ]
    for p in prepared:
        assert p.items == 2 and len(p.data.read_text().splitlines()) == 2
        yaml = (work / f"{p.spec.name}.yaml").read_text()
        assert (
            not re.search(r"\{\{@[A-Z]", yaml) and str(p.data) in yaml
        )  # every field filled; a local file
    rows = [json.loads(line) for line in prepared[2].data.read_text().splitlines()]
    assert all(r["label"] in (0, 1) and "(Answer Yes or No)" in r["question"] for r in rows)


def test_generation_and_loglikelihood_tasks_run_on_the_model_in_memory(tiny_tokenizer, gsm8k_file):
    model = make_model(len(tiny_tokenizer))
    model.config.use_cache = False
    model.train()
    results = run_tasks(model, tiny_tokenizer, [f"gsm8k:{gsm8k_file}", "syllogism_choice"], FAST)
    gsm, syl = results["gsm8k"], results["syllogism_choice"]
    assert gsm["metric"] == "exact_match,flexible-extract" and gsm["items"] == 3
    assert {"exact_match,strict-match", "exact_match,flexible-extract"} <= set(gsm["metrics"])
    assert syl["metric"] == "acc,none" and syl["items"] == 3
    for r in (gsm, syl):
        assert r["score"] * 3 in (0, 1, 2, 3) and r["stderr"] is not None
    assert model.training and model.config.use_cache is False  # given back as it was


@pytest.mark.skipif(not SHARED_TEST.is_file(), reason="../shared/data/gsm8k is not present")
def test_the_gsm8k_test_split_reads_from_its_local_file(tiny_tokenizer):
    model = make_model(len(tiny_tokenizer))
    results = run_tasks(model, tiny_tokenizer, [f"gsm8k:{SHARED_TEST}"], FAST)
    assert results["gsm8k"]["items"] == 3 and results["gsm8k"]["task"].endswith("test.jsonl")


def test_eval_tasks_is_a_list_in_toml_and_a_comma_list_with_set(tmp_path):
    cfg = load(None, ["eval.tasks=syllogism_choice, reasoning_gym:basic_arithmetic"])
    assert cfg.eval.tasks == ("syllogism_choice", "reasoning_gym:basic_arithmetic")
    path = tmp_path / "c.toml"
    path.write_text(cfg.to_toml())
    assert load(path) == cfg and load().eval.tasks == ()
    with pytest.raises(UserError, match="unknown kind 'nope'"):
        load(None, ["eval.tasks=nope"])
    # the base model was scored with them: a resume may change neither
    assert not _free("eval.tasks") and not _free("eval.tasks_size")


def test_a_run_scores_its_tasks_before_and_after_training_and_compare_shows_them(
    tiny_model_dir, tmp_path
):
    out = tmp_path / "run"
    ev = {"tasks": ["syllogism_choice"], "tasks_size": 4, "accuracy_size": 0, "max_new_tokens": 4}
    cfg = tiny_config(tiny_model_dir, str(out), federation={"rounds": 2}, eval=ev)
    summary = run(cfg)
    for when in ("initial_lm_eval", "final_lm_eval"):
        r = summary[when]["syllogism_choice"]
        assert r["items"] == 4 and 0 <= r["score"] <= 1
    saved = json.loads((out / "summary.json").read_text())
    assert saved["final_lm_eval"] == summary["final_lm_eval"]
    assert json.loads((out / "lm_eval.json").read_text())["initial"] == summary["initial_lm_eval"]
    row = table_rows({"parablock": saved})[0]
    score = summary["final_lm_eval"]["syllogism_choice"]["score"]
    assert row["final_lm_eval"] == f"syllogism_choice {score:.3f}"
    assert "final lm-eval (eval.tasks)" in markdown([row])
    before = summary["initial_lm_eval"]["syllogism_choice"]["score"]
    assert f"syllogism_choice  {before:.3f} -> {score:.3f}" in summary_table({"r": saved}, "done:")


def test_parablock_eval_prints_json_and_writes_out(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "results.json"
    args = ["eval", tiny_model_dir, "--tasks", "syllogism_choice", "--limit", "3"]
    assert main([*args, "--json", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    assert printed["results"]["syllogism_choice"]["items"] == 3


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--tasks", "bogus"], "unknown kind 'bogus'"),
        (["--tasks", ","], "--tasks is empty"),
        (["--tasks", "syllogism_choice", "--limit", "0"], "--limit=0 must be >= 1"),
    ],
)
def test_parablock_eval_bad_input_is_one_line_exit_2(tiny_model_dir, capsys, extra, message):
    assert main(["eval", tiny_model_dir, *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("parablock: error: ") and message in err
