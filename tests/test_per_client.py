"""data.partition=per_client: one source per client, drawn the same way in a simulation and on a
networked client (``client_records``), config checks, and a tiny end-to-end run."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_config
from parablock.config import ConfigError, from_dict, help_text
from parablock.data.examples import DataError, encode_all
from parablock.data.partition import PARTITIONS, partition
from parablock.data.sources import client_records
from parablock.run.runner import prepare, run


def _site(path: Path, site: int, n: int = 12) -> Path:
    """A small GSM8K-format file whose questions name the site, so files never share one."""
    rows = []
    for k in range(n):
        a, b = 3 * k + site, k + 7
        rows.append(
            {
                "question": f"Site {site}: what is {a} plus {b}?",
                "answer": f"{a} plus {b} is {a + b}. #### {a + b}",
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(clients: int = 2, **data) -> dict:
    return {"federation": {"clients": clients}, "data": data}


# -- config ------------------------------------------------------------------------------------


def test_per_client_is_a_registered_partition_listed_in_help():
    assert "per_client" in PARTITIONS.names()
    assert "per_client" in help_text() and "data.client_sources" in help_text()
    with pytest.raises(DataError, match="per_client does not split one pooled list"):
        partition(10, 2, "per_client", seed=0)


def test_client_source_list_splits_on_semicolons_and_strips():
    cfg = from_dict(_cfg(partition="per_client", client_sources=" a.jsonl ; gsm8k:b.jsonl@2 "))
    assert cfg.data.client_source_list() == ["a.jsonl", "gsm8k:b.jsonl@2"]
    assert from_dict({}).data.client_source_list() == []


@pytest.mark.parametrize(
    ("data", "clients", "message"),
    [
        ({"partition": "per_client"}, 2, "data.partition=per_client needs data.client_sources"),
        (
            {"partition": "per_client", "client_sources": "a.jsonl;b.jsonl;c.jsonl"},
            2,
            "data.client_sources has 3 source(s) but federation.clients=2",
        ),
        (
            {"partition": "per_client", "client_sources": "a.jsonl"},
            3,
            "data.client_sources has 1 source(s) but federation.clients=3",
        ),
        (
            {"partition": "iid", "client_sources": "a.jsonl;b.jsonl"},
            2,
            "data.client_sources applies to data.partition=per_client only",
        ),
        (
            {"partition": "per_client", "client_sources": "a.jsonl;;b.jsonl"},
            3,
            "data.client_sources='a.jsonl;;b.jsonl' has an empty item",
        ),
        (
            {
                "partition": "per_client",
                "client_sources": "a.jsonl;b.jsonl",
                "client_weights": "1,2",
            },
            2,
            "data.client_weights applies to data.partition=iid only",
        ),
    ],
)
def test_config_errors_are_one_line_and_name_the_keys(data, clients, message):
    with pytest.raises(ConfigError) as e:
        from_dict(_cfg(clients, **data))
    assert message in str(e.value) and "\n" not in str(e.value)


# -- client_records ----------------------------------------------------------------------------


def test_client_records_is_deterministic_and_honours_train_size(tmp_path):
    f = _site(tmp_path / "site0.jsonl", 0)
    src = f"gsm8k:{f}"
    first = client_records(src, 8, seed=3)
    assert first == client_records(src, 8, seed=3)
    assert len(first) == 8 and len({r.prompt for r in first}) == 8
    assert all(r.label == "site0" and r.answer for r in first)
    assert client_records(src, 8, seed=4) != first  # another seed, another draw
    everything = client_records(src, 100, seed=3)  # a file smaller than train_size: all of it
    assert sorted(r.prompt for r in everything) == sorted(
        json.loads(x)["question"] for x in f.read_text().splitlines()
    )
    gym = client_records("reasoning_gym:basic_arithmetic", 5, seed=1)
    assert len(gym) == 5 and gym == client_records("reasoning_gym:basic_arithmetic", 5, seed=1)


def test_client_records_mix_splits_train_size_by_weight(tmp_path):
    a, b = _site(tmp_path / "a.jsonl", 0), _site(tmp_path / "b.jsonl", 1)
    recs = client_records(f"{a}@1,gsm8k:{b}@3", 8, seed=0)
    assert [r.label for r in recs].count("a") == 2 and [r.label for r in recs].count("b") == 6


def test_client_records_is_the_same_in_another_process(tmp_path):
    f = _site(tmp_path / "site1.jsonl", 1)
    here = [r.prompt for r in client_records(f"gsm8k:{f}", 7, seed=11)]
    code = (
        "import json, sys\n"
        "from parablock.data.sources import client_records\n"
        f"print(json.dumps([r.prompt for r in client_records({f'gsm8k:{f}'!r}, 7, seed=11)]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == here


def test_client_records_bad_file_names_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"question": "q", "answer": "#### 1"}\n{"question": "q2", "answer": \n')
    with pytest.raises(DataError, match=rf"{f}:2: malformed JSON"):
        client_records(f"gsm8k:{f}", 4, seed=0)
    with pytest.raises(DataError, match="does not exist"):
        client_records(f"gsm8k:{tmp_path / 'missing.jsonl'}", 4, seed=0)


# -- the runner --------------------------------------------------------------------------------


def _per_client_config(tiny_model_dir, tmp_path, **data):
    files = [_site(tmp_path / f"site{i}.jsonl", i) for i in range(2)]
    held = _site(tmp_path / "heldout.jsonl", 9)
    cfg = tiny_config(
        tiny_model_dir,
        str(tmp_path / "run"),
        data={
            "partition": "per_client",
            "client_sources": ";".join(f"gsm8k:{f}" for f in files),
            **data,
        },
        eval={"source": f"gsm8k:{held}", "accuracy_size": 2, "max_new_tokens": 4},
    )
    return cfg, files


def test_prepare_gives_each_client_exactly_its_own_file(tiny_model_dir, tmp_path, tiny_tokenizer):
    cfg, files = _per_client_config(tiny_model_dir, tmp_path, train_size=32)
    fed = prepare(cfg)
    for i, f in enumerate(files):
        want = encode_all(
            client_records(f"gsm8k:{f}", 32, cfg.run.seed), tiny_tokenizer, 320, "expected"
        )
        assert fed.placements[i].data == tuple(want)
        assert {e.group for e in fed.placements[i].data} == {f"site{i}"}
    assert [c["examples"] for c in fed.partition_stats] == [12, 12]
    assert [c["labels"] for c in fed.partition_stats] == [{"site0": 12}, {"site1": 12}]
    assert fed.data_stats["train_records"] == 24
    assert fed.data_stats["client_sources"] == [f"gsm8k:{f}" for f in files]
    assert {r.label for r in fed.heldout_records} == {"heldout"}

    small = prepare(cfg.replace(data={"train_size": 5}))  # at most train_size per client
    assert [len(s.data) for s in small.placements] == [5, 5]


def test_training_prompts_that_are_held_out_are_kept_with_a_warning(
    tiny_model_dir, tmp_path, caplog
):
    cfg, files = _per_client_config(tiny_model_dir, tmp_path)
    cfg = cfg.replace(eval={"source": f"gsm8k:{files[0]}"})
    with caplog.at_level(logging.WARNING, logger="parablock.run.build"):
        fed = prepare(cfg)
    assert len(fed.placements[0].data) == 12  # nothing filtered: a networked client could not
    assert any("client 0" in r.message and "also held-out" in r.message for r in caplog.records)
    assert not any("client 1" in r.message for r in caplog.records)


def test_tiny_per_client_run_finishes_and_writes_partition_and_data(tiny_model_dir, tmp_path):
    cfg, files = _per_client_config(tiny_model_dir, tmp_path)
    summary = run(cfg)
    out = tmp_path / "run"
    assert summary["final_eval_loss"] > 0
    part = json.loads((out / "partition.json").read_text())
    assert part["partition"] == "per_client"
    assert [c["labels"] for c in part["clients"]] == [{"site0": 12}, {"site1": 12}]
    assert (out / "partition.png").is_file()
    data = json.loads((out / "data.json").read_text())
    assert data["client_sources"] == [f"gsm8k:{f}" for f in files]
    assert data["train"]["kept"] == 24
