"""Models of real shapes with random weights (``arch:<preset>[@seed]``) and the client's device.

The weights are the same in every process (clients, server, a networked client) because each
parameter is drawn from a generator seeded by (seed, name): checked across processes by
fingerprint, and end to end by a tiny run locally and over the network."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import tiny_config
from parablock.errors import ConfigError
from parablock.model.architectures import ARCHITECTURES, parse_arch
from parablock.model.load import build_meta_model, load_model, load_tokenizer, model_fingerprint
from parablock.run.runner import run
from test_network import ENV, _config_file, _federate, site  # noqa: F401

TINY = "arch:tiny-llama"
_PRINT_FINGERPRINT = (
    "import sys, torch; torch.manual_seed(int(sys.argv[2]));"
    "from parablock.model.load import load_model, model_fingerprint;"
    "print(model_fingerprint(load_model(sys.argv[1])))"
)


def _fingerprint_in_a_process(name: str, global_seed: int) -> str:
    p = subprocess.run(
        [sys.executable, "-c", _PRINT_FINGERPRINT, name, str(global_seed)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    return p.stdout.split()[-1]


def test_two_processes_build_identical_weights_whatever_their_global_seed():
    here = model_fingerprint(load_model(TINY + "@5"))
    assert _fingerprint_in_a_process(TINY + "@5", 1) == here
    assert _fingerprint_in_a_process(TINY + "@5", 2) == here
    assert model_fingerprint(load_model(TINY)) == model_fingerprint(load_model(TINY + "@0"))
    assert model_fingerprint(load_model(TINY + "@6")) != here


def test_random_weights_are_drawn_per_parameter_and_the_warning_says_what_they_mean(caplog):
    import parablock.model.architectures as arch

    arch._WARNED.discard(TINY + "@9")
    with caplog.at_level("WARNING"):
        model = load_model(TINY + "@9")
    assert [r.getMessage() for r in caplog.records if "random weights" in r.getMessage()] == [
        f"{TINY}@9: random weights (seed 9): its loss means nothing, its step times and memory do"
    ]
    params = dict(model.named_parameters())
    q0, q1 = (
        params["model.layers.0.self_attn.q_proj.weight"],
        params["model.layers.1.self_attn.q_proj.weight"],
    )
    assert not torch.equal(q0, q1)  # each parameter its own stream
    assert q0.std().item() == pytest.approx(0.02, rel=0.05) and q0.mean().abs() < 1e-3
    assert torch.equal(params["model.norm.weight"], torch.ones(64))
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied as in the real model
    assert model.training and model.config.use_cache is False
    assert len(load_tokenizer(TINY)) <= model.config.vocab_size


@pytest.mark.parametrize(
    "name,words",
    [
        ("arch:llama-9b", ["unknown architecture", "arch:llama-3.2-1b", "arch:tiny-llama"]),
        ("arch:tiny-llama@x", ["seed after '@'", "arch:tiny-llama@1"]),
        ("arch:tiny-llama@", ["seed after '@'"]),
    ],
)
def test_a_bad_preset_or_seed_is_a_one_line_config_error(name, words):
    with pytest.raises(ConfigError) as e:
        load_model(name)
    assert "\n" not in str(e.value) and "model.name_or_path" in str(e.value)
    assert all(w in str(e.value) for w in words)


def test_the_presets_include_the_issues_models_and_8b_has_its_shape_on_meta():
    assert {"tiny-llama", "llama-3.2-1b", "llama-3.2-3b", "llama-3-8b"} <= set(ARCHITECTURES)
    assert parse_arch("arch:llama-3-8b@7") == ("llama-3-8b", 7)
    model = build_meta_model("arch:llama-3-8b")
    total = sum(p.numel() for p in model.parameters())
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    assert total == pytest.approx(8.03e9, rel=0.01)
    assert layer == pytest.approx(218e6, rel=0.01)  # the issue's 218 M parameters per block
    assert all(p.device.type == "meta" for p in model.parameters())


def test_a_tiny_run_with_random_weights_works_locally_and_over_the_network(site, tmp_path):  # noqa: F811
    sections = dict(
        model={"name_or_path": TINY, "blocks": "top:2"},
        federation={"rounds": 3, "round_timeout_s": 60.0},
    )
    sources = ";".join(f"gsm8k:{site / f'd{i}.jsonl'}" for i in range(2))
    local = run(
        tiny_config(
            TINY,
            str(tmp_path / "local"),
            **sections,
            data={"partition": "per_client", "client_sources": sources},
            eval={"source": f"gsm8k:{site / 'd2.jsonl'}", "accuracy_size": 0},
        )
    )
    assert local["final_eval_loss"] > 0 and local["updates_rejected"] == 0
    config = _config_file(tmp_path, TINY, "fed", **sections)
    _federate(site, config, TINY, tmp_path)  # clients: --model arch:tiny-llama, no weights sent
    want = local["final_model_fingerprint"]
    for where in ("srv", "site0", "site1"):
        summary = json.loads((tmp_path / where / "summary.json").read_text())
        assert summary["final_model_fingerprint"] == want, where
