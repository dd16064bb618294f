"""A real Flower deployment on 127.0.0.1: one SuperLink, two SuperNodes, a ``parablock
flower-worker`` beside each, the app ``parablock flower new`` writes, submitted with ``flwr run``.
It ends with the local backend's global model, bit for bit, for ParaBlock and FedBCD. Every
process the test starts (and the SuperExec / ServerApp / ClientApp processes Flower starts under
them) is stopped by PID at the end."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from conftest import tiny_config  # noqa: E402
from parablock.runner import run  # noqa: E402
from test_flower_relay import _wait_for, _worker_args  # noqa: E402
from test_network import ENV, site  # noqa: E402, F401  (site: per-client data files)

BIN = Path(sys.executable).parent
FLOWER_ENV = {
    **ENV,
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # never pip-install the app per run
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
}


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Flower's SuperExec starts in a session of its own)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _stop_all(procs: list[subprocess.Popen]) -> None:
    pids = [q for p in procs for q in [p.pid, *_descendants(p.pid)]]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        if all(not Path(f"/proc/{pid}").exists() for pid in pids):
            return


def _spawn(args: list[str], log: Path, env=None) -> subprocess.Popen:
    return subprocess.Popen(
        args,
        env=env or FLOWER_ENV,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


@pytest.mark.skipif(shutil.which("flower-superlink", path=str(BIN)) is None, reason="no flwr")
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
    app = tmp_path / "app"
    new = [sys.executable, "-m", "parablock.cli", "flower", "new", str(app), "--config"]
    new += [str(config), "--set", f"run.out={tmp_path / 'srv'}"]
    subprocess.run(new, env=ENV, check=True, capture_output=True, timeout=120)

    link, sn0, sn1 = _free_ports(3)
    home = tmp_path / "flwr_home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "local"\n\n[superlink.local]\n'
        f'address = "127.0.0.1:{link}"\ninsecure = true\n'
    )
    env = {**FLOWER_ENV, "FLWR_HOME": str(home)}
    outs = [tmp_path / f"site{i}" for i in range(2)]
    procs: list[subprocess.Popen] = []
    try:
        for i in range(2):
            procs.append(
                _spawn(_worker_args(i, site, tiny_model_dir, outs[i]), tmp_path / f"w{i}.log")
            )
        superlink = ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(link)]
        procs.append(_spawn(superlink, tmp_path / "superlink.log", env))
        for i, port in enumerate((sn0, sn1)):
            _wait_for(outs[i] / "worker.sock", procs)
            node = [
                "flower-supernode",
                "--insecure",
                "--superlink",
                f"127.0.0.1:{link}",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--node-config",
                f'parablock-worker="unix:{outs[i] / "worker.sock"}"',
            ]
            procs.append(_spawn(node, tmp_path / f"supernode{i}.log", env))
        flwr = ["flwr", "run", str(app), "local", "--stream"]
        done = subprocess.run(flwr, env=env, capture_output=True, text=True, timeout=300)
        logs = "\n".join(
            f"--- {p.name}:\n{p.read_text()[-3000:]}" for p in sorted(tmp_path.glob("*.log"))
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + logs
        summary_file = tmp_path / "srv" / "summary.json"
        assert summary_file.exists(), done.stdout[-5000:] + logs
        for i in range(2):  # the workers finish once their final report is handed over
            deadline = time.monotonic() + 60
            while procs[i].poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            assert procs[i].returncode == 0, logs
    finally:
        _stop_all(procs)
    summary = json.loads(summary_file.read_text())
    want = local["final_model_fingerprint"]
    assert summary["final_model_fingerprint"] == want
    assert summary["backend"] == "flower" and summary["updates_rejected"] == 0
    for o in outs:
        assert json.loads((o / "summary.json").read_text())["final_model_fingerprint"] == want
    # the run directory is the one `parablock run` writes
    for name in ("config.toml", "metrics.jsonl", "timeline.jsonl", "model"):
        assert (tmp_path / "srv" / name).exists(), name
