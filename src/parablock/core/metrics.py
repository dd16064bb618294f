"""What a client measures: phase spans on a timeline and one record per round; run summaries.

Phases: compute, upload, wait (for the aggregate), download, idle (the computation thread waiting
at the barrier). Span timestamps are wall-clock (``time.time()``) so timelines from several clients
or processes line up; durations come from the same clock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

PHASES = ("compute", "upload", "wait", "download", "idle")

# Called as listener(client, round, phase, started) when a span starts (True) and ends (False);
# progress displays use it. It runs on the client's threads, so it must be quick.
PhaseListener = Callable[[int, int, str, bool], None]


@dataclass(frozen=True)
class Span:
    client: int
    round: int  # the round whose time this span belongs to; the drain is round T
    phase: str
    start: float
    end: float

    @property
    def seconds(self) -> float:
        return self.end - self.start


@dataclass
class RoundRecord:
    client: int
    round: int
    block: int
    compute_s: float = 0.0
    upload_s: float = 0.0
    wait_s: float = 0.0
    download_s: float = 0.0
    idle_s: float = 0.0
    round_s: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0
    train_loss: float = float("nan")
    examples: int = 0
    start: float = 0.0
    end: float = 0.0
    drain: bool = False
    steps: int = 0  # optimizer steps taken (more than local_steps with local_steps_max)
    epsilon: float | None = None  # privacy.mode=record: the site's epsilon after this round

    def to_json(self) -> dict:
        return {"kind": "client_round", **asdict(self)}


@dataclass
class ClientLog:
    client: int
    spans: list[Span] = field(default_factory=list)
    rounds: list[RoundRecord] = field(default_factory=list)
    listener: PhaseListener | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @contextmanager
    def span(self, round: int, phase: str, record: RoundRecord | None = None):
        if self.listener is not None:
            self.listener(self.client, round, phase, True)
        start = time.time()
        try:
            yield
        finally:
            end = time.time()
            if self.listener is not None:
                self.listener(self.client, round, phase, False)
            with self._lock:
                self.spans.append(Span(self.client, round, phase, start, end))
                if record is not None:
                    setattr(record, f"{phase}_s", getattr(record, f"{phase}_s") + end - start)

    def add_span(self, round: int, phase: str, start: float, end: float) -> None:
        with self._lock:
            self.spans.append(Span(self.client, round, phase, start, end))


def describe(r: RoundRecord, rounds: int) -> str:
    """One log line for a client's round."""
    what = "drain" if r.drain else f"round {r.round + 1}/{rounds} block {r.block}"
    loss = "" if r.drain else f", {r.steps} steps, train loss {r.train_loss:.4f}"
    eps = "" if r.epsilon is None else f", epsilon {r.epsilon:.3g}"
    return (
        f"{what}: compute {r.compute_s:.2f}s, upload {r.upload_s:.2f}s, wait {r.wait_s:.2f}s, "
        f"download {r.download_s:.2f}s, idle {r.idle_s:.2f}s{loss}{eps}"
    )


def overlap_seconds(a: list[Span], b: list[Span]) -> float:
    """Total time during which some span of ``a`` and some span of ``b`` both run."""
    total = 0.0
    for x in a:
        for y in b:
            total += max(0.0, min(x.end, y.end) - max(x.start, y.start))
    return total


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def round_times(records: list[RoundRecord]) -> dict[int, float]:
    """Round t's wall time: from the last client's end of round t-1 to the last client's end of t."""
    ends: dict[int, float] = {}
    starts: dict[int, float] = {}
    for r in records:
        if r.drain:
            continue
        ends[r.round] = max(ends.get(r.round, 0.0), r.end)
        starts[r.round] = min(starts.get(r.round, float("inf")), r.start)
    out = {}
    for t in sorted(ends):
        # after a resume, round t starts later than round t-1 ended: the downtime is not counted
        begin = max(ends[t - 1], starts[t]) if t - 1 in ends else starts[t]
        out[t] = ends[t] - begin
    return out


def summarize(
    records: list[RoundRecord],
    *,
    algorithm: str,
    clients: int,
    rounds: int,
    wall_time_s: float,
    aggregate_s: float = 0.0,
) -> dict:
    """Per-run means and the ideal speed-up (compute + comm) / max(compute, comm)."""
    train = [r for r in records if not r.drain]
    compute = _mean([r.compute_s for r in train])
    comm_rounds = [r for r in records if r.upload_s > 0 or r.download_s > 0]
    comm = _mean([r.upload_s + r.download_s for r in comm_rounds]) + aggregate_s
    rt = round_times(records)
    return {
        "algorithm": algorithm,
        "clients": clients,
        "rounds": rounds,
        "wall_time_s": wall_time_s,
        "mean_round_s": _mean(list(rt.values())),
        "mean_compute_s": compute,
        "mean_comm_s": comm,
        "mean_wait_s": _mean([r.wait_s for r in comm_rounds]),
        "mean_idle_s": _mean([r.idle_s for r in train]),
        "ideal_speedup": (compute + comm) / max(compute, comm) if max(compute, comm) > 0 else 1.0,
        "bytes_up": sum(r.bytes_up for r in records),
        "bytes_down": sum(r.bytes_down for r in records),
        "mean_train_loss": _mean([r.train_loss for r in train]),
        "mean_steps": _mean([r.steps for r in train]),
    }
