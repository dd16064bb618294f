"""Checkpoints: what a run needs to continue after Ctrl-C, SIGTERM or a hard kill.

Written after every round, off the critical path (a background writer thread), each file atomically
(write to a temp file, fsync, rename, fsync the directory) and checksummed:

- ``block{b}.v{version}.st``: the server's global value of block b after the round ``version``
  (the last ``KEEP`` versions of each block are kept, so the global model after any of the last
  rounds can be rebuilt);
- ``client{i}.r{t}.st``: client i at its barrier of round t: block versions it knows, its pending
  delta, the values of blocks where it differs from the global model, and its round records/spans
  (the last ``KEEP`` rounds are kept); with ``federation.optimizer_state=per_block`` also every
  trained block's AdamW moments and step count;
- with a lossy ``link.compression``, also each error-feedback residual (the server's for the block
  in its block file, a client's for every block it trained) and the global value the client's
  pending delta was trained from (a compressed aggregate is applied to it);
- ``run.json``: when the run started.

Client files hold a site's private training state (deltas, block values), so every file here is
written readable by its owner only (0o600) in a directory only its owner can enter (0o700).
A block file also records how many updates the server had accepted and rejected when it
aggregated that version, so a resumed run's totals cover the whole run.

A resume picks the latest round R for which every client has a valid state and the server's global
model after round R-1 can be rebuilt; a corrupt or truncated file is reported and skipped, so the
previous good one is used. Random state needs no file: batches are a pure function of (seed, round)
and, by default, a fresh optimizer starts every round (per_block's state is in the client file).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from parablock.core.metrics import RoundRecord, Span
from parablock.errors import CheckpointError  # noqa: F401
from parablock.model.train import Moments
from parablock.wire.messages import BlockUpdate, MessageError, pack, unpack

log = logging.getLogger(__name__)

KEEP = 3
FILE_MODE = 0o600  # client state is private to its site; nothing here is for other users
DIR_MODE = 0o700


@dataclass
class ClientState:
    client: int
    round: int  # the barrier this state was taken at
    versions: dict[int, int]
    pending: BlockUpdate | None
    dirty: dict[int, dict[str, torch.Tensor]]  # block -> value where the client != global
    records: list[RoundRecord] = field(default_factory=list)
    spans: list[Span] = field(default_factory=list)
    # link.compression: block -> error-feedback residual, and the global value of the pending
    # delta's block at its base version (None: no compression, or nothing pending)
    residuals: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    base: dict[str, torch.Tensor] | None = None
    # privacy.mode=record: the site's ledger, (noise multiplier, sample rate, steps) entries
    privacy: list = field(default_factory=list)
    # federation.optimizer_state=per_block: block -> its AdamW state after its last visit
    moments: dict[int, Moments] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        tensors = {f"dirty.{b}.{n}": t for b, ts in self.dirty.items() for n, t in ts.items()}
        tensors.update(
            {f"residual.{b}.{n}": t for b, ts in self.residuals.items() for n, t in ts.items()}
        )
        tensors.update({f"base.{n}": t for n, t in (self.base or {}).items()})
        for b, m in self.moments.items():
            tensors.update({f"exp_avg.{b}.{n}": t for n, t in m.exp_avg.items()})
            tensors.update({f"exp_avg_sq.{b}.{n}": t for n, t in m.exp_avg_sq.items()})
        meta = {
            "client": self.client,
            "round": self.round,
            "versions": {str(k): v for k, v in self.versions.items()},
            "records": [asdict(r) for r in self.records],
            "spans": [asdict(s) for s in self.spans],
            "pending": None,
            "privacy": self.privacy,
            "moment_steps": {str(b): m.step for b, m in self.moments.items()},
        }
        if self.pending is not None:
            p = self.pending
            meta["pending"] = {
                k: getattr(p, k)
                for k in ("client", "round", "block", "base_version", "num_examples", "train_loss")
            }
            tensors.update({f"pending.{n}": t for n, t in p.tensors.items()})
        return pack("ClientState", meta, tensors)

    @classmethod
    def from_bytes(cls, payload: bytes) -> ClientState:
        meta, tensors = unpack("ClientState", payload)
        dirty: dict[int, dict[str, torch.Tensor]] = {}
        residuals: dict[int, dict[str, torch.Tensor]] = {}
        pending_t, base = {}, {}
        moments: dict[str, dict[int, dict[str, torch.Tensor]]] = {"exp_avg": {}, "exp_avg_sq": {}}
        for key, t in tensors.items():
            kind, _, rest = key.partition(".")
            if kind in moments:
                b, _, name = rest.partition(".")
                moments[kind].setdefault(int(b), {})[name] = t
            elif kind == "pending":
                pending_t[rest] = t
            elif kind == "base":
                base[rest] = t
            else:
                b, _, name = rest.partition(".")
                (residuals if kind == "residual" else dirty).setdefault(int(b), {})[name] = t
        pending = BlockUpdate(tensors=pending_t, **meta["pending"]) if meta["pending"] else None
        return cls(
            meta["client"],
            meta["round"],
            {int(k): v for k, v in meta["versions"].items()},
            pending,
            dirty,
            [RoundRecord(**r) for r in meta["records"]],
            [Span(**s) for s in meta["spans"]],
            residuals,
            base or None,
            meta.get("privacy", []),  # absent from checkpoints written before privacy
            {
                int(b): Moments(
                    int(step), moments["exp_avg"][int(b)], moments["exp_avg_sq"][int(b)]
                )
                for b, step in meta.get("moment_steps", {}).items()
            },
        )


@dataclass
class ResumePoint:
    round: int  # every client passed this barrier; the server aggregated rounds < round
    blocks: dict[int, tuple[int, dict[str, torch.Tensor]]]  # block -> (version, global value)
    clients: dict[int, ClientState]
    aggregate_s: dict[int, float]
    participants: dict[int, list[int]]
    started_at: float
    initial_eval: dict  # the base model's eval record
    # updates the server had accepted / rejected when it aggregated round ``round - 1`` (None:
    # an older checkpoint that did not record them)
    accepted: int | None = None
    rejected: int | None = None
    # link.compression: block -> the server's error-feedback residual at the version in ``blocks``
    residuals: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)


def _atomic_write(path: Path, data: bytes) -> None:
    """Write, fsync, rename, fsync the directory; the file is the owner's only from its creation
    (a mode set after writing would leave a moment where others could read it)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    with open(fd, "wb") as f:
        os.fchmod(f.fileno(), FILE_MODE)  # a leftover temp file may have had another mode
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointStore:
    """One run's checkpoint directory; writes go through one background thread per store."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        try:  # also a directory made before checkpoints were private
            os.chmod(self.dir, DIR_MODE)
        except OSError as e:
            log.warning("cannot make %s private to its owner: %s", self.dir, e.strerror)
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._error: BaseException | None = None

    # -- writing ---------------------------------------------------------------------------------
    def _submit(self, fn, *args) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="checkpoint", daemon=True)
                self._thread.start()
        self._queue.put((fn, args))

    def _work(self) -> None:
        while True:
            fn, args = self._queue.get()
            try:
                fn(*args)
            except BaseException as e:  # reported by flush(); never kills training
                log.error("checkpoint write failed: %s", e)
                self._error = e
            finally:
                self._queue.task_done()

    def flush(self) -> None:
        """Wait until every queued write is on disk."""
        self._queue.join()
        if self._error is not None:
            raise CheckpointError(f"a checkpoint write failed: {self._error}")

    def save_run(self, started_at: float, initial_eval: dict) -> None:
        info = {"started_at": started_at, "initial_eval": initial_eval}
        _atomic_write(self.dir / "run.json", json.dumps(info).encode())

    def save_block(
        self,
        block: int,
        version: int,
        tensors: dict[str, torch.Tensor],
        aggregate_s: float,
        participants: list[int],
        updates: tuple[int, int] | None = None,
        residual: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Queue block ``block``'s global value after round ``version``; ``updates``: the
        server's (accepted, rejected) totals at that aggregation; ``residual``: the server's
        error-feedback residual of the block then (compression only)."""
        meta = {
            "block": block,
            "version": version,
            "aggregate_s": aggregate_s,
            "participants": participants,
        }
        if updates is not None:
            meta["accepted"], meta["rejected"] = updates
        tensors = {n: t.detach().clone() for n, t in tensors.items()}
        tensors.update({RESIDUAL + n: t.detach().clone() for n, t in (residual or {}).items()})
        self._submit(
            self._write,
            f"block{block}.v{version}.st",
            "BlockCheckpoint",
            meta,
            tensors,
            rf"block{block}\.v(-?\d+)\.st",
        )

    def save_client(self, state: ClientState) -> None:
        self._submit(self._write_client, state)

    def _write_client(self, state: ClientState) -> None:
        name = f"client{state.client}.r{state.round}.st"
        _atomic_write(self.dir / name, state.to_bytes())
        self._prune(rf"client{state.client}\.r(-?\d+)\.st")

    def _write(self, name: str, kind: str, meta: dict, tensors, pattern: str) -> None:
        _atomic_write(self.dir / name, pack(kind, meta, tensors))
        self._prune(pattern)

    def _prune(self, pattern: str) -> None:
        found = sorted(self._versions(pattern), reverse=True)
        for _, path in found[KEEP:]:
            path.unlink(missing_ok=True)

    def _versions(self, pattern: str) -> list[tuple[int, Path]]:
        rx = re.compile(pattern + "$")
        return [(int(m.group(1)), p) for p in self.dir.iterdir() if (m := rx.match(p.name))]

    # -- reading ---------------------------------------------------------------------------------
    def _read(self, path: Path, kind: str):
        try:
            return unpack(kind, path.read_bytes())
        except (MessageError, OSError, ValueError, KeyError) as e:
            log.warning("checkpoint file %s is unusable (%s); using an earlier one", path, e)
            return None

    def run_info(self) -> dict:
        """``run.json``: when the run started and the base model's eval (see ``read_run_info``)."""
        return read_run_info(self.dir)

    def load_server(self, plan: list[int]) -> ResumePoint:
        """The server's side alone (clients keep their own checkpoints at their sites): the
        latest round R such that the global model after round R-1 can be rebuilt, i.e. every
        block holds the version of the last round <= R-1 that trained it."""
        info = self.run_info()
        cache: dict[tuple[int, int], tuple[dict, dict] | None] = {}

        def read(b: int, v: int):
            if (b, v) not in cache:
                path = self.dir / f"block{b}.v{v}.st"
                cache[b, v] = self._read(path, "BlockCheckpoint") if path.is_file() else None
            return cache[b, v]

        for r in range(len(plan), -1, -1):
            want = {b: max((t for t in range(r) if plan[t] == b), default=-1) for b in set(plan)}
            got = {b: read(b, v) for b, v in want.items() if v >= 0}
            if all(x is not None for x in got.values()):
                agg = {want[b]: m["aggregate_s"] for b, (m, _) in got.items()}
                part = {want[b]: m["participants"] for b, (m, _) in got.items()}
                log.info("the server's checkpoint holds rounds 1..%d", r)
                blocks, residuals = _split({b: (want[b], ts) for b, (_, ts) in got.items()})
                return ResumePoint(
                    r,
                    blocks,
                    {},
                    agg,
                    part,
                    info["started_at"],
                    info["initial_eval"],
                    *_updates([m for m, _ in got.values() if m["version"] == r - 1], r),
                    residuals,
                )
        raise CheckpointError(f"{self.dir}: no consistent server checkpoint")  # unreachable

    def latest_client(self, client: int) -> ClientState | None:
        """This client's newest readable barrier state (a client at its own site keeps only its
        own states), or None when there is none."""
        for _, path in sorted(self._versions(rf"client{client}\.r(-?\d+)\.st"), reverse=True):
            try:
                return ClientState.from_bytes(path.read_bytes())
            except (MessageError, OSError, ValueError, KeyError, TypeError) as e:
                log.warning("checkpoint file %s is unusable (%s); using an earlier one", path, e)
        return None

    def load(self, clients: int, block_ids: list[int]) -> ResumePoint:
        """The latest consistent point to resume from (see the module docstring)."""
        info = self.run_info()
        states: dict[int, dict[int, ClientState]] = {}
        for i in range(clients):
            states[i] = {}
            for t, path in self._versions(rf"client{i}\.r(-?\d+)\.st"):
                try:
                    states[i][t] = ClientState.from_bytes(path.read_bytes())
                except (MessageError, OSError, ValueError, KeyError, TypeError) as e:
                    log.warning(
                        "checkpoint file %s is unusable (%s); using an earlier one", path, e
                    )
        blocks: dict[int, dict[int, tuple[dict, dict]]] = {}
        for b in block_ids:
            blocks[b] = {}
            for v, path in self._versions(rf"block{b}\.v(-?\d+)\.st"):
                got = self._read(path, "BlockCheckpoint")
                if got is not None:
                    blocks[b][v] = got
        common = set.intersection(*(set(s) for s in states.values())) if states else set()
        for r in sorted(common, reverse=True):
            # At barrier r a client knows the global version of every block after round r-1;
            # the server's files must hold exactly those versions.
            known = states[0][r].versions
            chosen = {}
            for b in block_ids:
                v = known.get(b, -1)
                if v >= 0 and v not in blocks[b]:
                    break
                if v >= 0:
                    chosen[b] = (v, blocks[b][v][1])
            else:
                agg, part = {}, {}
                for versions in blocks.values():
                    for v, (meta, _) in versions.items():
                        if v <= r - 1:
                            agg[v], part[v] = meta["aggregate_s"], meta["participants"]
                log.info("resuming after round %d", r)
                last = [v[r - 1][0] for v in blocks.values() if r - 1 in v]
                chosen, residuals = _split(chosen)
                return ResumePoint(
                    r,
                    chosen,
                    {i: states[i][r] for i in states},
                    agg,
                    part,
                    info["started_at"],
                    info["initial_eval"],
                    *_updates(last, r),
                    residuals,
                )
        raise CheckpointError(
            f"{self.dir}: no round for which every client and the server have a valid checkpoint"
        )


