"""``run.tensorboard``: the rows of ``metrics.jsonl`` as TensorBoard scalars, written as
``RunFiles`` writes them (so a served run's clients, known from their reports, are included).

The step of every scalar is the number of rounds done: round t's rows are at step t + 1, the base
model's evaluation at step 0, the drain at step T + 1. Tags (docs/observability.md):

- ``eval/loss``, ``eval/accuracy``: the held-out evaluations (written when the run evaluates:
  the base model at the start, the others after training, replayed from the aggregates);
- ``<key>/client_<c>`` for key in ``CLIENT_KEYS``: each client's round;
- ``round/seconds``, ``round/aggregate_s``, ``round/updates_accepted``, ``round/updates_rejected``,
  ``round/clients_dropped``, ``round/bytes_up``, ``round/bytes_down``, and ``privacy/epsilon``
  (privacy.mode=client): each round, once it is committed.

A failure to write is logged once and turns the event files off; training goes on.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from parablock.config import Config
from parablock.errors import ConfigError

log = logging.getLogger(__name__)

CLIENT_KEYS = (
    "train_loss",
    "compute_s",
    "upload_s",
    "wait_s",
    "download_s",
    "idle_s",
    "bytes_up",
    "bytes_down",
    "epsilon",  # privacy.mode=record: the site's own
)


def log_dir(cfg: Config, out: Path) -> Path | None:
    """Where the run's event files go: None unless ``run.tensorboard``."""
    if not cfg.run.tensorboard:
        return None
    return Path(cfg.run.tensorboard_dir) if cfg.run.tensorboard_dir else out / "tb"


def check_available(cfg: Config) -> None:
    """A one-line error, before anything loads, when TensorBoard's writer cannot be imported."""
    if not cfg.run.tensorboard:
        return
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise ConfigError(
            "run.tensorboard=true needs the tensorboard package: pip install "
            "'parablock[observe]' (scripts/install.sh installs it)"
        ) from None


class TensorBoardLog:
    """Turns metrics rows into scalars; ``row`` per row, ``flush`` after each batch of rows."""

    def __init__(self, directory: Path, started_at: float, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        try:
            directory.mkdir(parents=True, exist_ok=True)
            # written in order (a resume purges the steps it runs again); flushed by ``flush``
            self.writer = SummaryWriter(
                str(directory), purge_step=purge_step, max_queue=1000, flush_secs=3600
            )
        except OSError as e:
            raise ConfigError(f"run.tensorboard_dir={str(directory)!r}: {e}") from None
        self.directory = directory
        self.start = started_at
        self._ends: dict[int, float] = {}  # round -> its latest client end (the row's time)
        self._bytes: dict[int, list[int]] = {}  # round -> [up, down] over its clients
        self._off = False

    def row(self, row: dict) -> None:
        if self._off:
            return
        try:
            kind = row.get("kind")
            if kind == "client_round":
                self._client(row)
            elif kind == "round":
                self._round(row)
            elif kind == "eval":
                self._eval(row)
        except Exception as e:  # never the run's end: the event files are a view of it
            self._fail(e)

    def flush(self) -> None:
        if not self._off:
            try:
                self.writer.flush()
            except Exception as e:
                self._fail(e)

    def close(self) -> None:
        if not self._off:
            self._off = True
            try:
                self.writer.close()
            except Exception as e:
                log.error("TensorBoard event files in %s: %s", self.directory, e)

    def _fail(self, e: Exception) -> None:
        log.error("TensorBoard event files in %s: %s; not written any more", self.directory, e)
        self._off = True

    def _scalar(self, tag: str, value, step: int, wall: float | None) -> None:
        if value is None or isinstance(value, bool):
            return
        value = float(value)
        if math.isfinite(value):
            self.writer.add_scalar(tag, value, step, walltime=wall or time.time())

    def _client(self, row: dict) -> None:
        c, t = row["client"], row["round"]
        end = row.get("end") or None
        if end:
            self._ends[t] = max(self._ends.get(t, 0.0), end)
        if not row.get("drain"):
            sums = self._bytes.setdefault(t, [0, 0])
            sums[0] += int(row.get("bytes_up") or 0)
            sums[1] += int(row.get("bytes_down") or 0)
        for key in CLIENT_KEYS:
            self._scalar(f"{key}/client_{c}", row.get(key), t + 1, end)

    def _round(self, row: dict) -> None:
        t = row["round"]
        step, wall = t + 1, self._ends.get(t)
        self._scalar("round/seconds", row.get("round_s"), step, wall)
        self._scalar("round/aggregate_s", row.get("aggregate_s"), step, wall)
        self._scalar("round/updates_accepted", len(row.get("participants") or ()), step, wall)
        self._scalar("round/updates_rejected", row.get("updates_rejected"), step, wall)
        if "clients_dropped" in row:
            self._scalar("round/clients_dropped", len(row["clients_dropped"]), step, wall)
        if t in self._bytes:
            up, down = self._bytes.pop(t)
            self._scalar("round/bytes_up", up, step, wall)
            self._scalar("round/bytes_down", down, step, wall)
        self._scalar("privacy/epsilon", row.get("epsilon"), step, wall)

    def _eval(self, row: dict) -> None:
        time_s = row.get("time_s")
        ok = isinstance(time_s, int | float) and math.isfinite(time_s)
        wall = self.start + time_s if ok else None
        step = row["round"] + 1
        self._scalar("eval/loss", row.get("eval_loss"), step, wall)
        self._scalar("eval/accuracy", row.get("eval_accuracy"), step, wall)
