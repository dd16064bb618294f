"""The server's block service and reports: the blocks a client downloads (the current value, a
recent round's aggregate, or a compressed change from the version it holds), and what clients
measured (bounded: one record per round, at most ``MAX_REPORT_SPANS`` spans per client and round;
the run files take the spans as they write them, so they are not held for the whole run).

A role of ``core.server.Server``: it shares the server's lock and state.
"""

from __future__ import annotations

import time
from collections import Counter

from parablock.core.metrics import PHASES, ClientLog, RoundRecord, Span
from parablock.model.blocks import block_state
from parablock.wire.messages import BlockValue, MessageError
from parablock.wire.protocol import MAX_REPORT_SPANS, RoundReport


class BlockService:
    """Downloads and reports (the server sets the state)."""

    def block_value(self, block: int, version: int, base: int | None = None) -> BlockValue:
        """Block ``block`` at ``version``: the current value, or a recent round's aggregate.

        ``base``: the version the asking client holds; when round ``version``'s compressed
        aggregate was applied to exactly that version, the compressed change is sent instead."""
        with self._cond:
            if not 0 <= block < len(self.blocks):
                raise MessageError(f"no block {block}")
            change = self._deltas.get(version)
            if change is not None and change.block == block and change.base_version == base:
                return change
            if self.versions[block] == version:
                return BlockValue(block, version, block_state(self.model, self.blocks[block]))
            held = self._aggregates.get(version)
            if held is None or held.block != block:
                raise MessageError(f"block {block} version {version} is no longer held")
            return held

    def block_payload(self, block: int, version: int, base: int | None = None) -> bytes:
        return self.block_value(block, version, base).serialize()

    def block_chunks(self, block: int, version: int, chunk_bytes: int, base: int | None = None):
        return self.block_value(block, version, base).chunks(chunk_bytes)

    # -- reports, stop, resume --------------------------------------------------------------
    def report(self, report: RoundReport, client: int) -> None:
        """Keep what ``client`` measured (remote runs build their metrics from these).

        Bounded: one record per round (a later one replaces it) and at most
        ``MAX_REPORT_SPANS`` spans per round over all of a client's reports; the run files take
        the spans away as they write them (``RunFiles``), so they are not held for the run."""
        r = report.record
        for rnd, phase in [(r.round, "compute")] + [(s.round, s.phase) for s in report.spans]:
            if not 0 <= rnd <= len(self.plan) or phase not in PHASES:
                raise MessageError(f"report from client {client}: bad round {rnd} or phase")
        if not 0 <= client < self.clients:
            raise MessageError(f"report from client {client}: not one of this run's clients")
        new = Counter(s.round for s in report.spans)
        with self._cond:
            had = self._span_counts.setdefault(client, Counter())
            over = sorted(t for t, n in new.items() if had[t] + n > MAX_REPORT_SPANS)
            if over:
                raise MessageError(
                    f"report from client {client}: more than {MAX_REPORT_SPANS} spans for round "
                    f"{over[0]}"
                )
            had.update(new)
        record = RoundRecord(
            client,
            r.round,
            r.block,
            r.compute_s,
            r.upload_s,
            r.wait_s,
            r.download_s,
            r.idle_s,
            r.round_s,
            r.bytes_up,
            r.bytes_down,
            float("nan") if r.train_loss is None else r.train_loss,
            r.examples,
            r.start,
            r.end,
            r.drain,
            r.steps,
            r.epsilon,
        )
        spans = [Span(client, s.round, s.phase, s.start, s.end) for s in report.spans]
        with self._cond:
            lg = self.reports.setdefault(client, ClientLog(client))
            lg.rounds = [x for x in lg.rounds if x.round != r.round] + [record]
            with lg._lock:
                lg.spans.extend(spans)
            if report.final:
                self.finished.add(client)
            self._cond.notify_all()

    def wait_finished(self, timeout: float) -> bool:
        """Wait until every client not dropped has sent its final report (or ``timeout``)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not (set(range(self.clients)) - self._dropped) <= self.finished:
                left = deadline - time.monotonic()
                if left <= 0 or self._stopped:
                    return False
                self._cond.wait(timeout=min(1.0, left))
            return True

    def global_value(self, block: int) -> BlockValue:
        with self._cond:
            b = self.blocks[block]
            return BlockValue(block, self.versions[block], block_state(self.model, b))
