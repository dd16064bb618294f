"""Progress of a running federation: a live table (rich) on a terminal, one line per round otherwise.

Both displays listen to the same two hooks of ``runner.run``: ``phase`` (a client's compute,
upload, wait, download or idle span starts or ends) and ``barrier`` (a client finished a round).
A round counts as done when every client that takes part in it has passed its barrier (every
client, or for an algorithm whose clients take turns the round's one client; the drain is every
client's); its time is measured from the previous round's last barrier, like
``metrics.round_times``.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import IO

from parablock.config import Config
from parablock.core.algorithms import ALGORITHMS

# What a client is doing while a span of each phase is open.
PHASE_WORDS = {
    "compute": "computing",
    "upload": "uploading",
    "wait": "waiting",
    "download": "downloading",
    "idle": "idle",
}


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


@dataclass
class RoundDone:
    """One finished round as the progress display saw it."""

    round: int  # len(plan) for the drain
    block: int
    seconds: float
    compute_s: float  # means over clients
    comm_s: float
    idle_s: float
    train_loss: float
    examples: int  # summed over clients
    clients: int = 0  # how many took part
    epsilon: float | None = None  # privacy.mode=record: the largest site's epsilon so far


@dataclass
class ProgressState:
    """Thread-safe tally of phases and barriers; the displays render it."""

    clients: int
    rounds: int
    in_turn: bool = False  # one client per round (the drain is everyone's)
    start: float = field(default_factory=time.time)
    active: dict[int, dict[str, float]] = field(default_factory=dict)  # client -> phase -> since
    client_round: dict[int, int] = field(default_factory=dict)
    done: list[RoundDone] = field(default_factory=list)
    _pending: dict[int, list] = field(default_factory=dict)
    _last_end: float | None = None
    _running: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def phase(self, client: int, round: int, phase: str, started: bool) -> None:
        with self._lock:
            if not self._running:  # time from the first span, not from loading the models
                self._running = True
                self.start = time.time()
            phases = self.active.setdefault(client, {})
            if started:
                phases[phase] = time.time()
                self.client_round[client] = min(round, self.rounds)
            else:
                phases.pop(phase, None)

    def barrier(self, client, t: int) -> RoundDone | None:
        """Record a client's round end; returns the round once every client has finished it."""
        record = client.log.rounds[-1]
        now = time.time()
        with self._lock:
            got = self._pending.setdefault(t, [])
            got.append(record)
            if len(got) < (1 if self.in_turn and t < self.rounds else self.clients):
                return None
            del self._pending[t]
            begin = self._last_end if self._last_end is not None else self.start
            self._last_end = now
            n = len(got)
            train = [r for r in got if not r.drain]
            done = RoundDone(
                t,
                got[0].block,
                now - begin,
                sum(r.compute_s for r in got) / n,
                sum(r.upload_s + r.download_s for r in got) / n,
                sum(r.idle_s for r in got) / n,
                sum(r.train_loss for r in train) / len(train) if train else float("nan"),
                sum(r.examples for r in got),
                n,
                max(
                    (e for r in got if (e := getattr(r, "epsilon", None)) is not None), default=None
                ),
            )
            self.done.append(done)
            return done

    def rounds_done(self) -> int:
        return sum(1 for d in self.done if d.round < self.rounds)

    def eta_s(self) -> float | None:
        """Remaining rounds times the mean round time so far (plus a drain of one comm phase)."""
        trained = [d for d in self.done if d.round < self.rounds]
        if not trained:
            return None
        mean = sum(d.seconds for d in trained) / len(trained)
        return mean * (self.rounds - len(trained)) + trained[-1].comm_s

    def examples_per_s(self) -> float:
        elapsed = time.time() - self.start
        return sum(d.examples for d in self.done) / elapsed if elapsed > 0 else 0.0

    def client_phase(self, client: int) -> str:
        with self._lock:
            phases = dict(self.active.get(client, {}))
        if not phases:
            return "idle"
        return " + ".join(PHASE_WORDS.get(p, p) for p in sorted(phases, key=phases.get))


