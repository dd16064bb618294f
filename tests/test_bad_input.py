"""Bad input is one clear line naming the field or file: config values, config files, model
directories, data files, and block selections an algorithm cannot run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from parablock.config import ConfigError, load
from parablock.core.algorithms import check_plan
from parablock.data.examples import DataError, DataStats
from parablock.data.sources import read_file, train_and_heldout
from parablock.errors import ModelError
from parablock.model.blocks import BlockError, model_blocks, select_blocks
from parablock.model.load import load_model, load_tokenizer


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``parablock ARGS`` in a child process, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "parablock.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


def _one_line_exit_2(proc: subprocess.CompletedProcess, *parts: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("parablock: error: ")
    for part in parts:
        assert part in proc.stderr


def _sets(*items: str) -> list[str]:
    return [a for s in items for a in ("--set", s)]


# -- 1. learning rates and links --------------------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("federation.lr=inf", "federation.lr must be a finite number, got inf"),
        ("link.latency_ms=inf", "link.latency_ms must be a finite number, got inf"),
        (
            "link.latency_ms=1e9",
            "link.latency_ms=1000000000.0 is out of range; it must be <= 60000",
        ),
        ("federation.lr=1.5", "federation.lr=1.5 is out of range; it must be <= 1"),
        ("federation.server_lr=11", "federation.server_lr=11.0 is out of range; it must be <= 10"),
    ],
)
def test_learning_rates_are_bounded_and_latency_finite(override, message):
    with pytest.raises(ConfigError) as e:
        load(None, [override])
    assert message in str(e.value)
    cfg = load(None, ["federation.lr=1", "federation.server_lr=10"])
    assert (cfg.federation.lr, cfg.federation.server_lr) == (1.0, 10.0)


# -- 2. seeds ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [2**63, 2**64 - 1, 2**64, 10**30])
def test_seed_beyond_signed_64_bits_is_refused(seed):
    # 2**63 .. 2**64-1: numpy and torch take it, but config.toml (TOML: signed 64-bit) cannot
    # hold it for --resume; 2**64 and above: torch.manual_seed itself overflows
    with pytest.raises(ConfigError, match=f"run.seed={seed} is out of range; it must be <= "):
        load(None, [f"run.seed={seed}"])


def test_largest_seed_is_accepted_and_round_trips(tmp_path):
    cfg = load(None, [f"run.seed={2**63 - 1}"])
    p = tmp_path / "c.toml"
    p.write_text(cfg.to_toml())
    assert load(p).run.seed == 2**63 - 1


def test_seed_overflow_is_one_line_exit_2_via_the_cli(tmp_path):
    proc = _cli("run", *_sets(f"run.seed={2**64}", f"run.out={tmp_path / 'r'}"), cwd=tmp_path)
    _one_line_exit_2(proc, f"run.seed={2**64} is out of range")


# -- 3. ParaBlock needs two blocks --------------------------------------------------------------


@pytest.mark.parametrize("blocks", ["top:1", "bottom:1", "3", "2-2,2"])
def test_config_refuses_parablock_with_one_selected_block(blocks):
    with pytest.raises(ConfigError) as e:
        load(None, [f"model.blocks={blocks}"])
    msg = str(e.value)
    assert f"model.blocks={blocks!r} selects 1 block(s)" in msg
    assert "federation.algorithm=parablock needs at least 2" in msg


def test_one_block_is_fine_for_fedbcd_and_extra_blocks_count():
    assert load(None, ["model.blocks=top:1", "federation.algorithm=fedbcd"]).model.blocks
    assert load(None, ["model.blocks=top:1", "model.extra_blocks=norm"]).model.blocks
    assert load(None, ["model.blocks=all"]).model.blocks  # depends on the model: checked later


def test_check_plan_names_blocks_and_algorithm():
    with pytest.raises(ConfigError) as e:
        check_plan("parablock", [0])
    assert "model.blocks" in str(e.value) and "federation.algorithm=parablock" in str(e.value)
    with pytest.raises(ConfigError):
        check_plan("parablock", [3, 3])
    check_plan("parablock", [0, 1])
    check_plan("fedbcd", [0])


def test_parablock_runs_a_single_round(tiny_model_dir, tmp_path):
    """One round trains one block: nothing is in flight, so it needs no second block."""
    from parablock.cli import main

    args = _sets(
        f"model.name_or_path={tiny_model_dir}",
        "model.blocks=all",
        "data.train_size=8",
        "data.max_length=320",
        "federation.rounds=1",
        "federation.local_steps=1",
        "federation.batch_size=2",
        "link.up_mbps=inf",
        "link.down_mbps=inf",
        "link.latency_ms=0",
        "eval.size=2",
        "eval.accuracy_size=0",
        f"run.out={tmp_path / 'r'}",
        "run.threads=1",
        "run.checkpoint=false",
    )
    assert main(["run", "--quiet", *args]) == 0


def test_duplicate_extra_blocks_and_huge_ranges_are_refused(tiny_model_dir):
    model = load_model(tiny_model_dir)
    with pytest.raises(BlockError, match="model.extra_blocks lists 'norm' more than once"):
        model_blocks(model, "norm,norm")
    blocks = model_blocks(model)
    started = time.monotonic()
    with pytest.raises(BlockError, match=r"selects no valid block \(bad: 0-1000000000000\)"):
        select_blocks(blocks, "0-1000000000000")  # never materialised
    with pytest.raises(BlockError, match=r"bad: 3-1\)"):
        select_blocks(blocks, "3-1")
    assert time.monotonic() - started < 1.0
    with pytest.raises(ConfigError, match="lists 'head' more than once"):
        load(None, ["model.extra_blocks=head,norm,head"])


# -- 4. damaged model directories -----------------------------------------------------------


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


def test_truncated_safetensors_names_the_file(model_copy):
    weights = model_copy / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    with pytest.raises(ModelError) as e:
        load_model(str(model_copy))
    msg = str(e.value)
    assert f"{weights} is not a complete safetensors file" in msg and "\n" not in msg


def test_truncated_safetensors_is_one_line_exit_2_via_the_cli(model_copy, tmp_path):
    weights = model_copy / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(1000)
    proc = _cli(
        "run",
        "--quiet",
        *_sets(f"model.name_or_path={model_copy}", "model.blocks=all", f"run.out={tmp_path}/r"),
        cwd=tmp_path,
    )
    _one_line_exit_2(proc, f"{weights} is not a complete safetensors file")


def test_missing_or_damaged_tokenizer_files_name_the_file(model_copy):
    config = model_copy / "tokenizer_config.json"
    saved = config.read_bytes()
    config.unlink()
    with pytest.raises(ModelError, match="neither a pad nor an eos token .*tokenizer_config.json"):
        load_tokenizer(str(model_copy))
    config.write_bytes(saved)
    tokenizer = model_copy / "tokenizer.json"
    text = tokenizer.read_text()
    tokenizer.write_text(text[: len(text) // 2])
    with pytest.raises(ModelError, match=f"{tokenizer} is not valid JSON"):
        load_tokenizer(str(model_copy))
    tokenizer.unlink()
    with pytest.raises(ModelError) as e:
        load_tokenizer(str(model_copy))
    assert f"{model_copy} has no tokenizer file (tokenizer.json" in str(e.value)
    assert "\n" not in str(e.value)


# -- 5. config files ---------------------------------------------------------------------------


def test_config_file_not_utf8_names_file_and_byte_offset(tmp_path):
    p = tmp_path / "latin1.toml"
    p.write_bytes("[federation]\n# caf\xe9\nrounds = 3\n".encode("latin-1"))
    with pytest.raises(ConfigError) as e:
        load(p)
    assert f"config file {p}:2: not UTF-8 text: byte 0xe9 at byte offset 18" in str(e.value)


def test_config_file_not_utf8_is_one_line_exit_2_via_the_cli(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_bytes(b"\xff\xfe[\x00r\x00u\x00n\x00]\x00")  # UTF-16, as some editors save
    proc = _cli("run", "--config", str(p), cwd=tmp_path)
    _one_line_exit_2(proc, f"config file {p}:1: not UTF-8 text", "byte offset 0")


def test_section_that_is_not_a_table_is_a_config_error(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("federation = 3\n")
    for overrides in ([], ["federation.rounds=2"], ["run.seed=1"]):
        with pytest.raises(ConfigError, match=r"federation must be a \[federation\] table"):
            load(p, overrides)


# -- 6. data files -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, name",
    [
        ("", "d.jsonl"),
        ("", "d.json"),
        ("file:", "d.jsonl"),
        ("alpaca:", "d.json"),
        ("gsm8k:", "d.jsonl"),
        ("chat:", "d.jsonl"),
    ],
)
def test_data_file_not_utf8_names_file_and_byte_offset(tmp_path, kind, name):
    f = tmp_path / name
    good = '{"question": "q1", "answer": "#### 1"}'
    bad = '{"question": "caf\xe9", "answer": "#### 2"}'
    text = f"{good}\n{bad}\n" if name.endswith(".jsonl") else f"[{good},\n{bad}]"
    f.write_bytes(text.encode("latin-1"))
    offset = text.index("\xe9")
    with pytest.raises(DataError) as e:
        train_and_heldout(f"{kind}{f}", 1, 1, 0)
    assert f"{f}:2: not UTF-8 text: byte 0xe9 at byte offset {offset}" in str(e.value)


def test_data_file_with_a_bom_or_a_line_separator_in_a_string_reads(tmp_path):
    f = tmp_path / "d.jsonl"
    rows = [{"question": "a\u2028b", "answer": "#### 1"}, {"question": "c", "answer": "#### 2"}]
    text = "\n".join(json.dumps(r, ensure_ascii=False) for r in rows)
    f.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert [r.prompt for r in read_file(f)] == ["a\u2028b", "c"]


def test_deeply_nested_json_is_a_data_error(tmp_path):
    f = tmp_path / "deep.json"
    f.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError, match="nested too deeply"):
        read_file(f)


# -- 7. algorithm and correction ------------------------------------------------------------------


def test_fedbcd_refuses_correction_none():
    with pytest.raises(ConfigError) as e:
        load(None, ["federation.algorithm=fedbcd", "federation.correction=none"])
    assert "federation.correction=none" in str(e.value) and "fedbcd" in str(e.value)
    assert load(None, ["federation.correction=none"]).federation.correction == "none"
    assert load(None, ["federation.algorithm=fedbcd"]).federation.correction == "replace"


def test_a_network_server_refuses_the_correction_ablation(tiny_model_dir, tmp_path):
    from parablock.run.runner import prepare

    cfg = load(None, ["federation.correction=none", f"model.name_or_path={tiny_model_dir}"])
    with pytest.raises(ConfigError, match="simulation ablation"):
        prepare(cfg, serve=True)


def test_compare_checks_every_algorithm_before_running_any(tiny_model_dir, tmp_path):
    from parablock.tools.compare import compare

    cfg = load(None, ["federation.correction=none", f"run.out={tmp_path / 'cmp'}"])
    with pytest.raises(ConfigError, match="fedbcd"):
        compare(cfg, ["parablock", "fedbcd"])
    assert not (tmp_path / "cmp" / "parablock").exists()  # nothing ran


# -- 9. held-out never repeats training ----------------------------------------------------------


def test_repeated_records_never_end_up_on_both_sides(tmp_path):
    f = tmp_path / "rep.jsonl"
    rows = [{"question": f"q{i % 5}", "answer": f"#### {i % 5}"} for i in range(40)]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    stats = DataStats()
    train, heldout = train_and_heldout(str(f), 30, 4, 0, stats=stats)
    assert not {r.key for r in train} & {r.key for r in heldout}
    assert stats.heldout_duplicates == 30 - len(train) > 0
    assert stats.to_json()["heldout_duplicates"] == stats.heldout_duplicates


def test_only_duplicates_of_heldout_is_a_data_error_that_says_so(tmp_path):
    f = tmp_path / "same.jsonl"
    f.write_text("\n".join([json.dumps({"question": "q", "answer": "#### 1"})] * 6))
    with pytest.raises(DataError, match=r"no training records \(5 dropped as duplicates"):
        train_and_heldout(str(f), 5, 1, 0)


def test_distinct_records_drop_nothing(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(
        "\n".join(json.dumps({"question": f"q{i}", "answer": f"#### {i}"}) for i in range(20))
    )
    stats = DataStats()
    train, heldout = train_and_heldout(str(f), 16, 4, 0, stats=stats)
    assert (len(train), len(heldout), stats.heldout_duplicates) == (16, 4, 0)


# -- 10. standard evaluation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, part",
    [
        (["--tasks", "mmlu"], "unknown kind 'mmlu'; valid: gsm8k:PATH.jsonl"),
        (["--tasks", "gsm8k:missing.jsonl"], "no such file missing.jsonl"),
        (["--tasks", "syllogism_choice", "--batch-size", "0"], "--batch-size=0 must be >= 1"),
    ],
)
def test_parablock_eval_bad_input_is_one_line_exit_2_via_the_cli(
    tiny_model_dir, tmp_path, args, part
):
    _one_line_exit_2(_cli("eval", tiny_model_dir, *args, cwd=tmp_path), part)


def test_a_bad_eval_task_in_a_run_config_is_one_line_exit_2(tmp_path):
    proc = _cli("run", *_sets("eval.tasks=syllogism_choice,bogus:x"), cwd=tmp_path)
    _one_line_exit_2(proc, "evaluation task 'bogus:x': unknown kind 'bogus'")
