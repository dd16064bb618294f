"""A run's ``metrics.jsonl`` and ``timeline.jsonl``, appended and flushed round by round, so a
hard kill keeps every finished round, a running federation can be watched, and a resume appends."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path

from parablock.core.checkpoint import ResumePoint
from parablock.core.metrics import ClientLog, RoundRecord, Span, round_times
from parablock.core.server import Server
from parablock.errors import RunDirError
from parablock.evaluation.evaluate import EvalResult

log = logging.getLogger(__name__)


class RunFiles:
    """``metrics.jsonl`` and ``timeline.jsonl``, appended and flushed round by round.

    Round t's client rows and spans are written once the round is *committed*: every client
    still in the run has passed barrier t, or t's aggregate exists and every client in it has
    (then every checkpoint a resume can pick holds round t, so a stopped run never leaves rows
    that its resume writes again). Round t's ``round`` row follows once round t+1 is committed
    (only then is t's aggregate in every such checkpoint). The hooks only note what happened
    (the aggregate listener runs under the server's lock); a writer thread does the I/O. Rows a
    finished run has not committed (e.g. a drain without every client) are written at the end.

    After a hard kill a round may have been written but not checkpointed; the resume runs it
    again and writes it twice: readers keep the last row of each round
    (``tools.report.latest_rows``).

    ``observer`` (``run.tensorboard``'s ``TensorBoardLog``) sees every metrics row as it is
    written (``row``), a ``flush`` after each batch and a ``close``. ``counts(t)``: what the
    server knows of round t when its row is written (``updates_rejected``, ``clients_dropped``).
    """

    def __init__(
        self,
        out: Path,
        started_at: float,
        plan: list[int],
        clients: int,
        dropped: Callable[[], list[int]],
        *,
        reports: Callable[[], list[ClientLog]] | None = None,
        point: ResumePoint | None = None,
        serve: bool = False,
        initial: EvalResult | None = None,
        epsilon: Callable[[int], float] | None = None,
        counts: Callable[[int], dict] | None = None,
        observer=None,
    ) -> None:
        self.out, self.start, self.plan, self.clients = out, started_at, plan, clients
        self._dropped = dropped  # the clients the server dropped so far
        self.epsilon = epsilon  # privacy.mode=client: epsilon after round t (the server's)
        self.counts = counts
        self.observer = observer
        self._reports = reports  # served runs: the clients' reports (no barrier hook there)
        self._logs: dict[int, ClientLog] = {}  # registered at barriers (and at the end)
        self._seen: dict[int, ClientLog] = {}  # those and the reports, as of the last pass
        self._read: dict[int, int] = {}  # client -> records of its log taken so far
        self._span_at: dict[int, int] = {}  # client -> spans of its log written so far
        self._taken: set[int] = set()  # clients whose log is the server's copy of their reports
        self._rounds: dict[int, dict[int, RoundRecord]] = {}  # round -> client -> record
        self._written: dict[tuple[int, int], str] = {}  # (client, round) -> the row written
        self._aggregates: dict[int, tuple[float, list[int]]] = {}
        self._news: list[tuple[int, float, list[int]]] = []  # aggregations not taken yet
        self._rows_done: set[int] = set()  # rounds whose ``round`` row is written
        self._restored: set[Span] = set()  # spans a resumed client starts with (written before)
        self._next = 0  # the first round not committed
        self._cond = threading.Condition()
        self._io = threading.Lock()
        self._dirty = self._closing = self._finished = False
        self._error: OSError | None = None
        if point is None:
            self.metrics = open(out / "metrics.jsonl", "w")
            self.timeline = open(out / "timeline.jsonl", "w")
            if initial is not None:
                self._metric(initial.to_json())
        else:
            self._resume(point, serve)
        self._flush()
        self._thread = threading.Thread(target=self._work, name="run-files", daemon=True)
        self._thread.start()

    # -- hooks (cheap: note and wake the writer) --------------------------------------------
    def barrier(self, client) -> None:
        with self._cond:
            self._logs[client.id] = client.log  # a restarted client brings a new log
            self._dirty = True
            self._cond.notify()

    def aggregated(self, round: int, block: int, value, seconds: float, who: list[int], *_) -> None:
        with self._cond:
            self._news.append((round, seconds, list(who)))
            self._dirty = True
            self._cond.notify()

    # -- the end ----------------------------------------------------------------------------
    def finish(self, logs: list[ClientLog], server: Server) -> None:
        """The run finished: write every row left, committed or not."""
        self._stop()
        with self._cond:
            for lg in logs:
                self._logs.setdefault(lg.client, lg)
        self._read = {}  # read every record again: a served client's report may replace one
        self._write(force=True, server=server)
        self._finished = True
        if self._error is not None:
            raise RunDirError(f"cannot write the metrics in {self.out}: {self._error}")

    def add(self, row: dict) -> None:
        """One more metrics row (the evaluations at the end)."""
        with self._io:
            self._metric(row)
            self._flush()

    def close(self) -> None:
        """Stop the writer and close the files; a run that did not finish keeps whole rounds."""
        self._stop()
        if not self._finished:
            self._write(force=False)
            self._finished = True
        with self._io:
            self.metrics.close()
            self.timeline.close()
            if self.observer is not None:
                self.observer.close()

    def _stop(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join()

    # -- writing -----------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._dirty or self._closing)
                if self._closing:
                    return  # the closing call does the last pass itself
                self._dirty = False
            self._write(force=False)

    def _write(self, force: bool, server: Server | None = None) -> None:
        with self._io:
            if self._error is not None or self.metrics.closed:
                return
            try:
                self._take()
                self._commit(force)
                self._round_rows(force, server)
                self._flush()
            except OSError as e:  # reported by finish(); training goes on
                log.error("cannot write the metrics in %s: %s", self.out, e)
                self._error = e

    def _take(self) -> None:
        """New aggregations and client records (a late record of a written round goes out now)."""
        with self._cond:
            news, self._news = self._news, []
            logs = dict(self._logs)
        for t, secs, who in news:
            self._aggregates[t] = (secs, who)
        for lg in self._reports() if self._reports is not None else []:
            if lg.client not in logs:
                logs[lg.client] = lg
                self._taken.add(lg.client)
        self._seen = logs
        for c, lg in logs.items():
            new = lg.rounds[self._read.get(c, 0) :]
            self._read[c] = self._read.get(c, 0) + len(new)
            for r in new:
                self._rounds.setdefault(r.round, {})[r.client] = r
                if r.round < self._next and self._written.get((r.client, r.round)) != _row(r):
                    self._client_row(r)

    def _commit(self, force: bool) -> None:
        last = max(self._rounds, default=-1)
        while self._next <= last:
            t = self._next
            got = self._rounds.get(t, {})
            if not force and not self._complete(t, got):
                break
            for c in sorted(got):
                if (c, t) not in self._written:
                    self._client_row(got[c])
            self._spans(t)
            self._next += 1
        if force:
            self._spans(None)

    def _complete(self, t: int, got: dict[int, RoundRecord]) -> bool:
        if not got:
            return False
        if set(range(self.clients)) - set(self._dropped()) <= got.keys():
            return True
        agg = self._aggregates.get(t)
        return agg is not None and set(agg[1]) <= got.keys()

    def _spans(self, through: int | None) -> None:
        """Each client's spans of rounds <= ``through`` (all of them with None). A client's
        spans end in round order (round t+1 starts after barrier t), so a cursor suffices; in
        full duplex round t+1's upload can end before barrier t, and then it and the spans after
        it are written at the next call."""
        for c, lg in self._seen.items():
            at = self._span_at.get(c, 0)
            with lg._lock:
                new = lg.spans[at:]
            for s in new:
                if through is not None and s.round > through:
                    break
                at += 1
                if s not in self._restored:
                    self._span(s)
            if c in self._taken:  # a served client's reported spans: written, so let them go
                with lg._lock:
                    del lg.spans[:at]
                at = 0
            self._span_at[c] = at

    def _round_rows(self, force: bool, server: Server | None) -> None:
        rounds = set(self._aggregates)
        if force:
            rounds |= {t for t in self._rounds if t < len(self.plan)}
        for t in sorted(rounds - self._rows_done):
            if not force and t + 1 >= self._next:
                continue
            if t in self._aggregates:
                secs, who = self._aggregates[t]
            else:
                stats = server.stats if server is not None else None
                secs = stats.aggregate_s.get(t, 0.0) if stats else 0.0
                who = stats.participants.get(t, []) if stats else []
            self._round_row(t, secs, who)

    def _round_row(self, t: int, secs: float, who: list[int]) -> None:
        """The row of round ``t``; none while no client record of t is known (as a run that
        never heard of a round has no time for it)."""
        near = [*self._rounds.get(t - 1, {}).values(), *self._rounds.get(t, {}).values()]
        round_s = round_times(near).get(t)
        if round_s is None:
            return
        extra = {} if self.counts is None else self.counts(t)
        if self.epsilon is not None:
            extra["epsilon"] = self.epsilon(t)
        self._metric(
            {
                "kind": "round",
                "round": t,
                "block": self.plan[t],
                "round_s": round_s,
                "aggregate_s": secs,
                "participants": who,
                **extra,
            }
        )
        self._rows_done.add(t)

    def _client_row(self, r: RoundRecord) -> None:
        row = _row(r)
        self.metrics.write(row + "\n")
        self._written[r.client, r.round] = row
        if self.observer is not None:
            self.observer.row(r.to_json())

    def _metric(self, row: dict) -> None:
        self.metrics.write(json.dumps(row) + "\n")
        if self.observer is not None:
            self.observer.row(row)

    def _span(self, s: Span) -> None:
        row = asdict(s)
        row["start"] -= self.start
        row["end"] -= self.start
        self.timeline.write(json.dumps(row) + "\n")

    def _flush(self) -> None:
        self.metrics.flush()
        self.timeline.flush()
        if self.observer is not None:
            self.observer.flush()

    # -- resume ------------------------------------------------------------------------------
    def _resume(self, point: ResumePoint, serve: bool) -> None:
        """Append to what the interrupted run wrote, adding what its checkpoint holds that
        never reached the files (a hard kill between the two)."""
        rows = _reopen(self.out / "metrics.jsonl")
        spans = _reopen(self.out / "timeline.jsonl")
        self.metrics = open(self.out / "metrics.jsonl", "a")
        self.timeline = open(self.out / "timeline.jsonl", "a")
        self._next = point.round if serve else point.round + 1  # rounds the checkpoint holds
        self._rows_done = set(range(point.round))  # aggregated before: not aggregated again
        kept = {}
        for row in rows:
            r = _record(row)
            if r is not None and r.round < self._next:
                kept[r.client, r.round] = r
        for state in point.clients.values():
            for r in state.records:
                if (r.client, r.round) not in kept:
                    self._metric(r.to_json())
                kept[r.client, r.round] = r
        for (c, t), r in kept.items():
            self._rounds.setdefault(t, {})[c] = r
            self._written[c, t] = _row(r)
        if point.initial_eval and not any(
            row.get("kind") == "eval" and row.get("round") == -1 for row in rows
        ):
            self._metric(point.initial_eval)
        have = {(x.get("client"), x.get("round"), x.get("phase"), x.get("start")) for x in spans}
        for state in point.clients.values():
            for s in state.spans:
                self._restored.add(s)
                if (s.client, s.round, s.phase, s.start - self.start) not in have:
                    self._span(s)
        have_rows = {row.get("round") for row in rows if row.get("kind") == "round"}
        for t in sorted(point.aggregate_s):
            if t not in have_rows:
                self._round_row(t, point.aggregate_s[t], point.participants.get(t, []))


def _reopen(path: Path) -> list[dict]:
    """The rows of an interrupted run's file. A last line that a hard kill left half-written
    is cut off (appending after it would glue the next row to it)."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    whole = data[: data.rfind(b"\n") + 1]
    if len(whole) < len(data):
        log.warning("%s: dropping a half-written last line (the run was killed mid-write)", path)
        with open(path, "r+b") as f:
            f.truncate(len(whole))
    rows = []
    for line in whole.decode(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # readers report it with its line number
        if isinstance(row, dict):
            rows.append(row)
    return rows


_RECORD_FIELDS = {f.name for f in fields(RoundRecord)}


def _row(r: RoundRecord) -> str:
    return json.dumps(r.to_json())


def _record(row: dict) -> RoundRecord | None:
    if row.get("kind") != "client_round":
        return None
    try:
        return RoundRecord(**{k: v for k, v in row.items() if k in _RECORD_FIELDS})
    except TypeError:
        return None
