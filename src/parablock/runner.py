"""One federated run from a config: data, server, clients on a backend, evaluation, run directory.

The run directory holds ``config.toml`` (resolved), ``metrics.jsonl`` (per client per round, per
round, eval), ``timeline.jsonl`` (compute/upload/wait/download/idle spans, seconds from the start),
``summary.json``, ``data.json`` (sources, examples kept/truncated/dropped), ``partition.json`` and
``partition.png`` (per client: examples, tokens, examples per label), ``eval_items.jsonl`` (what the
model answered on each accuracy item at each evaluation), ``model/`` (the final global model and
tokenizer, ``save_pretrained`` format; with a LoRA adapter the merged model, and the adapter alone
in ``model-adapter/``), ``checkpoint/`` and ``lock``.

A run holds ``lock`` (flock) from start to end, so a second run into the same directory fails at
once instead of overwriting it. ``metrics.jsonl`` and ``timeline.jsonl`` grow round by round
(``RunFiles``), so a hard kill keeps every finished round and a running federation can be watched;
a resume appends to them.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from parablock.backends import BACKENDS, ClientSpec
from parablock.config import Config, per_client_text, per_client_value
from parablock.core.algorithms import check_plan
from parablock.core.baselines import layout, round_turns, traits
from parablock.core.blocks import block_nbytes, set_block
from parablock.core.checkpoint import CheckpointStore, ResumePoint
from parablock.core.forward import resolve_precision
from parablock.core.lora import blocks_for, client_lr, export, settings_for
from parablock.core.metrics import describe, summarize
from parablock.core.overlap import Overlap
from parablock.core.protocol import RunSettings
from parablock.core.schedule import make_plan
from parablock.core.server import Rejections, Server
from parablock.core.train import TrainSettings
from parablock.data.examples import DataStats, Example, Record, encode_all
from parablock.data.partition import client_stats, partition
from parablock.data.partition import save as save_partition
from parablock.data.sources import client_records, heldout_draw, train_and_heldout
from parablock.errors import ConfigError, RunDirError, RunInterrupted  # noqa: F401
from parablock.evaluation.evaluate import (
    AggregateHistory,
    EvalResult,
    EvalSettings,
    Evaluator,
    eval_rounds,
)
from parablock.faults import stall_seconds
from parablock.memory import peak_rss_mb, reset_peak
from parablock.model import load_model, load_tokenizer, model_fingerprint
from parablock.rundir import (
    check_rounds,
    check_run_dir,
    locked,
    record_config,
    resumed_config,
    run_dir,
)
from parablock.runfiles import RunFiles
from parablock.transport.link import LinkSpec

log = logging.getLogger(__name__)


def _settings(cfg: Config) -> TrainSettings:
    # recompute is a client's own memory choice, not a setting the server hands out
    return replace(run_settings(cfg, []).train_settings(), recompute=cfg.train.recompute)


def _links(cfg: Config, client: int) -> tuple[LinkSpec, LinkSpec]:
    """Client ``client``'s uplink and downlink (``link.*`` may differ per client)."""
    up, down, latency = cfg.link.client(client)
    chunk = cfg.link.chunk_kb * 1024
    return LinkSpec(up, latency, chunk), LinkSpec(down, latency, chunk)


@dataclass
class Federation:
    """Everything a run needs, built from the config (tests use it to drive backends directly)."""

    cfg: Config
    server: Server
    specs: list[ClientSpec]
    tokenizer: Any
    heldout: list[Example]
    selected: list[int]
    heldout_records: list[Record]
    partition_stats: list[dict]
    data_stats: dict

    @property
    def model(self):
        return self.server.model


