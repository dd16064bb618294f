"""One federated run from a config: data, server, clients on a backend, evaluation, run directory.

The run directory holds ``config.toml`` (resolved), ``metrics.jsonl`` (per client per round, per
round, eval), ``timeline.jsonl`` (compute/upload/wait/download/idle spans, seconds from the start),
``summary.json``, ``data.json`` (sources, examples kept/truncated/dropped), ``partition.json`` and
``partition.png`` (per client: examples, tokens, examples per label), ``eval_items.jsonl`` (what the
model answered on each accuracy item at each evaluation), ``model/`` (the final global model and
tokenizer, ``save_pretrained`` format; with a LoRA adapter the merged model, and the adapter alone
in ``model-adapter/``), ``checkpoint/``, ``lock``, and with ``run.tensorboard`` ``tb/`` (TensorBoard
event files, ``run/tensorboard.py``).

A run holds ``lock`` (flock) from start to end, so a second run into the same directory fails at
once instead of overwriting it. ``metrics.jsonl`` and ``timeline.jsonl`` grow round by round
(``RunFiles``), so a hard kill keeps every finished round and a running federation can be watched;
a resume appends to them.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch

from parablock.config import Config
from parablock.core.algorithms import ALGORITHMS
from parablock.core.checkpoint import CheckpointStore, ResumePoint
from parablock.core.privacy import Ledger
from parablock.core.schedule import make_plan
from parablock.core.server import Rejections, Server
from parablock.data.partition import save as save_partition
from parablock.errors import ConfigError, RunDirError, RunInterrupted  # noqa: F401
from parablock.evaluation.evaluate import (
    EvalResult,
    EvalSettings,
    Evaluator,
)
from parablock.run.build import prepare
from parablock.run.loop import describe_eval, standard_eval, train
from parablock.run.memory import reset_peak
from parablock.run.rundir import (
    check_rounds,
    check_run_dir,
    locked,
    record_config,
    resumed_config,
    run_dir,
)
from parablock.run.runfiles import RunFiles
from parablock.run.tensorboard import TensorBoardLog, check_available, log_dir

log = logging.getLogger(__name__)


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
    check_available(cfg)  # run.tensorboard without TensorBoard: fail before loading anything
    if serve and serve_with is None:
        from parablock.backends.remote import listener

        where = listener(cfg)  # bad certificates or clients file: fail before loading anything
    if resume and not ALGORITHMS.get(cfg.federation.algorithm).resumable:
        raise ConfigError(
            f"federation.algorithm={cfg.federation.algorithm} runs cannot be resumed (its "
            "clients pass barriers only at their own turns); start a new run"
        )
    if resume and cfg.privacy.secure_aggregation:
        raise ConfigError(
            "privacy.secure_aggregation=true runs cannot be resumed: their pending updates are "
            "masked with keys agreed once per run, which a restart does not keep; start a new run"
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
    asked = cfg  # what the user asked for: a resume is checked against it
    f = prepare(cfg, serve=serve)
    cfg = f.cfg  # with [privacy] resolved: the noise multiplier, the rounds the budget allows
    fed = cfg.federation
    model, server, tokenizer = f.model, f.server, f.tokenizer
    plan, selected, placements = server.plan, f.selected, f.placements
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
            EvalSettings(
                ev.batch_size, ev.accuracy_size, ev.max_new_tokens, ev.generate_batch_size
            ),
        )
    if evaluate is not None and ev.accuracy_size and not evaluate.accuracy_records:
        log.info("no held-out item has a checkable answer: accuracy is off for this data")

    store = CheckpointStore(out / "checkpoint") if cfg.run.checkpoint or resume else None
    point = None
    if resume:
        point = _resume_point(asked, saved, store, selected, serve, out)
        server.restore(
            point.round, point.blocks, point.aggregate_s, point.participants, point.residuals
        )
        _restore_counts(server, point)
        placements = [replace(p, resume=point.clients[p.client_id]) for p in placements]
        started_at = point.started_at
        evals = [EvalResult.from_json(point.initial_eval)] if point.initial_eval else []
        done = point.round if serve else point.round + 1  # rounds finished, counted from 1
        log.info("resuming %s after round %d of %d", out, done, fed.rounds)
    else:
        evals = [evaluate(model, -1, 0.0)] if evaluate is not None else []
        if evals:
            log.info("base model: %s", describe_eval(evals[0]))
        standard_eval(cfg, model, tokenizer, "base model", out)
        started_at = time.time()
        if store is not None:
            store.save_run(started_at, evals[0].to_json() if evals else None)
    board = None
    if (where_tb := log_dir(cfg, out)) is not None:
        # a resume runs its first round again: the steps from there on are replaced
        purge = None if point is None else (point.round if serve else point.round + 1) + 1
        board = TensorBoardLog(where_tb, started_at, purge)
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
        epsilon=_client_epsilon(cfg),
        counts=lambda t: {
            "updates_rejected": server.stats.rejected.by_round.get(t, 0),
            "clients_dropped": sorted(set(server.stats.dropped)),
        },
        observer=board,
    )
    try:
        return train(
            cfg,
            out,
            f,
            server,
            placements,
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


def _client_epsilon(cfg: Config):
    """privacy.mode=client: epsilon after round t, as the server's ledger counts it (one release
    per round, whatever backend hosts the server), for the round rows of metrics.jsonl."""
    p = cfg.privacy
    if p.mode != "client":
        return None
    return lambda t: Ledger(p.accountant, [(p.noise_multiplier, 1.0, t + 1)]).epsilon(p.delta)
