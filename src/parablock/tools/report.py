"""Plots of finished runs, made only from the files in their run directories.

``report(path)`` takes a run directory (``summary.json`` at its top) or a directory holding several
(a ``parablock compare`` directory) and writes into ``<path>/plots/``:

- ``eval_loss.png``: held-out loss against rounds completed and against wall-clock time, one line per
  run (plus held-out accuracy when the runs recorded it), and the target loss of ``time_to_target``;
- ``round_time_split.png``: each round's time split into compute / communication not hidden by
  compute / idle, stacked, with the total link time (hidden or not) marked;
- ``timeline.png``: per client, the computation thread (compute, idle) and the network side (upload,
  wait, download) as a Gantt chart, one panel per run on a shared time axis, so overlap is visible;
- ``costs.png``: per run, bytes per round (up and down, all clients), peak memory per client, and
  the wall time to the target held-out loss.

**Time to target**: the wall time at which a run's held-out loss first reaches the target (by
default the worst of the runs' final losses, so every run reaches it), read from its evaluations;
between two evaluations it is not known more finely, so ``eval.every`` sets the resolution.

Eval records are ``{"kind": "eval", "round": r, "eval_loss": ..., ["time_s": ...,
"eval_accuracy": ...]}``: ``round`` -1 is before training, ``T`` after the drain, and ``0 < r < T``
the model after ``r`` rounds. Without ``time_s`` the time is derived from the timeline (round r-1's
last span end); points whose time cannot be derived are left off the time panel, with a note.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from parablock.errors import ReportError  # noqa: F401

PLOTS = ("eval_loss.png", "round_time_split.png", "timeline.png", "costs.png")
PHASE_COLORS = {
    "compute": "#2e7d32",
    "upload": "#1565c0",
    "wait": "#f9a825",
    "download": "#6a1b9a",
    "idle": "#bdbdbd",
}
RUN_COLORS = ("#1565c0", "#c62828", "#2e7d32", "#6a1b9a", "#ef6c00", "#00838f")
RUN_MARKERS = ("o", "s", "^", "D", "v", "P")  # with the colours, tell up to 36 runs apart


def _style(i: int) -> dict:
    return {
        "color": RUN_COLORS[i % len(RUN_COLORS)],
        "marker": RUN_MARKERS[i // len(RUN_COLORS) % 6],
    }


@dataclass
class RunData:
    path: Path
    summary: dict
    config: dict
    client_rounds: list[dict] = field(default_factory=list)
    rounds: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    spans: list[dict] = field(default_factory=list)

    @property
    def label(self) -> str:
        return str(self.summary.get("algorithm") or self.path.name)

    @property
    def num_rounds(self) -> int:
        return int(self.summary.get("rounds") or len(self.rounds))


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise ReportError(f"{path} is missing (not a finished run directory?)")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ReportError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise ReportError(f"{path}:{i}: expected a JSON object")
        rows.append(row)
    return rows


def _row_key(row: dict) -> tuple:
    """What a row is about: a client's round (or drain), a round, an evaluation, or a span."""
    if "phase" in row:
        return ("span", row.get("client"), row.get("round"), row.get("phase"))
    return (row.get("kind"), row.get("client"), row.get("round"), row.get("drain"))


def latest_rows(rows: list[dict]) -> list[dict]:
    """The last row of each key, in file order. A run appends its files as it goes; after a
    hard kill and a resume, a round that was written but not checkpointed is run and written
    again, and the later row is the one the run's model and summary come from."""
    latest: dict[tuple, dict] = {}
    for row in rows:
        key = _row_key(row)
        latest.pop(key, None)
        latest[key] = row
    return list(latest.values())


def load_run(path: str | Path) -> RunData:
    """Read one run directory's config.toml, summary.json, metrics.jsonl and timeline.jsonl
    (the last row of anything written twice, see ``latest_rows``)."""
    p = Path(path)
    for name in ("summary.json", "config.toml", "metrics.jsonl", "timeline.jsonl"):
        if not (p / name).is_file():
            raise ReportError(f"{p / name} is missing (not a finished run directory?)")
    try:
        summary = json.loads((p / "summary.json").read_text())
    except json.JSONDecodeError as e:
        raise ReportError(f"{p / 'summary.json'}:{e.lineno}: not valid JSON ({e.msg})") from None
    try:
        config = tomllib.loads((p / "config.toml").read_text())
    except tomllib.TOMLDecodeError as e:
        raise ReportError(f"{p / 'config.toml'}: not valid TOML ({e})") from None
    run = RunData(p, summary, config)
    for row in latest_rows(_jsonl(p / "metrics.jsonl")):
        kind = row.get("kind")
        if kind == "client_round":
            run.client_rounds.append(row)
        elif kind == "round":
            run.rounds.append(row)
        elif kind == "eval":
            run.evals.append(row)
    run.spans = latest_rows(_jsonl(p / "timeline.jsonl"))
    return run


