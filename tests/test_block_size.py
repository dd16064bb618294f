"""model.block_size: blocks of several consecutive decoder layers, from the block list to a run."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_model, tiny_config
from parablock.config import ConfigError, from_dict
from parablock.model.blocks import model_blocks, select_blocks
from parablock.model.forward import first_trained_layer
from parablock.model.load import load_model
from parablock.run.runner import run
from parablock.run.settings import run_settings
from parablock.wire.protocol import RunSettings


def _layer_names(model, j: int) -> set[str]:
    return {n for n, _ in model.named_parameters() if n.startswith(f"model.layers.{j}.")}


@pytest.mark.parametrize(
    "size, want",
    [(1, [[0], [1], [2], [3]]), (2, [[0, 1], [2, 3]]), (3, [[0, 1, 2], [3]]), (9, [[0, 1, 2, 3]])],
)
def test_blocks_group_consecutive_layers(size, want):
    model = make_model(64)  # 4 layers
    blocks = model_blocks(model, "norm", block_size=size)
    assert [b.index for b in blocks] == list(range(len(want) + 1))
    for b, layers in zip(blocks, want, strict=False):
        assert set(b.param_names) == set().union(*(_layer_names(model, j) for j in layers))
        assert b.name == (
            f"layer.{layers[0]}" if len(layers) == 1 else f"layer.{layers[0]}-{layers[-1]}"
        )
    assert blocks[-1].name == "norm" and blocks[-1].param_names == ("model.norm.weight",)
    # every parameter of the layers is in exactly one block
    names = [n for b in blocks for n in b.param_names]
    assert len(names) == len(set(names))


def test_model_blocks_counts_blocks_of_layers():
    model = make_model(64)
    blocks = model_blocks(model, block_size=2)
    assert select_blocks(blocks, "top:1") == [1]
    assert select_blocks(blocks, "all") == [0, 1]
    assert first_trained_layer(model, blocks, {1}) == 2


def test_block_size_is_checked_and_handed_to_clients(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="model.block_size"):
        from_dict({"model": {"block_size": 0}})
    cfg = tiny_config(tiny_model_dir, str(tmp_path / "r"), model={"block_size": 2})
    s = run_settings(cfg, [0, 1])
    assert s.block_size == 2
    assert RunSettings.from_bytes(s.to_bytes()) == s
    with pytest.raises(ValueError):
        RunSettings(**{**s.__dict__, "block_size": 0})


@pytest.mark.parametrize("compression", ["none", "int4"])
def test_a_run_trains_every_layer_of_its_blocks(tiny_model_dir, tmp_path, compression):
    # int4: the tuned point for quality per second (configs/smollm2-wide-blocks.toml) sends
    # blocks of several layers as 4-bit deltas
    out = tmp_path / "run"
    cfg = tiny_config(
        tiny_model_dir,
        str(out),
        model={"blocks": "all", "block_size": 2},
        federation={"rounds": 2, "schedule": "cyclic"},
        link={"compression": compression},
        eval={"accuracy_size": 0},
    )
    summary = run(cfg)
    assert summary["blocks"] == [0, 1]  # layers 0-1 and 2-3
    base, final = load_model(tiny_model_dir), load_model(str(out / "model"))
    before, after = dict(base.named_parameters()), dict(final.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    # two rounds, one block each: all four layers trained (one layer per block would train two)
    assert changed == set().union(*(_layer_names(base, j) for j in range(4)))
    saved = json.loads((out / "summary.json").read_text())
    assert saved["blocks"] == [0, 1] and saved["plan"] == [0, 1]