def _per_client_train(
    cfg: Config,
    sources: list[str],
    tokenizer,
    heldout_records: list[Record],
    stats: DataStats,
) -> tuple[list[Record], list[Example], list[list[int]]]:
    """data.partition=per_client: client i encodes ``client_records(sources[i], ...)``.

    Returns the records and examples of all clients concatenated in client order, and the
    indices each client owns in them (contiguous ranges), for the partition statistics.
    """
    d, seed = cfg.data, cfg.run.seed
    heldout_keys = {r.key for r in heldout_records}
    records: list[Record] = []
    examples: list[Example] = []
    parts: list[list[int]] = []
    for i, src in enumerate(sources):
        recs = client_records(src, d.train_size, seed, d.label_field)
        overlap = sum(r.key in heldout_keys for r in recs)
        if overlap:
            log.warning(
                "client %d (%s): %d training prompt(s) are also held-out; evaluation is not "
                "on unseen data",
                i,
                src,
                overlap,
            )
        own = DataStats()
        exs = encode_all(recs, tokenizer, d.max_length, f"train client {i} ({src})", own)
        stats.kept += own.kept
        stats.truncated += own.truncated
        stats.dropped += own.dropped
        parts.append(list(range(len(examples), len(examples) + len(exs))))
        records += recs
        examples += exs
    return records, examples, parts


def _compute_summary(cfg: Config, serve: bool) -> dict:
    """Which precision the clients trained in, and this process's peak memory (with the local
    backend: the server and every client, hence also per client)."""
    device = torch.device("cuda" if cfg.run.client_gpus > 0 else "cpu")
    precision = "per client" if serve else resolve_precision(cfg.train.precision, device)
    peak = peak_rss_mb()  # since this run started (memory.py)
    local = not serve and cfg.run.backend == "local"
    return {
        "precision": precision,
        "frozen_dtype": "per client" if serve else cfg.model.frozen_dtype,
        "recompute": "per client" if serve else cfg.train.recompute,
        "peak_rss_mb": peak,
        "peak_rss_mb_per_client": peak / cfg.federation.clients if local else None,
    }


def run_settings(cfg: Config, plan: list[int]) -> RunSettings:
    """The training settings a server hands every client at join."""
    f, d = cfg.federation, cfg.data
    lora = settings_for(cfg)
    return RunSettings(
        f.algorithm,
        f.correction,
        list(plan),
        cfg.model.extra_blocks,
        f.local_steps,
        f.batch_size,
        client_lr(cfg),
        f.weight_decay,
        f.warmup_steps,
        f.lr_schedule,
        f.grad_clip,
        cfg.run.seed,
        d.max_length,
        d.train_size,
        d.label_field,
        cfg.train.precision,
        cfg.train.prefix_cache_mb,
        cfg.train.response_logits,
        cfg.train.loss_chunk,
        cfg.link.compression,
        f.server_lr,
        **(lora.run_fields() if lora else {}),  # the adapter of fedit_lora
        local_steps_max=f.local_steps_max,
        duplex=f.duplex,
        turns=round_turns(f.algorithm, f.rounds, f.clients),
    )


