"""One federated run from a config: data, server, clients on a backend, evaluation, run directory.

The run directory holds ``config.toml`` (resolved), ``metrics.jsonl`` (per client per round, per
round, eval), ``timeline.jsonl`` (compute/upload/wait/download/idle spans, seconds from the start),
``summary.json`` and ``model/`` (the final global model and tokenizer, ``save_pretrained`` format).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from parablock.backends import BACKENDS, ClientSpec
from parablock.blocks import block_nbytes, model_blocks, select_blocks
from parablock.checkpoint import CheckpointStore
from parablock.config import Config
from parablock.data import Example, encode_all, partition, train_and_heldout
from parablock.link import LinkSpec
from parablock.metrics import round_times, summarize
from parablock.model import load_model, load_tokenizer
from parablock.schedule import make_plan
from parablock.server import Server
from parablock.train import TrainSettings, eval_loss

log = logging.getLogger(__name__)


class RunDirError(ValueError):
    """The run directory cannot be used (it already holds a finished run, or nothing to resume)."""


class RunInterrupted(RuntimeError):
    """Ctrl-C or SIGTERM stopped the run after saving its state; the message says how to resume."""


def run_dir(cfg: Config, resume: bool = False) -> Path:
    out = Path(cfg.run.out or f"runs/{cfg.federation.algorithm}-{time.strftime('%Y%m%d-%H%M%S')}")
    if (out / "summary.json").exists():
        raise RunDirError(f"run.out={str(out)!r} already holds a finished run; choose another")
    if resume and not (out / "checkpoint" / "run.json").is_file():
        raise RunDirError(f"{out} holds no checkpoint to resume from")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _settings(cfg: Config) -> TrainSettings:
    f = cfg.federation
    return TrainSettings(
        f.local_steps,
        f.batch_size,
        f.lr,
        f.weight_decay,
        f.warmup_steps,
        f.lr_schedule,
        f.grad_clip,
    )


def _links(cfg: Config) -> tuple[LinkSpec, LinkSpec]:
    chunk = cfg.link.chunk_kb * 1024
    return (
        LinkSpec(cfg.link.up_mbps, cfg.link.latency_ms, chunk),
        LinkSpec(cfg.link.down_mbps, cfg.link.latency_ms, chunk),
    )


@dataclass
class Federation:
    """Everything a run needs, built from the config (tests use it to drive backends directly)."""

    cfg: Config
    server: Server
    specs: list[ClientSpec]
    tokenizer: Any
    heldout: list[Example]
    selected: list[int]

    @property
    def model(self):
        return self.server.model


def prepare(cfg: Config) -> Federation:
    """Load the model, build blocks, plan, data, partition, server and client specs."""
    fed, seed = cfg.federation, cfg.run.seed
    torch.manual_seed(seed)
    model = load_model(cfg.model.name_or_path)
    blocks = model_blocks(model, cfg.model.extra_blocks)
    selected = select_blocks(blocks, cfg.model.blocks)
    plan = make_plan(fed.schedule, selected, fed.rounds, seed)

    tokenizer = load_tokenizer(cfg.model.name_or_path)
    pad_id = tokenizer.pad_token_id
    train_records, heldout_records = train_and_heldout(
        cfg.data.source, cfg.data.train_size, cfg.eval.size, seed
    )
    train = encode_all(train_records, tokenizer, cfg.data.max_length, "train")
    heldout = encode_all(heldout_records, tokenizer, cfg.data.max_length, "held-out")
    parts = partition(len(train), fed.clients, cfg.data.partition, seed)

    server = Server(
        model,
        blocks,
        plan,
        clients=fed.clients,
        min_clients=fed.min_clients,
        aggregator=fed.aggregator,
        server_lr=fed.server_lr,
        round_timeout_s=fed.round_timeout_s,
    )
    up, down = _links(cfg)
    specs = [
        ClientSpec(
            i,
            cfg.model.name_or_path,
            cfg.model.extra_blocks,
            tuple(train[j] for j in parts[i]),
            _settings(cfg),
            up,
            down,
            fed.algorithm,
            fed.correction,
            seed,
            pad_id,
        )
        for i in range(fed.clients)
    ]
    log.info(
        "%s: %d clients, %d rounds over blocks %s (%.1f MB per block), links up %s / down %s "
        "Mbit/s, %g ms",
        fed.algorithm,
        fed.clients,
        fed.rounds,
        selected,
        block_nbytes(model, blocks[selected[0]]) / 1e6,
        cfg.link.up_mbps,
        cfg.link.down_mbps,
        cfg.link.latency_ms,
    )
    return Federation(cfg, server, specs, tokenizer, heldout, selected)


def run(
    cfg: Config,
    *,
    on_barrier=None,
    on_phase=None,
    resume: bool = False,
    stop: threading.Event | None = None,
) -> dict:
    """Run the configured federation; returns the summary (also written to the run directory).

    ``on_barrier(client, t)`` hears each client's round end, ``on_phase(client, round, phase,
    started)`` each phase start and end (progress displays use both). With ``resume`` it continues
    the interrupted run in ``cfg.run.out`` from its checkpoint. Setting ``stop`` (or Ctrl-C /
    SIGTERM) ends the run at the next barrier with its state saved.
    """
    out = run_dir(cfg, resume)
    if not resume:
        (out / "config.toml").write_text(cfg.to_toml())
    torch.set_num_threads(os.cpu_count() or 1)
    fed = cfg.federation
    f = prepare(cfg)
    model, server, tokenizer, heldout = f.model, f.server, f.tokenizer, f.heldout
    pad_id = tokenizer.pad_token_id
    plan, selected, specs = server.plan, f.selected, f.specs
    stop = stop or threading.Event()

    store = CheckpointStore(out / "checkpoint") if cfg.run.checkpoint or resume else None
    if resume:
        point = store.load(fed.clients, selected)
        server.restore(point.round, point.blocks, point.aggregate_s, point.participants)
        specs = [replace(s, resume=point.clients[s.client_id]) for s in specs]
        started_at, initial_loss = point.started_at, point.initial_eval_loss
        log.info("resuming %s after round %d of %d", out, point.round + 1, fed.rounds)
    else:
        initial_loss = eval_loss(model, heldout, cfg.eval.batch_size, pad_id)
        log.info("held-out loss before training: %.4f", initial_loss)
        started_at = time.time()
        if store is not None:
            store.save_run(started_at, initial_loss)
    if store is not None:
        server.on_aggregate = lambda r, b, value, secs, who: store.save_block(
            b, r, value, secs, who
        )
        specs = [replace(s, checkpoint_dir=str(store.dir)) for s in specs]

    def progress(client, t: int) -> None:
        if on_barrier is not None:
            on_barrier(client, t)
        if stop.is_set():
            server.stop()  # wake clients waiting on aggregates that will not come
        if client.id == 0:
            r = client.log.rounds[-1]
            what = "drain" if r.drain else f"round {t + 1}/{fed.rounds} block {r.block}"
            loss = "" if r.drain else f", train loss {r.train_loss:.4f}"
            log.info(
                "%s: compute %.2fs, upload %.2fs, wait %.2fs, download %.2fs, idle %.2fs%s",
                what,
                r.compute_s,
                r.upload_s,
                r.wait_s,
                r.download_s,
                r.idle_s,
                loss,
            )

    backend = BACKENDS.get(cfg.run.backend)
    start = time.time()
    with _stop_on_signals(stop, server):
        logs = backend(
            specs,
            server,
            threads=cfg.run.threads,
            on_barrier=progress,
            on_phase=on_phase,
            stop=stop,
        )
    if store is not None:
        store.flush()
    if stop.is_set():
        raise RunInterrupted(f"stopped; resume with: parablock run --resume {out}")
    records = sorted((r for lg in logs for r in lg.rounds), key=lambda r: (r.round, r.client))
    # wall time excludes any downtime between an interruption and the resume
    before = max((r.end for r in records if r.end < start), default=started_at) - started_at
    wall = before + time.time() - start
    torch.set_num_threads(os.cpu_count() or 1)

    final_loss = eval_loss(model, heldout, cfg.eval.batch_size, pad_id)
    log.info("held-out loss after training: %.4f (was %.4f)", final_loss, initial_loss)

    agg = server.stats.aggregate_s
    summary = summarize(
        records,
        algorithm=fed.algorithm,
        clients=fed.clients,
        rounds=fed.rounds,
        wall_time_s=wall,
        aggregate_s=sum(agg.values()) / len(agg) if agg else 0.0,
    )
    summary.update(
        initial_eval_loss=initial_loss,
        final_eval_loss=final_loss,
        updates_accepted=server.stats.accepted,
        updates_rejected=len(server.stats.rejected),
        blocks=selected,
        plan=plan,
        run_dir=str(out),
        model_note="embedded SmolLM2-135M-Instruct is a dequantised Q4_1 (4-bit) GGUF copy"
        if cfg.model.name_or_path == "smollm2-135m-instruct"
        else "",
    )
    _write(
        out,
        records,
        logs,
        server,
        round_times(records),
        started_at,
        initial_loss,
        final_loss,
        summary,
    )
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    log.info(
        "wall time %.1fs, mean round %.2fs; run directory: %s", wall, summary["mean_round_s"], out
    )
    return summary


@contextmanager
def _stop_on_signals(stop: threading.Event, server: Server):
    """Ctrl-C / SIGTERM: finish cleanly at the next barrier instead of dying mid-round."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt  # a second Ctrl-C: leave now (the checkpoint still holds)
        log.warning(
            "%s: stopping at the next barrier; the run can be resumed", signal.Signals(signum).name
        )
        stop.set()
        server.stop()

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def _write(
    out: Path,
    records,
    logs,
    server: Server,
    rtimes: dict[int, float],
    start: float,
    initial_loss: float,
    final_loss: float,
    summary: dict,
) -> None:
    with open(out / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"kind": "eval", "round": -1, "eval_loss": initial_loss}) + "\n")
        for r in records:
            f.write(json.dumps(r.to_json()) + "\n")
        for t, secs in rtimes.items():
            f.write(
                json.dumps(
                    {
                        "kind": "round",
                        "round": t,
                        "block": server.plan[t],
                        "round_s": secs,
                        "aggregate_s": server.stats.aggregate_s.get(t, 0.0),
                        "participants": server.stats.participants.get(t, []),
                    }
                )
                + "\n"
            )
        f.write(
            json.dumps({"kind": "eval", "round": len(server.plan), "eval_loss": final_loss}) + "\n"
        )
    with open(out / "timeline.jsonl", "w") as f:
        for lg in logs:
            for s in sorted(lg.spans, key=lambda s: s.start):
                row = asdict(s)
                row["start"] -= start
                row["end"] -= start
                f.write(json.dumps(row) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
