"""``parablock run`` end to end through the CLI on a tiny model directory made by the test."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from parablock.cli import main


def _args(model_dir, out, *extra):
    sets = [
        f"model.name_or_path={model_dir}",
        "model.blocks=all",
        "data.train_size=24",
        "data.max_length=320",
        "federation.rounds=3",
        "federation.local_steps=1",
        "federation.batch_size=2",
        "federation.lr=0.001",
        "link.up_mbps=100",
        "link.down_mbps=100",
        "link.latency_ms=2",
        "eval.size=4",
        "eval.accuracy_size=2",
        "eval.max_new_tokens=8",
        f"run.out={out}",
        "run.threads=1",
        *extra,
    ]
    return ["run"] + [a for s in sets for a in ("--set", s)]


def test_run_end_to_end_writes_a_complete_run_directory(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(tiny_model_dir, out)) == 0
    assert "held-out loss" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    for key in (
        "algorithm",
        "clients",
        "rounds",
        "wall_time_s",
        "mean_round_s",
        "mean_compute_s",
        "mean_comm_s",
        "ideal_speedup",
        "initial_eval_loss",
        "final_eval_loss",
        "bytes_up",
        "bytes_down",
    ):
        assert key in summary, key
    assert summary["algorithm"] == "parablock" and summary["rounds"] == 3
    assert 1.0 <= summary["ideal_speedup"] <= 2.0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    client_rows = [r for r in rows if r["kind"] == "client_round" and not r["drain"]]
    assert len(client_rows) == 2 * 3
    for r in client_rows:
        for key in (
            "compute_s",
            "upload_s",
            "download_s",
            "wait_s",
            "idle_s",
            "bytes_up",
            "bytes_down",
            "train_loss",
            "examples",
        ):
            assert key in r
    all_client_rows = [r for r in rows if r["kind"] == "client_round"]
    assert summary["bytes_up"] == sum(r["bytes_up"] for r in all_client_rows) > 0
    assert summary["bytes_down"] == sum(r["bytes_down"] for r in all_client_rows) > 0
    assert len([r for r in rows if r["kind"] == "round"]) == 3
    assert [r["round"] for r in rows if r["kind"] == "eval"] == [-1, 2]
    spans = [json.loads(x) for x in (out / "timeline.jsonl").read_text().splitlines()]
    assert {s["phase"] for s in spans} >= {"compute", "upload", "wait", "download"}
    assert (out / "config.toml").is_file()
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    trained = dict(model.named_parameters())
    base = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters())
    assert any(not torch.equal(trained[n], base[n]) for n in base)
    # a finished run directory is never overwritten
    assert main(_args(tiny_model_dir, out)) == 2
    assert "already holds a finished run" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["federation.algorithm=fedsgd"], "federation.algorithm='fedsgd' is not allowed"),
        (["model.name_or_path=/no/such/model"], "no such directory"),
        (["model.blocks=7-9"], "selects no valid block"),
        (["federation.bogus=1"], "unknown config key federation.bogus"),
        (["federation.rounds=-1"], "federation.rounds=-1 is out of range"),
        (["data.source=reasoning_gym:nope"], "unknown reasoning-gym task 'nope'; valid: "),
        (["data.source=csv:x.csv"], "unknown kind 'csv'; valid: reasoning_gym:..."),
        (["data.partition=shards"], "data.partition='shards' is not allowed; valid: by_label"),
        (["data.client_weights=1,2,3"], "data.client_weights has 3 value(s)"),
        (["data.source=/no/such.jsonl"], "data file /no/such.jsonl does not exist"),
        (
            [
                "federation.clients=3",
                "data.partition=by_label",
                "data.source=reasoning_gym:basic_arithmetic",
            ],
            "1 label(s) for 3 clients",
        ),
    ],
)
def test_bad_input_is_one_line_exit_2(tiny_model_dir, tmp_path, capsys, extra, message):
    assert main(_args(tiny_model_dir, tmp_path / "r", *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_malformed_data_file_names_file_and_line_exit_2(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text('{"question": "q", "answer": "#### 1"}\n{"question": "q2", "answer": \n')
    assert main(_args(tiny_model_dir, tmp_path / "r", f"data.source={data}")) == 2
    err = capsys.readouterr().err
    assert f"{data}:2: malformed JSON" in err and "Traceback" not in err and err.count("\n") == 1