def prepare(cfg: Config, serve: bool = False) -> Federation:
    """Load the model, build blocks, plan, data, partition, server and client specs.

    ``serve``: the clients are remote (``parablock server``): no training data here, only the
    server's own held-out data (``eval.source``, if any), and the server checks each joining
    client's base model against this one's fingerprint.
    """
    fed, seed = cfg.federation, cfg.run.seed
    if serve and fed.correction == "none":
        # The ablation leaves each client's copy apart from the global model, which a real
        # federation's clients (checked against the server at the end, resumed from it) cannot be.
        raise ConfigError(
            "federation.correction=none is a simulation ablation; a networked federation applies "
            "every aggregate (use federation.correction=replace)"
        )
    device = torch.device("cuda" if cfg.run.client_gpus > 0 else "cpu")
    if (
        cfg.model.frozen_dtype != "fp32"
        and resolve_precision(cfg.train.precision, device) != "bf16"
    ):
        raise ConfigError(
            f"model.frozen_dtype={cfg.model.frozen_dtype} needs a bf16 forward, but train.precision"
            f"={cfg.train.precision} is fp32 on this {device.type} (no fast bf16); use fp32"
        )
    torch.manual_seed(seed)
    model = load_model(cfg.model.name_or_path)
    fingerprint = model_fingerprint(model) if serve else ""  # of the base, before any adapter
    lora = settings_for(cfg)
    blocks, selected = layout(
        model, fed.algorithm, cfg.model.extra_blocks, cfg.model.blocks, lora, seed
    )
    check_plan(fed.algorithm, selected)
    plan = make_plan(fed.schedule, selected, fed.rounds, seed)

    tokenizer = load_tokenizer(cfg.model.name_or_path)
    pad_id = tokenizer.pad_token_id
    server = Server(
        model,
        blocks,
        plan,
        clients=fed.clients,
        min_clients=fed.min_clients,
        aggregator=fed.aggregator,
        server_lr=fed.server_lr,
        trim_fraction=fed.trim_fraction,
        max_client_weight=fed.max_client_weight,
        max_update_norm=fed.max_update_norm,
        update_norm_action=fed.update_norm_action,
        update_bound=fed.update_bound,
        round_timeout_s=fed.round_timeout_s,
        settings=run_settings(cfg, plan),
        fingerprint=fingerprint,
        compression=cfg.link.compression,
    )
    if serve:
        return _serving(cfg, server, tokenizer, selected)
    train_stats, heldout_stats = DataStats(), DataStats()
    train_records, heldout_records = train_and_heldout(
        cfg.data.source,
        cfg.data.train_size,
        max(cfg.eval.size, cfg.eval.accuracy_size),
        seed,
        heldout_spec=cfg.eval.source,
        label_field=cfg.data.label_field,
        stats=train_stats,
    )
    max_len = cfg.data.max_length
    client_sources = cfg.data.client_source_list()
    if cfg.data.partition == "per_client":
        # Each client's data is its own source, drawn exactly as a networked client draws it
        # (no filtering against held-out data, which such a client cannot know); the records
        # drawn from data.source above are not trained on.
        train_records, train, parts = _per_client_train(
            cfg, client_sources, tokenizer, heldout_records, train_stats
        )
    else:
        train = encode_all(train_records, tokenizer, max_len, "train", train_stats)
    # The loss uses the first eval.size held-out items; accuracy the first eval.accuracy_size.
    heldout = encode_all(heldout_records[: cfg.eval.size], tokenizer, max_len, "held-out")
    encode_all(heldout_records, tokenizer, max_len, "held-out (all)", heldout_stats)
    if cfg.data.partition != "per_client":
        parts = partition(
            [e.group for e in train],
            fed.clients,
            cfg.data.partition,
            seed,
            alpha=cfg.data.alpha,
            weights=cfg.data.weights(),
        )
    pstats = client_stats(train, parts)
    for c in pstats:
        log.info(
            "client %d: %d examples, %d tokens, %d label(s)",
            c["client"],
            c["examples"],
            c["tokens"],
            len(c["labels"]),
        )
    data_stats = {
        "source": cfg.data.source,
        "eval_source": cfg.eval.source or cfg.data.source,
        "max_length": max_len,
        "train_records": len(train_records),
        "heldout_records": len(heldout_records),
        "train": train_stats.to_json(),
        "heldout": heldout_stats.to_json(),
    }
    if client_sources:
        data_stats["client_sources"] = client_sources

    specs = [
        ClientSpec(
            i,
            cfg.model.name_or_path,
            cfg.model.extra_blocks,
            tuple(train[j] for j in parts[i]),
            _settings(cfg),
            *_links(cfg, i),
            fed.algorithm,
            fed.correction,
            seed,
            pad_id,
            cpus=cfg.run.client_cpus,
            gpus=cfg.run.client_gpus,
            faults=cfg.run.faults,
            stall_s=stall_seconds(fed.round_timeout_s),
            trained=tuple(selected),
            slowdown=per_client_value(fed.compute_slowdown, i),
            compression=cfg.link.compression,
            server_lr=fed.server_lr,
            lora=lora,
            overlap=Overlap(fed.local_steps_max, fed.duplex),
            frozen_dtype=cfg.model.frozen_dtype,
        )
        for i in range(fed.clients)
    ]
    log.info(
        "%s: %d clients, %d rounds over blocks %s (%.1f MB per block), links up %s / down %s "
        "Mbit/s, %s ms%s",
        fed.algorithm,
        fed.clients,
        fed.rounds,
        selected,
        block_nbytes(model, blocks[selected[0]]) / 1e6,
        per_client_text(cfg.link.up_mbps),
        per_client_text(cfg.link.down_mbps),
        per_client_text(cfg.link.latency_ms),
        ""
        if fed.compute_slowdown == (1.0,)
        else f", compute slow-down {per_client_text(fed.compute_slowdown)}",
    )
    return Federation(
        cfg,
        server,
        specs,
        tokenizer,
        heldout,
        selected,
        heldout_records,
        pstats,
        data_stats,
    )