def find_runs(path: str | Path) -> list[RunData]:
    """The run at ``path``, or every run directory directly inside it (a compare directory)."""
    p = Path(path)
    if not p.is_dir():
        raise ReportError(f"{p} is not a directory")
    if (p / "summary.json").is_file():
        return [load_run(p)]
    subs = sorted(d for d in p.iterdir() if (d / "summary.json").is_file())
    if not subs:
        raise ReportError(f"{p} holds no run (no summary.json in it or in its subdirectories)")
    return [load_run(d) for d in subs]


# -- data for the plots ----------------------------------------------------------------------


def round_end_s(run: RunData) -> dict[int, float]:
    """Seconds from the start to each round's last span end (its last barrier)."""
    ends: dict[int, float] = {}
    for s in run.spans:
        ends[s["round"]] = max(ends.get(s["round"], 0.0), float(s["end"]))
    return ends


@dataclass
class EvalSeries:
    rounds: list[float]
    losses: list[float]
    accuracies: list[float | None]
    times: list[float | None]  # None where the time is unknown
    note: str = ""


def eval_series(run: RunData) -> EvalSeries:
    """Held-out loss (and accuracy) by rounds completed, with wall-clock time where known."""
    T = run.num_rounds
    ends = round_end_s(run)
    out = EvalSeries([], [], [], [])
    missing = 0
    for e in sorted(run.evals, key=lambda e: e["round"]):
        r = int(e["round"])  # evaluated after round r's aggregate; -1 = the base model
        done = 0 if r < 0 else min(r + 1, T)
        t = e.get("time_s")
        if t is None:
            if r < 0:
                t = 0.0
            elif r >= T - 1 and "wall_time_s" in run.summary:
                t = float(run.summary["wall_time_s"])
            else:
                t = ends.get(r)
        if t is None:
            missing += 1
        out.rounds.append(done)
        out.losses.append(float(e["eval_loss"]))
        acc = e.get("eval_accuracy")
        out.accuracies.append(None if acc is None else float(acc))
        out.times.append(None if t is None else float(t))
    if missing:
        out.note = f"{run.label}: {missing} eval point(s) without a known time left off"
    return out


def final_loss(run: RunData) -> float | None:
    """The held-out loss of the run's final model (its last evaluation), or None."""
    s = eval_series(run)
    return s.losses[-1] if s.losses and math.isfinite(s.losses[-1]) else None


def default_target(runs: list[RunData]) -> float | None:
    """The worst of the runs' final held-out losses: a level every run reaches."""
    finals = [x for x in (final_loss(r) for r in runs) if x is not None]
    return max(finals) if finals else None


@dataclass(frozen=True)
class Reached:
    time_s: float  # wall time since the start at the first evaluation at or below the target
    rounds: int  # rounds completed then
    evals: int  # evaluations the run has (their spacing bounds the precision)


def time_to_target(run: RunData, target: float) -> Reached | None:
    """When the run's held-out loss first reached ``target`` (None: never, or at no known time)."""
    s = eval_series(run)
    for rounds, loss, t in zip(s.rounds, s.losses, s.times, strict=True):
        if t is not None and loss <= target:
            return Reached(t, int(rounds), len(s.losses))
    return None


def per_round_bytes(run: RunData) -> tuple[float, float]:
    """Bytes up and down per round, summed over clients (the drain's share included)."""
    rounds = max(1, run.num_rounds)
    s = run.summary
    return float(s.get("bytes_up") or 0) / rounds, float(s.get("bytes_down") or 0) / rounds


@dataclass
class RoundSplit:
    rounds: list[int]
    compute: list[float]
    comm: list[float]  # communication the computation thread waited for
    idle: list[float]  # the rest of the round: barrier waits, the aggregate, slower clients
    link: list[float]  # upload + download time, hidden or not


