"""A real Flower deployment on 127.0.0.1 (``flower/local.py``): one SuperLink, two SuperNodes, a
``parablock flower-worker`` beside each, the app ``parablock flower new`` writes, submitted with
``flwr run``. It ends with the local backend's global model, bit for bit, for ParaBlock and
FedBCD. Every process the test starts, and the SuperExec / ServerApp / ClientApp processes Flower
starts below them, is stopped by PID at the end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("flwr")

from conftest import tiny_config  # noqa: E402
from parablock.flower.local import LocalDeployment, Site, descendants  # noqa: E402
from parablock.run.runner import run  # noqa: E402
from test_network import ENV, site  # noqa: E402, F401  (site: per-client data files)


@pytest.mark.parametrize("algorithm", ["parablock", "fedbcd"])
def test_a_flower_deployment_ends_equal_to_the_local_backend(
    site,  # noqa: F811
    tiny_model_dir,
    tmp_path,
    algorithm,
):
    fed = {"algorithm": algorithm, "rounds": 4}
    ev = {"source": f"gsm8k:{site / 'd2.jsonl'}", "accuracy_size": 0}
    sources = ";".join(f"gsm8k:{site / f'd{i}.jsonl'}" for i in range(2))
    local = run(
        tiny_config(
            tiny_model_dir,
            str(tmp_path / "local"),
            federation=fed,
            data={"partition": "per_client", "client_sources": sources},
            eval=ev,
        )
    )
    config = tmp_path / "fed.toml"
    config.write_text(tiny_config(tiny_model_dir, "", federation=fed, eval=ev).to_toml())
    app, srv = tmp_path / "app", tmp_path / "srv"
    new = [sys.executable, "-m", "parablock.cli", "flower", "new", str(app), "--config"]
    subprocess.run([*new, str(config)], env=ENV, check=True, capture_output=True, timeout=120)

    sites = [Site(i, f"gsm8k:{site / f'd{i}.jsonl'}", tmp_path / f"site{i}") for i in range(2)]
    deployment = LocalDeployment(tmp_path / "flower", tiny_model_dir, sites)
    with deployment:
        done = deployment.submit(app, f'parablock-set="run.out={srv}"', timeout=300)
        logs = done.stdout[-4000:] + done.stderr[-2000:] + deployment.logs()
        assert done.returncode == 0 and (srv / "summary.json").exists(), logs
        assert deployment.wait_workers(60) == [0, 0], logs  # they end after the final report
        started = [q for p in deployment.procs for q in [p.pid, *descendants(p.pid)]]
    assert started and not any(_running(pid) for pid in started)
    summary = json.loads((srv / "summary.json").read_text())
    want = local["final_model_fingerprint"]
    assert summary["final_model_fingerprint"] == want
    assert summary["backend"] == "flower" and summary["updates_rejected"] == 0
    for s in sites:
        assert json.loads((s.out / "summary.json").read_text())["final_model_fingerprint"] == want
    for name in ("config.toml", "metrics.jsonl", "timeline.jsonl", "model"):  # as `parablock run`
        assert (srv / name).exists(), name


def _running(pid: int) -> bool:
    from parablock.flower.local import _alive

    return _alive(pid)


def test_flowers_simulation_engine_ends_equal_to_the_local_backend(
    site,  # noqa: F811
    tiny_model_dir,
    tmp_path,
):
    """The same app in Flower's Simulation Engine (Ray actors run the ClientApps; each simulated
    node's first ClientApp starts its worker, with the run config's parablock-sources)."""
    fed = {"algorithm": "parablock", "rounds": 4}
    ev = {"source": f"gsm8k:{site / 'd2.jsonl'}", "accuracy_size": 0}
    sources = ";".join(f"gsm8k:{site / f'd{i}.jsonl'}" for i in range(2))
    data = {"partition": "per_client", "client_sources": sources}
    local = run(
        tiny_config(tiny_model_dir, str(tmp_path / "local"), federation=fed, data=data, eval=ev)
    )
    config = tmp_path / "fed.toml"
    config.write_text(tiny_config(tiny_model_dir, "", federation=fed, data=data, eval=ev).to_toml())
    app, srv = tmp_path / "app", tmp_path / "srv"
    new = [sys.executable, "-m", "parablock.cli", "flower", "new", str(app), "--config"]
    subprocess.run([*new, str(config)], env=ENV, check=True, capture_output=True, timeout=120)
    sites = [Site(i, "", tmp_path / "flower" / "sites" / f"site-{i}") for i in range(2)]
    deployment = LocalDeployment(tmp_path / "flower", tiny_model_dir, sites, simulation=True)
    with deployment:
        done = deployment.submit(app, f'parablock-set="run.out={srv}"', timeout=400)
        logs = done.stdout[-4000:] + done.stderr[-2000:] + deployment.logs()
        assert done.returncode == 0 and (srv / "summary.json").exists(), logs
        assert deployment.wait_workers(60) == [0, 0], logs
        started = [q for p in deployment.procs for q in [p.pid, *descendants(p.pid)]]
        started += deployment.simulated_workers()
    assert not any(_running(pid) for pid in started)
    summary = json.loads((srv / "summary.json").read_text())
    assert summary["final_model_fingerprint"] == local["final_model_fingerprint"]
    for s in sites:
        fp = json.loads((s.out / "summary.json").read_text())["final_model_fingerprint"]
        assert fp == local["final_model_fingerprint"]