def _serving(cfg: Config, server: Server, tokenizer, selected: list[int]) -> Federation:
    """A server whose clients are remote: held-out data from ``eval.source`` only."""
    ev, stats = cfg.eval, DataStats()
    records, heldout = [], []
    if ev.source:
        n = max(ev.size, ev.accuracy_size)
        records = heldout_draw(ev.source, n, cfg.run.seed, cfg.data.label_field)
        heldout = encode_all(records[: ev.size], tokenizer, cfg.data.max_length, "held-out")
        encode_all(records, tokenizer, cfg.data.max_length, "held-out (all)", stats)
    else:
        log.info("no eval.source: the server evaluates nothing (clients' data never leaves them)")
    if cfg.federation.compute_slowdown != (1.0,) or not cfg.link.uniform():
        log.info(
            "link.* and federation.compute_slowdown pace simulated clients only; a networked "
            "client paces itself with its own --emulate-* and --compute-slowdown options"
        )
    log.info(
        "%s server: %d clients, %d rounds over blocks %s (%.1f MB per block)",
        cfg.federation.algorithm,
        cfg.federation.clients,
        cfg.federation.rounds,
        selected,
        block_nbytes(server.model, server.blocks[selected[0]]) / 1e6,
    )
    data_stats = {
        "eval_source": ev.source,
        "heldout_records": len(records),
        "heldout": stats.to_json(),
        "training_data": "stays with the clients",
    }
    return Federation(cfg, server, [], tokenizer, heldout, selected, records, [], data_stats)


def run(
    cfg: Config,
    *,
    on_barrier=None,
    on_phase=None,
    resume: bool = False,
    stop: threading.Event | None = None,
    serve: bool = False,
    on_listening=None,
    serve_with=None,
) -> dict:
    """Run the configured federation; returns the summary (also written to the run directory).

    ``on_barrier(client, t)`` hears each client's round end, ``on_phase(client, round, phase,
    started)`` each phase start and end (progress displays use both). With ``resume`` it continues
    the interrupted run in ``cfg.run.out`` from its checkpoint (``cfg`` may change only what
    ``RESUME_FREE`` lists, and federation.rounds; the changes are recorded in its config.toml).
    Setting ``stop`` (or Ctrl-C / SIGTERM) ends the run at the next barrier with its state saved.
    With ``serve`` the clients are remote ``parablock client`` processes that join over gRPC
    (``[server]`` settings); ``on_listening(port)`` then hears the port once it is open.
    ``serve_with(server, stop)``: remote clients reached another way (the Flower ServerApp's
    relay), returning each client's ``ClientLog``; its ``name`` is the summary's backend.
    """
    where = None
    serve = serve or serve_with is not None
    if serve and serve_with is None:
        from parablock.backends.remote import listener

        where = listener(cfg)  # bad certificates or clients file: fail before loading anything
    if resume and not traits(cfg.federation.algorithm).resumable:
        raise ConfigError(
            f"federation.algorithm={cfg.federation.algorithm} runs cannot be resumed (its "
            "clients pass barriers only at their own turns); start a new run"
        )
    out = run_dir(cfg, resume)
    with locked(out):
        check_run_dir(out, resume)  # now that no other run can change it
        saved = resumed_config(cfg, out) if resume else None
        if not resume:
            (out / "config.toml").write_text(cfg.to_toml())
        return _run(
            cfg,
            out,
            saved,
            on_barrier=on_barrier,
            on_phase=on_phase,
            stop=stop or threading.Event(),
            serve=serve,
            where=where if serve_with is None else serve_with,
            on_listening=on_listening,
        )