class PlainProgress:
    """One line per finished round (and one for the drain), for logs, pipes and ``--quiet``."""

    def __init__(self, cfg: Config, stream: IO[str] | None = None) -> None:
        self.cfg = cfg
        self.stream = stream or sys.stdout
        self.state = _state(cfg)

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def phase(self, client: int, round: int, phase: str, started: bool) -> None:
        self.state.phase(client, round, phase, started)

    def barrier(self, client, t: int) -> None:
        done = self.state.barrier(client, t)
        if done is not None:
            print(self.line(done), file=self.stream, flush=True)

    def line(self, d: RoundDone) -> str:
        s, T = self.state, self.state.rounds
        parts = (
            f"compute {d.compute_s:.2f}s, comm {d.comm_s:.2f}s, idle {d.idle_s:.2f}s"
            f" (means over {d.clients} client{'s' * (d.clients > 1)})"
        )
        if d.round >= T:
            return f"drain: {d.seconds:.2f}s, {parts}; elapsed {_clock(time.time() - s.start)}"
        eta = s.eta_s()
        return (
            f"round {d.round + 1}/{T} block {d.block}: {d.seconds:.2f}s, {parts}, "
            f"train loss {d.train_loss:.4f}, {s.examples_per_s():.1f} examples/s, "
            f"{'' if d.epsilon is None else f'epsilon {d.epsilon:.3g}, '}"
            f"elapsed {_clock(time.time() - s.start)}, ETA {_clock(eta) if eta is not None else '?'}"
        )


class LiveProgress:
    """A live rich table: round t/T, each client's current phase(s), throughput and ETA."""

    def __init__(self, cfg: Config, console=None) -> None:
        from rich.console import Console

        self.cfg = cfg
        self.console = console or Console()
        self.state = _state(cfg)
        self._live = None
        self._saved_handlers: list[logging.Handler] = []

    def __enter__(self) -> LiveProgress:
        from rich.live import Live
        from rich.logging import RichHandler

        # Log lines go through the live console so they print above the table, not through it.
        root = logging.getLogger()
        self._saved_handlers = list(root.handlers)
        for h in self._saved_handlers:
            root.removeHandler(h)
        root.addHandler(RichHandler(console=self.console, show_path=False))
        self._live = Live(
            get_renderable=self.render, console=self.console, refresh_per_second=4, transient=False
        )
        self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)
        root = logging.getLogger()
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in self._saved_handlers:
            root.addHandler(h)

    def phase(self, client: int, round: int, phase: str, started: bool) -> None:
        self.state.phase(client, round, phase, started)

    def barrier(self, client, t: int) -> None:
        self.state.barrier(client, t)

    def render(self):
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        s = self.state
        n = s.rounds_done()
        eta = s.eta_s()
        last = s.done[-1] if s.done else None
        title = (
            f"{self.cfg.federation.algorithm}: round {min(n + 1, s.rounds)}/{s.rounds}"
            f" ({n} done) · elapsed {_clock(time.time() - s.start)}"
            f" · ETA {_clock(eta) if eta is not None else '?'}"
            f" · {s.examples_per_s():.1f} examples/s"
        )
        if last is not None and last.round < s.rounds:
            title += f" · last round {last.seconds:.2f}s, train loss {last.train_loss:.4f}"
            if last.epsilon is not None:
                title += f" · epsilon {last.epsilon:.3g}"
        table = Table()
        table.add_column("client", justify="right")
        table.add_column("round", justify="right")
        table.add_column("phase")
        for c in range(s.clients):
            r = s.client_round.get(c)
            where = "drain" if r == s.rounds else ("-" if r is None else str(r + 1))
            table.add_row(str(c), where, s.client_phase(c))
        return Group(Text(title, style="bold"), table)


def _state(cfg: Config) -> ProgressState:
    f = cfg.federation
    return ProgressState(f.clients, f.rounds, in_turn=ALGORITHMS.get(f.algorithm).in_turn)


def make_progress(cfg: Config, quiet: bool = False, stream: IO[str] | None = None):
    """Live table on a terminal; plain lines when ``stream`` is not a terminal or ``quiet``."""
    stream = stream or sys.stdout
    if quiet or not stream.isatty():
        return PlainProgress(cfg, stream)
    return LiveProgress(cfg)
