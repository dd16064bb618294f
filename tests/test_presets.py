"""Every preset in configs/ loads: run presets through config.load, estimate presets (those with
an [estimate] section) through the estimate loader and the timing model."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from parablock import config
from parablock.tools import estimate

PRESETS = sorted((Path(__file__).parent.parent / "configs").glob("*.toml"))


def test_there_are_presets():
    assert len(PRESETS) >= 3


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_preset_loads(path):
    if "estimate" in tomllib.loads(path.read_text()):
        cfg, est = estimate.load(path)
        result = estimate.estimate(cfg, est)
        assert result["fedbcd_round_s"] > result["parablock_round_s"] > 0
    else:
        cfg = config.load(path)
        assert cfg.federation.rounds >= 1
        assert (
            cfg.model.name_or_path == "smollm2-135m-instruct"
            or Path(cfg.model.name_or_path).is_dir()
        )