def _run(
    cfg: Config,
    out: Path,
    saved: Config | None,
    *,
    on_barrier,
    on_phase,
    stop: threading.Event,
    serve: bool,
    where,
    on_listening,
) -> dict:
    """``run`` once its directory is held: ``saved`` is the config of the run it resumes."""
    resume = saved is not None
    reset_peak()  # peak memory is this run's, also when compare runs several in one process
    torch.set_num_threads(os.cpu_count() or 1)
    fed = cfg.federation
    f = prepare(cfg, serve=serve)
    model, server, tokenizer = f.model, f.server, f.tokenizer
    plan, selected, specs = server.plan, f.selected, f.specs
    (out / "data.json").write_text(json.dumps(f.data_stats, indent=2) + "\n")
    if not serve:
        save_partition(out, f.partition_stats, cfg.data.partition, cfg.data.alpha)

    ev = cfg.eval
    evaluate = None
    if f.heldout:
        evaluate = Evaluator(
            tokenizer,
            f.heldout,
            f.heldout_records,
            EvalSettings(ev.batch_size, ev.accuracy_size, ev.max_new_tokens),
        )
    if evaluate is not None and ev.accuracy_size and not evaluate.accuracy_records:
        log.info("no held-out item has a checkable answer: accuracy is off for this data")

    store = CheckpointStore(out / "checkpoint") if cfg.run.checkpoint or resume else None
    point = None
    if resume:
        point = _resume_point(cfg, saved, store, selected, serve, out)
        server.restore(
            point.round, point.blocks, point.aggregate_s, point.participants, point.residuals
        )
        _restore_counts(server, point)
        specs = [replace(s, resume=point.clients[s.client_id]) for s in specs]
        started_at = point.started_at
        evals = [EvalResult.from_json(point.initial_eval)] if point.initial_eval else []
        done = point.round if serve else point.round + 1  # rounds finished, counted from 1
        log.info("resuming %s after round %d of %d", out, done, fed.rounds)
    else:
        evals = [evaluate(model, -1, 0.0)] if evaluate is not None else []
        if evals:
            log.info("base model: %s", _describe(evals[0]))
        started_at = time.time()
        if store is not None:
            store.save_run(started_at, evals[0].to_json() if evals else None)
    files = RunFiles(
        out,
        started_at,
        plan,
        fed.clients,
        lambda: server.stats.dropped,
        reports=(lambda: list(server.reports.values())) if serve else None,
        point=point,
        serve=serve,
        initial=None if resume or not evals else evals[0],
    )
    try:
        return _train(
            cfg,
            out,
            f,
            server,
            specs,
            store,
            point,
            files,
            evals,
            started_at,
            evaluate,
            on_barrier=on_barrier,
            on_phase=on_phase,
            stop=stop,
            serve=serve,
            where=where,
            on_listening=on_listening,
        )
    finally:
        files.close()