def read_run_info(directory: str | Path) -> dict:
    """``directory/run.json`` checked: a missing or corrupt one is a one-line CheckpointError
    naming the file (the run cannot be resumed without it: it says when the run started)."""
    path = Path(directory) / "run.json"
    if not path.is_file():
        raise CheckpointError(f"{directory} holds no checkpoint (no run.json)")
    try:
        info = json.loads(path.read_text())
        started = float(info["started_at"])
        initial = info["initial_eval"]
        if initial is not None and not isinstance(initial, dict):
            raise TypeError("initial_eval is not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        why = " ".join(f"{type(e).__name__}: {e}".split())
        raise CheckpointError(
            f"{path} is corrupt ({why}); the run cannot be resumed from it: start it again "
            "with another run.out"
        ) from None
    return {"started_at": started, "initial_eval": initial}


RESIDUAL = "#residual."  # prefix of a residual's tensors in a block file (no parameter name)


def _split(blocks: dict[int, tuple[int, dict]]) -> tuple[dict[int, tuple[int, dict]], dict]:
    """Block files' tensors as (block -> (version, value)) and (block -> residual)."""
    values, residuals = {}, {}
    for b, (v, ts) in blocks.items():
        values[b] = (v, {n: t for n, t in ts.items() if not n.startswith(RESIDUAL)})
        residual = {n[len(RESIDUAL) :]: t for n, t in ts.items() if n.startswith(RESIDUAL)}
        if residual:
            residuals[b] = residual
    return values, residuals


def _updates(metas: list[dict], r: int) -> tuple[int | None, int | None]:
    """(accepted, rejected) as the server counted them at round ``r - 1``'s aggregation."""
    if r == 0:
        return 0, 0
    for m in metas:
        if "accepted" in m:
            return int(m["accepted"]), int(m["rejected"])
    return None, None
