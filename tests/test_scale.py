"""Models of real shapes with random weights (``arch:<preset>[@seed]``) and the client's device.

CI has no GPU: the device plumbing runs with ``cpu`` as the device (a networked client honours
``--device``, the simulator ``run.client_devices``), every bad or absent device is a one-line
error, and an 8B client's memory plan is checked on the ``meta`` device.

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
from parablock.model.devices import memory_plan, to_host, train_device
from parablock.model.load import build_meta_model, load_model, load_tokenizer, model_fingerprint
from parablock.run.runner import run
from test_network import ENV, _cli, _config_file, _federate, _one_line_error, site  # noqa: F401
from test_ray_backend import ray_session  # noqa: F401

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
    # clients: --model arch:tiny-llama (no weights cross); client 0 told its device
    _federate(site, config, TINY, tmp_path, (("--device", "cpu"), ()))
    want = local["final_model_fingerprint"]
    for where in ("srv", "site0", "site1"):
        summary = json.loads((tmp_path / where / "summary.json").read_text())
        assert summary["final_model_fingerprint"] == want, where
    assert json.loads((tmp_path / "site0" / "summary.json").read_text())["device"] == "cpu"


def test_ray_actors_build_the_same_random_weights_and_end_equal_to_the_local_backend(
    ray_session,  # noqa: F811
    tmp_path,
):
    from parablock.backends import BACKENDS
    from parablock.backends.local import run_local
    from parablock.run.runner import prepare

    cfg = tiny_config(TINY, str(tmp_path), model={"blocks": "top:2"}, federation={"rounds": 2})
    local = prepare(cfg)
    run_local(local.placements, local.server, threads=1)
    remote = prepare(cfg)
    BACKENDS.get("ray")(remote.placements, remote.server, threads=1)  # each actor builds its own
    assert model_fingerprint(remote.model) == model_fingerprint(local.model)
    assert remote.server.stats.accepted == local.server.stats.accepted == 2 * 2  # 2 clients


# -- devices ------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["gpu", "cuda:x", "CUDA", "cpu:0", "cuda:-1", ""])
def test_a_device_that_is_not_one_is_a_one_line_error_naming_the_option(text):
    with pytest.raises(ConfigError) as e:
        train_device(text, "--device")
    assert str(e.value) == f"--device={text!r}: not a training device; valid: cpu, cuda, cuda:N"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where there is no GPU")
def test_cuda_where_there_is_none_is_a_one_line_error():
    for text in ("cuda", "cuda:3"):
        with pytest.raises(ConfigError, match=r"no CUDA device is visible.*use cpu$"):
            train_device(text, "run.client_devices")
    assert train_device("cpu", "--device") == torch.device("cpu")


def test_run_client_devices_is_checked_when_the_config_is_built(tiny_model_dir, tmp_path):
    def cfg(**run):
        return tiny_config(tiny_model_dir, str(tmp_path), run=run)

    assert cfg(client_devices="cpu").client_devices() == ["cpu", "cpu"]
    assert cfg(client_devices="cpu, cuda:1").client_devices() == ["cpu", "cuda:1"]
    assert cfg(client_gpus=0.5).client_devices() == ["cuda", "cuda"]
    for run_, words in [
        ({"client_devices": "cpu,cpu,cpu"}, "has 3 values but federation.clients=2"),
        ({"client_devices": "cpu,tpu"}, "run.client_devices='tpu': not a training device"),
        ({"client_devices": "cuda", "backend": "ray"}, "applies to run.backend=local"),
        ({"client_devices": "cuda", "client_gpus": 1.0}, "set one of the two"),
    ]:
        with pytest.raises(ConfigError, match=words):
            cfg(**run_)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where there is no GPU")
def test_a_simulation_asked_for_an_absent_gpu_stops_before_loading_the_model(
    tiny_model_dir, tmp_path, caplog
):
    cfg = tiny_config(tiny_model_dir, str(tmp_path), run={"client_devices": "cpu,cuda:0"})
    with caplog.at_level("INFO"), pytest.raises(ConfigError, match="run.client_devices=cuda:0"):
        run(cfg)
    assert "base model" not in caplog.text  # refused before anything loaded or evaluated


def test_a_simulated_client_placed_on_the_cpu_by_name_trains_as_before(tiny_model_dir, tmp_path):
    plain = run(tiny_config(tiny_model_dir, str(tmp_path / "a")))
    placed = run(tiny_config(tiny_model_dir, str(tmp_path / "b"), run={"client_devices": "cpu"}))
    assert placed["final_model_fingerprint"] == plain["final_model_fingerprint"]


def test_a_networked_client_refuses_a_bad_or_absent_device_in_one_line(site, tmp_path):  # noqa: F811
    c = site / "creds"
    base = ["client", "--server", "localhost:1", "--ca", str(c / "ca.pem"), "--id", "0"]
    base += ["--token-file", str(c / "client-0.token"), "--data", f"gsm8k:{site / 'd0.jsonl'}"]
    base += ["--model", TINY, "--out", str(tmp_path / "s")]
    _one_line_error(_cli(*base, "--device", "gpu0"), 2, "--device='gpu0'", "cpu, cuda, cuda:N")
    if not torch.cuda.is_available():
        _one_line_error(_cli(*base, "--device", "cuda:1"), 2, "--device=cuda:1", "no CUDA")


def test_block_transfers_to_the_host_keep_the_values():
    t = {"a": torch.randn(3, 4), "b": torch.arange(5.0)}
    out = to_host(t)
    assert all(torch.equal(out[n], t[n]) and out[n].device.type == "cpu" for n in t)


def test_an_8b_clients_memory_plan_on_the_meta_device():
    plan = memory_plan("arch:llama-3-8b", "top:4", "bf16")
    model = build_meta_model("arch:llama-3-8b")
    total = sum(p.numel() for p in model.parameters())
    block = sum(p.numel() for p in model.model.layers[0].parameters())
    norms = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 1)
    norms_in_blocks = 4 * sum(p.numel() for p in model.model.layers[0].parameters() if p.dim() == 1)
    assert plan["block_params"] == block
    assert plan["trained"] == 4 * block * 4  # fp32
    frozen = total - 4 * block
    other_norms = norms - norms_in_blocks  # 1-D weights stay fp32
    assert plan["frozen"] == (frozen - other_norms) * 2 + other_norms * 4
    assert plan["optimizer"] == 3 * 4 * block
    assert 18.5 * 2**30 < plan["total"] < 19.5 * 2**30  # fits one 80 GB GPU twice over
    fp32 = memory_plan("arch:llama-3-8b", "top:4", "fp32")
    assert fp32["frozen"] == frozen * 4 and fp32["total"] > plan["total"]