def _train(
    cfg: Config,
    out: Path,
    f: Federation,
    server: Server,
    specs: list[ClientSpec],
    store: CheckpointStore | None,
    point: ResumePoint | None,
    files: RunFiles,
    evals: list[EvalResult],
    started_at: float,
    evaluate: Evaluator | None,
    *,
    on_barrier,
    on_phase,
    stop: threading.Event,
    serve: bool,
    where,
    on_listening,
) -> dict:
    """The rounds on the backend, then evaluation, summary and the final model."""
    fed, ev = cfg.federation, cfg.eval
    model, tokenizer, plan, selected = f.model, f.tokenizer, server.plan, f.selected
    history = AggregateHistory(eval_rounds(fed.rounds, ev.every), started_at)
    server.aggregate_listeners.append(history.record)
    server.aggregate_listeners.append(files.aggregated)
    if store is not None:
        server.aggregate_listeners.append(_saving(store, server))
        specs = [replace(s, checkpoint_dir=str(store.dir)) for s in specs]
    lines = RoundLines(fed.rounds, point.round if point is not None and not serve else -1)

    def progress(client, t: int) -> None:
        if on_barrier is not None:
            on_barrier(client, t)
        files.barrier(client)
        if stop.is_set():
            server.stop()  # wake clients waiting on aggregates that will not come
        lines(client)

    start = time.time()
    with _stop_on_signals(stop, server, resumable=store is not None):
        if callable(where):
            logs = where(server, stop)
        elif where is not None:
            from parablock.backends.remote import run_remote

            logs = run_remote(server, where, stop=stop, on_listening=on_listening)
        else:
            logs = BACKENDS.get(cfg.run.backend)(
                specs,
                server,
                threads=cfg.run.threads,
                compute_slots=cfg.run.compute_slots,
                share_blocks=cfg.run.share_blocks,
                on_barrier=progress,
                on_phase=on_phase,
                stop=stop,
                address=cfg.run.ray_address,
            )
    server.aggregate_listeners.clear()
    if store is not None:
        store.flush()
    if stop.is_set():
        raise RunInterrupted(_stopped(out, serve, resumable=store is not None))
    records = sorted((r for lg in logs for r in lg.rounds), key=lambda r: (r.round, r.client))
    files.finish(logs, server)
    # wall time excludes any downtime between an interruption and the resume
    before = max((r.end for r in records if r.end < start), default=started_at) - started_at
    wall = before + time.time() - start
    if (
        serve and records
    ):  # from the first round's start: waiting for clients to join is not run time
        wall = max(r.end for r in records) - min(r.start for r in records)
    torch.set_num_threads(os.cpu_count() or 1)

    if evaluate is not None:
        evals += _evaluate_history(cfg, history, server, evaluate, point)
        log.info("after training: %s", _describe(evals[-1]))
    initial, final = (evals[0], evals[-1]) if evals else (None, None)

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
        initial_eval_loss=initial and initial.loss,
        final_eval_loss=final and final.loss,
        initial_eval_perplexity=initial and initial.to_json()["eval_perplexity"],
        final_eval_perplexity=final and final.to_json()["eval_perplexity"],
        initial_eval_accuracy=initial and initial.accuracy,
        final_eval_accuracy=final and final.accuracy,
        eval_loss_size=len(f.heldout),
        eval_accuracy_size=len(evaluate.accuracy_records) if evaluate else 0,
        updates_accepted=server.stats.accepted,
        updates_rejected=len(server.stats.rejected),
        clients_dropped=server.stats.dropped,
        blocks=selected,
        plan=plan,
        lr=client_lr(cfg),
        run_dir=str(out),
        backend=getattr(where, "name", "remote") if serve else cfg.run.backend,
        duplex=fed.duplex,  # parablock only: fedbcd has nothing to overlap
        local_steps_max=fed.local_steps_max,
        final_model_fingerprint=model_fingerprint(model),
        trained_blocks_fingerprint=model_fingerprint(
            model, {n for b in selected for n in server.blocks[b].param_names}
        ),
        model_note="embedded SmolLM2-135M-Instruct is a dequantised Q4_1 (4-bit) GGUF copy"
        if cfg.model.name_or_path == "smollm2-135m-instruct"
        else "",
        **_compute_summary(cfg, serve),
    )
    for e in evals[1:]:
        files.add(e.to_json())
    files.close()
    _write(out, evals, summary)
    lora = settings_for(cfg)
    if lora is None:
        model.save_pretrained(out / "model")
    else:
        export(model, lora, cfg.model.name_or_path, out / "model", out / "model-adapter")
    tokenizer.save_pretrained(out / "model")
    log.info(
        "wall time %.1fs, mean round %.2fs; run directory: %s", wall, summary["mean_round_s"], out
    )
    return summary


def _resume_point(
    cfg: Config,
    saved: Config,
    store: CheckpointStore,
    selected: list[int],
    serve: bool,
    out: Path,
) -> ResumePoint:
    """Load the checkpoint, check a changed federation.rounds against it, record the accepted
    config changes. The server's files are read with the plan they were written under."""
    fed = cfg.federation
    if serve:
        old_plan = make_plan(fed.schedule, selected, saved.federation.rounds, cfg.run.seed)
        point = store.load_server(old_plan)
        done = point.round
    else:
        point = store.load(fed.clients, selected)
        done = point.round + 1
    check_rounds(saved, cfg, selected, done, out)
    record_config(saved, cfg, out)
    return point


def _restore_counts(server: Server, point: ResumePoint) -> None:
    """The update totals of the rounds before the resume, so the summary covers the whole run
    (the server counts only what it sees). A checkpoint from before they were recorded: the
    participants of the aggregates it still holds, the best count left."""
    accepted = point.accepted
    if accepted is None:
        accepted = sum(len(p) for p in point.participants.values())
    server.stats.accepted = accepted
    server.stats.rejected = Rejections(point.rejected or 0)


