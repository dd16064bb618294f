"""The typed config: defaults, --set parsing, TOML files, and errors that name field and values."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from parablock.config import SECTIONS, Config, ConfigError, help_text, load

REQUIRED = [
    "federation.algorithm",
    "federation.clients",
    "federation.rounds",
    "federation.local_steps",
    "federation.batch_size",
    "federation.lr",
    "federation.schedule",
    "federation.correction",
    "model.name_or_path",
    "model.blocks",
    "data.max_length",
    "link.up_mbps",
    "link.down_mbps",
    "link.latency_ms",
    "run.seed",
    "run.out",
    "run.backend",
]


def test_defaults_are_valid_and_every_required_key_exists():
    cfg = Config()
    for key in REQUIRED:
        section, name = key.split(".")
        assert hasattr(getattr(cfg, section), name), key


def test_help_lists_every_key_with_default_and_meaning():
    text = help_text()
    for section, cls in SECTIONS.items():
        for f in cls.__dataclass_fields__.values():
            default = f.default[0] if f.metadata["per_client"] else f.default  # one for all
            assert f"{section}.{f.name} = {default!r}" in text
    assert "{cyclic, fedavg_full, fedbcd, fedit_lora, parablock}" in text


def test_set_overrides_are_typed():
    cfg = load(
        None,
        [
            "federation.rounds=3",
            "federation.lr=0.01",
            "link.up_mbps=inf",
            "federation.algorithm=fedbcd",
        ],
    )
    assert cfg.federation.rounds == 3 and cfg.federation.lr == 0.01
    assert cfg.link.up_mbps == (math.inf,)  # one value: every client's
    assert cfg.federation.algorithm == "fedbcd"


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "federation.nope=1",
            "unknown config key federation.nope; valid keys in [federation]: algorithm",
        ),
        ("nope.key=1", "unknown config section 'nope'; valid: model, data"),
        ("federation.clients=abc", "federation.clients expects int, got 'abc'"),
        ("federation.clients=0", "federation.clients=0 is out of range; it must be >= 1"),
        (
            "federation.algorithm=fedavg",
            "federation.algorithm='fedavg' is not allowed; valid: cyclic, fedavg_full, fedbcd, fedit_lora, parablock",
        ),
        ("federation.schedule=zigzag", "valid: cyclic, cyclic_desc, random, reshuffle"),
        ("federation.correction=half", "valid: none, replace"),
        ("link.up_mbps=0", "link.up_mbps=0.0 is out of range; it must be > 0"),
        ("link.latency_ms=nan", "link.latency_ms must be a number, got nan"),
        ("run.backend=spark", "run.backend='spark' is not allowed; valid: local"),
        ("federation.rounds", "--set expects section.key=value"),
    ],
)
def test_bad_values_name_the_field_and_allowed_values(override, message):
    with pytest.raises(ConfigError) as e:
        load(None, [override])
    assert message in str(e.value)


def test_toml_file_round_trips(tmp_path: Path):
    cfg = load(None, ["federation.rounds=5", "model.blocks=top:2"])
    p = tmp_path / "c.toml"
    p.write_text(cfg.to_toml())
    assert load(p) == cfg
    p.write_text("[federation]\nrounds = 'five'\n")
    with pytest.raises(ConfigError, match="federation.rounds expects int"):
        load(p)
    p.write_text("[federation\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "missing.toml")


def test_min_clients_cannot_exceed_clients():
    with pytest.raises(ConfigError, match="min_clients=3 exceeds federation.clients=2"):
        load(None, ["federation.min_clients=3"])


def test_floats_must_be_finite_except_link_speeds():
    with pytest.raises(ConfigError, match="federation.server_lr must be a finite number"):
        load(None, ["federation.server_lr=inf"])
    with pytest.raises(ConfigError, match="federation.lr must be a finite number"):
        load(None, ["federation.lr=1e400"])
    assert load(None, ["link.down_mbps=inf"]).link.down_mbps == (math.inf,)