def round_split(run: RunData) -> RoundSplit:
    """Means over clients per trained round (the drain is left out); the stack sums to round_s."""
    by_round: dict[int, list[dict]] = {}
    for r in run.client_rounds:
        if not r.get("drain"):
            by_round.setdefault(int(r["round"]), []).append(r)
    out = RoundSplit([], [], [], [], [])
    for t in sorted(by_round):
        rows = by_round[t]
        n = len(rows)
        compute = sum(r["compute_s"] for r in rows) / n
        link = sum(r["upload_s"] + r["download_s"] for r in rows) / n
        # The computation thread waits for the network for idle_s (ParaBlock: at the barrier;
        # FedBCD: the whole communication phase). Of that, at most the link time is communication.
        comm = sum(min(r["idle_s"], r["upload_s"] + r["download_s"]) for r in rows) / n
        total = sum(r["round_s"] for r in rows) / n
        out.rounds.append(t)
        out.compute.append(compute)
        out.comm.append(comm)
        out.idle.append(max(0.0, total - compute - comm))
        out.link.append(link)
    return out


# -- plots -----------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_eval(
    runs: list[RunData], out: Path, target: float | None = None
) -> tuple[Path, list[str]]:
    plt = _pyplot()
    series = [eval_series(r) for r in runs]
    with_acc = any(a is not None for s in series for a in s.accuracies)
    rows = 2 if with_acc else 1
    fig, axes = plt.subplots(rows, 2, figsize=(12, 4.5 * rows), squeeze=False)
    notes = [s.note for s in series if s.note]
    for i, (run, s) in enumerate(zip(runs, series, strict=True)):
        style = {**_style(i), "linestyle": "-", "label": run.label}
        axes[0][0].plot(s.rounds, s.losses, **style)
        timed = [(t, v) for t, v in zip(s.times, s.losses, strict=True) if t is not None]
        if timed:
            axes[0][1].plot(*zip(*timed, strict=True), **style)
        if with_acc:
            acc = [(x, a) for x, a in zip(s.rounds, s.accuracies, strict=True) if a is not None]
            acc_t = [
                (t, a) for t, a in zip(s.times, s.accuracies, strict=True) if None not in (t, a)
            ]
            if acc:
                axes[1][0].plot(*zip(*acc, strict=True), **style)
            if acc_t:
                axes[1][1].plot(*zip(*acc_t, strict=True), **style)
    if target is not None:
        for ax in axes[0]:
            ax.axhline(target, color="#555555", linestyle=":", label=f"target {target:.4f}")
    axes[0][0].set(
        title="Held-out loss by round",
        xlabel="rounds completed",
        ylabel="held-out loss (nats/token)",
    )
    axes[0][1].set(
        title="Held-out loss by wall-clock time",
        xlabel="wall-clock time since start (s)",
        ylabel="held-out loss (nats/token)",
    )
    if with_acc:
        axes[1][0].set(
            title="Held-out accuracy by round", xlabel="rounds completed", ylabel="accuracy"
        )
        axes[1][1].set(
            title="Held-out accuracy by wall-clock time",
            xlabel="wall-clock time since start (s)",
            ylabel="accuracy",
        )
    for ax in fig.axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    if notes:
        fig.text(0.01, 0.005, "; ".join(notes), fontsize=8, color="#555555")
    fig.tight_layout(rect=(0, 0.03 if notes else 0, 1, 1))
    path = out / "eval_loss.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path, notes