def _saving(store: CheckpointStore, server: Server):
    """The listener that checkpoints every new global block value with the update totals.
    Accepted updates are counted from the aggregates' participants (each accepted update is in
    exactly one aggregate), which every backend reports here; the Ray backend's server runs in
    an actor, so ``server.stats`` here lags until the run ends (rejections made there are then
    missing from the checkpoint's count)."""
    accepted = [server.stats.accepted]

    def save(r: int, b: int, value: dict, secs: float, who: list[int], residual: dict) -> None:
        accepted[0] += len(who)
        updates = (accepted[0], len(server.stats.rejected))
        store.save_block(b, r, value, secs, who, updates, residual)

    return save


class RoundLines:
    """One log line per round, from whichever client passes that round's barrier first: any
    client can be dropped (a Ray actor that died), so no one client may be the one that logs."""

    def __init__(self, rounds: int, logged: int = -1) -> None:
        self.rounds = rounds
        self.logged = logged  # the highest round logged (the drain is round ``rounds``)
        self._lock = threading.Lock()

    def __call__(self, client) -> None:
        r = client.log.rounds[-1]
        with self._lock:
            if r.round <= self.logged:
                return
            self.logged = r.round
        log.info("%s", describe(r, self.rounds))


def _stopped(out: Path, serve: bool, resumable: bool) -> str:
    if not resumable:
        return (
            "stopped; this run cannot be resumed: it ran with run.checkpoint=false, so no "
            "checkpoint was saved"
        )
    if serve:
        return f"stopped; continue with: parablock server --resume {out}"
    return f"stopped; resume with: parablock run --resume {out}"


@contextmanager
def _stop_on_signals(stop: threading.Event, server: Server, resumable: bool = True):
    """Ctrl-C / SIGTERM: finish cleanly at the next barrier instead of dying mid-round."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    after = "the run can be resumed" if resumable else "run.checkpoint=false: it cannot be resumed"

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt  # a second Ctrl-C: leave now (the checkpoint still holds)
        log.warning("%s: stopping at the next barrier; %s", signal.Signals(signum).name, after)
        stop.set()
        server.stop()

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def _describe(r: EvalResult) -> str:
    acc = "" if r.accuracy is None else f", accuracy {r.accuracy:.3f} on {len(r.items)} items"
    return f"held-out loss {r.loss:.4f}{acc}"


def _evaluate_history(
    cfg: Config,
    history: AggregateHistory,
    server: Server,
    evaluate: Evaluator,
    point: ResumePoint | None = None,
) -> list[EvalResult]:
    """Evaluate the global model after each evaluation round, replaying the recorded aggregates.

    The last one is the server's final model itself; earlier ones are rebuilt on a fresh copy of
    the initial model, so the timed rounds never paid for them. After a resume the replay starts
    from the checkpoint's global model, so rounds before it cannot be evaluated any more.
    """
    last = cfg.federation.rounds - 1
    results = []
    if len(history.eval_at) > 1:
        replica = load_model(cfg.model.name_or_path)
        blocks_for(replica, cfg.model.extra_blocks, settings_for(cfg), cfg.run.seed)
        first = -1
        if point is not None:
            for b, (_, tensors) in point.blocks.items():
                set_block(replica, server.blocks[b], tensors)
            first = point.round - 1
        for t, time_s in history.replay(replica, server.blocks):
            if t == last:
                break
            if t < first:
                log.info("round %d was aggregated before the interruption: not evaluated", t)
                continue
            results.append(evaluate(replica, t, time_s))
            log.info("after round %d: %s", t, _describe(results[-1]))
        del replica
    results.append(evaluate(server.model, last, history.times.get(last, float("nan"))))
    return results


def _write(out: Path, evals: list[EvalResult], summary: dict) -> None:
    """What only a finished run has: every evaluation's answers, then the summary (last: its
    presence marks the run finished)."""
    with open(out / "eval_items.jsonl", "w") as f:
        for e in evals:
            for item in e.items:
                f.write(json.dumps(item) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
