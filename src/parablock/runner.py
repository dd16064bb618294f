"""One federated run from a config: data, server, clients on a backend, evaluation, run directory.

The run directory holds ``config.toml`` (resolved), ``metrics.jsonl`` (per client per round, per
round, eval), ``timeline.jsonl`` (compute/upload/wait/download/idle spans, seconds from the start),
``summary.json`` and ``model/`` (the final global model and tokenizer, ``save_pretrained`` format).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from parablock.backends import BACKENDS, ClientSpec
from parablock.blocks import block_nbytes, model_blocks, select_blocks
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
    """The run directory cannot be used (it already holds a finished run)."""


def run_dir(cfg: Config) -> Path:
    out = Path(cfg.run.out or f"runs/{cfg.federation.algorithm}-{time.strftime('%Y%m%d-%H%M%S')}")
    if (out / "summary.json").exists():
        raise RunDirError(f"run.out={str(out)!r} already holds a finished run; choose another")
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
            cpus=cfg.run.client_cpus,
            gpus=cfg.run.client_gpus,
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


def run(cfg: Config, *, on_barrier=None) -> dict:
    """Run the configured federation; returns the summary (also written to the run directory)."""
    out = run_dir(cfg)
    (out / "config.toml").write_text(cfg.to_toml())
    torch.set_num_threads(os.cpu_count() or 1)
    fed = cfg.federation
    f = prepare(cfg)
    model, server, tokenizer, heldout = f.model, f.server, f.tokenizer, f.heldout
    pad_id = tokenizer.pad_token_id
    plan, selected, specs = server.plan, f.selected, f.specs

    initial_loss = eval_loss(model, heldout, cfg.eval.batch_size, pad_id)
    log.info("held-out loss before training: %.4f", initial_loss)

    def progress(client, t: int) -> None:
        if on_barrier is not None:
            on_barrier(client, t)
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
    logs = backend(
        specs, server, threads=cfg.run.threads, on_barrier=progress, address=cfg.run.ray_address
    )
    wall = time.time() - start
    torch.set_num_threads(os.cpu_count() or 1)

    final_loss = eval_loss(model, heldout, cfg.eval.batch_size, pad_id)
    log.info("held-out loss after training: %.4f (was %.4f)", final_loss, initial_loss)

    records = sorted((r for lg in logs for r in lg.rounds), key=lambda r: (r.round, r.client))
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
        clients_dropped=server.stats.dropped,
        blocks=selected,
        plan=plan,
        run_dir=str(out),
        model_note="embedded SmolLM2-135M-Instruct is a dequantised Q4_1 (4-bit) GGUF copy"
        if cfg.model.name_or_path == "smollm2-135m-instruct"
        else "",
    )
    _write(
        out, records, logs, server, round_times(records), start, initial_loss, final_loss, summary
    )
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    log.info(
        "wall time %.1fs, mean round %.2fs; run directory: %s", wall, summary["mean_round_s"], out
    )
    return summary


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