def plot_round_split(runs: list[RunData], out: Path) -> Path:
    plt = _pyplot()
    cols = min(3, len(runs))  # N methods wrap onto rows of three
    rows = math.ceil(len(runs) / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(max(6, 5.5 * cols), 4.5 * rows), sharey=True, squeeze=False
    )
    for ax in axes.flat[len(runs) :]:
        ax.set_visible(False)
    for ax, run in zip(axes.flat, runs, strict=False):
        s = round_split(run)
        x = [t + 1 for t in s.rounds]
        ax.bar(x, s.compute, color=PHASE_COLORS["compute"], label="compute")
        ax.bar(
            x,
            s.comm,
            bottom=s.compute,
            color=PHASE_COLORS["upload"],
            label="communication (exposed)",
        )
        top = [a + b for a, b in zip(s.compute, s.comm, strict=True)]
        ax.bar(x, s.idle, bottom=top, color=PHASE_COLORS["idle"], label="idle / waiting")
        ax.plot(x, s.link, "k_", markersize=14, mew=2, label="upload + download (hidden or not)")
        mean = run.summary.get("mean_round_s")
        title = f"{run.label}: time per round"
        if isinstance(mean, int | float):
            title += f" (mean {mean:.2f} s)"
        ax.set(title=title, xlabel="round", ylabel="seconds (mean over clients)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "round_time_split.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_timeline(runs: list[RunData], out: Path) -> Path:
    plt = _pyplot()
    from matplotlib.patches import Patch

    clients = max((int(r.summary.get("clients") or 1) for r in runs), default=1)
    fig, axes = plt.subplots(
        len(runs),
        1,
        figsize=(12, 1.2 + 0.9 * clients * len(runs) + 0.6),
        sharex=True,
        squeeze=False,
    )
    for ax, run in zip(axes[:, 0], runs, strict=True):
        n = int(run.summary.get("clients") or 1)
        lanes = {}
        for c in range(n):
            lanes[(c, "compute")] = 2 * (n - 1 - c) + 1  # computation thread above network side
            lanes[(c, "network")] = 2 * (n - 1 - c)
        for phase, color in PHASE_COLORS.items():
            lane = "compute" if phase in ("compute", "idle") else "network"
            for c in range(n):
                bars = [
                    (float(s["start"]), float(s["end"]) - float(s["start"]))
                    for s in run.spans
                    if s["phase"] == phase and int(s["client"]) == c
                ]
                if bars:
                    ax.broken_barh(
                        bars,
                        (lanes[(c, lane)] + 0.1, 0.8),
                        facecolor=color,
                        edgecolor="white",
                        linewidth=0.6,
                    )
        ax.set_yticks(
            [v + 0.5 for v in lanes.values()],
            [f"client {c} {'compute' if k == 'compute' else 'network'}" for c, k in lanes],
        )
        wall = run.summary.get("wall_time_s")
        title = f"{run.label}: per-client timeline"
        if isinstance(wall, int | float):
            title += f" (wall {wall:.1f} s)"
        ax.set_title(title)
        ax.set_ylim(0, 2 * n)
        ax.grid(axis="x", alpha=0.3)
    axes[-1][0].set_xlabel("wall-clock time since start (s)")
    handles = [Patch(color=c, label=p) for p, c in PHASE_COLORS.items()]
    fig.legend(handles=handles, loc="upper right", ncol=len(handles), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    path = out / "timeline.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_costs(runs: list[RunData], out: Path, target: float | None) -> Path:
    """Bars per run: bytes per round (up, down), peak memory per client, time to target."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(max(12, 1.6 * len(runs) * 3), 4.5))
    x = list(range(len(runs)))
    labels = [r.label for r in runs]
    colors = [_style(i)["color"] for i in x]
    up, down = zip(*(per_round_bytes(r) for r in runs), strict=True)
    axes[0].bar(x, [b / 1e6 for b in up], color=colors, label="up")
    axes[0].bar(
        x, [b / 1e6 for b in down], bottom=[b / 1e6 for b in up], color=colors, alpha=0.45,
        label="down",
    )  # fmt: skip
    axes[0].set(title="Bytes per round (all clients)", ylabel="MB per round")
    axes[0].legend(fontsize=8)
    memory = [_peak_per_client(r) for r in runs]
    axes[1].bar(x, [m or 0.0 for m in memory], color=colors)
    axes[1].set(title="Peak memory per client", ylabel="MB (peak RSS / clients, local backend)")
    reached = [time_to_target(r, target) if target is not None else None for r in runs]
    axes[2].bar(x, [r.time_s if r else 0.0 for r in reached], color=colors)
    for i, r in enumerate(reached):
        if r is None:
            axes[2].text(i, 0, "not reached", ha="center", va="bottom", fontsize=8, rotation=90)
    what = f"loss {target:.4f}" if target is not None else "no target"
    axes[2].set(title=f"Wall time to held-out {what}", ylabel="seconds")
    for ax in axes:
        ax.set_xticks(x, labels, rotation=20)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = out / "costs.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _peak_per_client(run: RunData) -> float | None:
    s = run.summary
    v = s.get("peak_rss_mb_per_client")
    if v is None and s.get("peak_rss_mb") is not None and s.get("clients"):
        v = float(s["peak_rss_mb"]) / int(s["clients"])
    return None if v is None else float(v)


def report(path: str | Path, target: float | None = None) -> tuple[list[Path], list[str]]:
    """Write every plot for the run(s) at ``path`` into ``path/plots``; returns files and notes.
    ``target``: the held-out loss for time to target (default: the worst final loss)."""
    runs = find_runs(path)
    out = Path(path) / "plots"
    out.mkdir(exist_ok=True)
    if target is None:
        target = default_target(runs)
    eval_png, notes = plot_eval(runs, out, target)
    files = [
        eval_png,
        plot_round_split(runs, out),
        plot_timeline(runs, out),
        plot_costs(runs, out, target),
    ]
    for r in runs:
        if not any(math.isfinite(float(e.get("eval_loss", math.nan))) for e in r.evals):
            notes.append(f"{r.label}: no held-out loss recorded")
    return files, notes
