"""A Flower deployment on this machine, for trials, tests and benchmarks: one SuperLink, one
SuperNode per site with a ``parablock flower-worker`` beside it, and ``flwr run`` to submit an
app (``parablock flower new``). Everything listens on 127.0.0.1, in plain text (a trusted
loopback; a real deployment uses Flower's TLS and node authentication).

Flower's SuperLink starts a ``flower-superexec`` in a session of its own, and that starts the
ServerApp; each SuperNode starts one for its ClientApps. ``stop`` therefore collects every
descendant of what it started (from /proc) and stops them all by PID: SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from parablock.errors import ConfigError

CONNECTION = "local"


@dataclass(frozen=True)
class Site:
    client: int
    data: str  # the site's data source (data.source syntax)
    out: Path  # the worker's directory (socket, checkpoints, metrics, summary)
    worker_args: tuple[str, ...] = ()  # e.g. ("--emulate-up-mbps", "20")

    @property
    def socket(self) -> Path:
        return self.out / "worker.sock"


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def descendants(pid: int) -> list[int]:
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


@dataclass
class LocalDeployment:
    root: Path  # logs and FLWR_HOME go here
    model: str
    sites: list[Site]
    threads: int = 1  # torch threads per worker
    # Flower's Simulation Engine instead of SuperNodes: the SuperLink runs the ClientApps in Ray
    # actors, and each simulated node's first ClientApp starts its worker (``client_app.py``)
    simulation: bool = False
    procs: list[subprocess.Popen] = field(default_factory=list)
    port: int = 0
    # Ray's sockets live here: a short path (AF_UNIX paths are limited to 107 bytes)
    ray_tmp: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="pbray-"))

    def env(self) -> dict[str, str]:
        bin_dir = str(Path(sys.executable).parent)
        return {
            **os.environ,
            "FLWR_HOME": str(self.root / "flwr_home"),  # never ~/.flwr
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # no pip install per run
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
            "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
            # the simulation's own Ray, never a cluster already running here
            "RAY_ADDRESS": "local",
            "RAY_TMPDIR": self.ray_tmp,
        }

    def _spawn(self, args: list[str], name: str) -> subprocess.Popen:
        with open(self.root / f"{name}.log", "w") as log:
            p = subprocess.Popen(
                args,
                env=self.env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.procs.append(p)
        return p

    def start(self, timeout: float = 120.0) -> LocalDeployment:
        self.root.mkdir(parents=True, exist_ok=True)
        home = self.root / "flwr_home"
        home.mkdir(exist_ok=True)
        self.port, *node_ports = free_ports(1 + len(self.sites))
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )
        for s in [] if self.simulation else self.sites:
            args = [sys.executable, "-m", "parablock.cli", "flower-worker", "--id", str(s.client)]
            args += ["--data", s.data, "--model", self.model, "--out", str(s.out)]
            args += ["--threads", str(self.threads), "--log-level", "warning", *s.worker_args]
            self._spawn(args, f"worker{s.client}")
        link = ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(self.port)]
        self._spawn(link + (["--simulation"] if self.simulation else []), "superlink")
        deadline = time.monotonic() + timeout
        self._wait(lambda: self._healthy(), deadline, "the SuperLink did not start")
        for s, port in [] if self.simulation else zip(self.sites, node_ports, strict=True):
            self._wait(s.socket.exists, deadline, f"worker {s.client} did not start")
            node = ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.port}"]
            node += ["--host", "127.0.0.1", "--port", str(port), "--node-config"]
            node += [f'parablock-worker="unix:{s.socket.resolve()}"']
            self._spawn(node, f"supernode{s.client}")
        return self

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1):
                return True
        except OSError:
            return False

    def _wait(self, ready, deadline: float, what: str) -> None:
        while not ready():
            dead = [p for p in self.procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"{what}\n{self.logs()}")
            time.sleep(0.1)

    def submit(self, app: Path, run_config: str = "", timeout: float = 3600.0):
        """``flwr run APP local --stream``: returns the finished process (its output)."""
        args = ["flwr", "run", str(app), CONNECTION, "--stream"]
        if self.simulation:
            args += ["--federation-config", f"num-supernodes={len(self.sites)}"]
            run_config = f'{run_config} parablock-sites="{self.root / "sites"}"'.strip()
        if run_config:
            args += ["--run-config", run_config]
        return subprocess.run(args, env=self.env(), capture_output=True, text=True, timeout=timeout)

    def wait_workers(self, timeout: float = 120.0) -> list[int | None]:
        """Until the workers have exited (their exit codes; None for one still running)."""
        deadline = time.monotonic() + timeout
        if self.simulation:  # not our children: their summaries say they finished
            done = [self.root / "sites" / f"site-{s.client}" / "summary.json" for s in self.sites]
            while not all(d.exists() for d in done) and time.monotonic() < deadline:
                time.sleep(0.2)
            while any(_alive(p) for p in self.simulated_workers()) and time.monotonic() < deadline:
                time.sleep(0.2)
            return [0 if d.exists() else None for d in done]
        workers = self.procs[: len(self.sites)]
        while any(p.poll() is None for p in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        return [p.poll() for p in workers]

    def simulated_workers(self) -> list[int]:
        """The PIDs of the workers simulated nodes started (``client_app.simulated_worker``)."""
        pids = []
        for f in (self.root / "sites").glob("site-*/worker.pid"):
            try:
                pids.append(int(f.read_text().split()[0]))
            except (OSError, ValueError, IndexError):
                continue
        return pids

    def logs(self, chars: int = 3000) -> str:
        files = sorted(self.root.glob("*.log")) + sorted(self.root.glob("sites/*/worker.log"))
        return "\n".join(f"--- {p}:\n{p.read_text(errors='replace')[-chars:]}" for p in files)

    def stop(self) -> None:
        """Stop everything started here and everything Flower started below it, by PID."""
        roots = [p.pid for p in self.procs] + self.simulated_workers()
        pids = [q for pid in roots for q in [pid, *descendants(pid)]]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 10
            for p in self.procs:
                try:
                    p.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
                time.sleep(0.1)
            if not any(_alive(pid) for pid in pids):
                break
        shutil.rmtree(self.ray_tmp, ignore_errors=True)

    def __enter__(self) -> LocalDeployment:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def require_flower() -> None:
    try:
        import flwr  # noqa: F401
    except ModuleNotFoundError:
        raise ConfigError("Flower is not installed: pip install 'parablock[flower]'") from None
