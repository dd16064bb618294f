"""The rounds of a run on its backend, then the evaluation, the summary and the final model."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

from parablock.backends import BACKENDS
from parablock.backends.assembly import Placement
from parablock.config import Config
from parablock.core.checkpoint import CheckpointStore, ResumePoint
from parablock.core.metrics import describe, summarize
from parablock.core.server import Server
from parablock.errors import ConfigError, RunDirError, RunInterrupted  # noqa: F401
from parablock.evaluation.evaluate import (
    AggregateHistory,
    EvalResult,
    Evaluator,
    eval_rounds,
)
from parablock.evaluation.interval import accuracy_text
from parablock.model.blocks import set_block
from parablock.model.forward import resolve_precision
from parablock.model.load import load_model, model_fingerprint
from parablock.model.lora import blocks_for, export
from parablock.run.build import Federation
from parablock.run.memory import peak_rss_mb
from parablock.run.runfiles import RunFiles
from parablock.run.settings import client_lr, lora_settings
from parablock.run.tensorboard import log_dir

log = logging.getLogger(__name__)


def compute_summary(cfg: Config, serve: bool) -> dict:
    """Which precision the clients trained in, and this process's peak memory (with the local
    backend: the server and every client, hence also per client)."""
    device = torch.device(cfg.client_devices()[0])  # the first client's: a mix is unusual
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


def train(
    cfg: Config,
    out: Path,
    f: Federation,
    server: Server,
    placements: list[Placement],
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
        server.aggregate_listeners.append(saving(store, server))
        placements = [replace(p, checkpoint_dir=str(store.dir)) for p in placements]
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
                placements,
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
        evals += evaluate_history(cfg, history, server, evaluate, point)
        log.info("after training: %s", describe_eval(evals[-1]))
    initial, final = (evals[0], evals[-1]) if evals else (None, None)
    final_lm = standard_eval(cfg, model, tokenizer, "after training")

    agg = server.stats.aggregate_s
    summary = summarize(
        records,
        algorithm=fed.algorithm,
        clients=fed.clients,
        rounds=fed.rounds,
        wall_time_s=wall,
        aggregate_s=sum(agg.values()) / len(agg) if agg else 0.0,
    )
    summary.update(privacy_summary(cfg, server, records))
    summary.update(
        initial_eval_loss=initial and initial.loss,
        final_eval_loss=final and final.loss,
        initial_eval_perplexity=initial and initial.to_json()["eval_perplexity"],
        final_eval_perplexity=final and final.to_json()["eval_perplexity"],
        initial_eval_accuracy=initial and initial.accuracy,
        final_eval_accuracy=final and final.accuracy,
        initial_eval_accuracy_ci=initial and _interval(initial),
        final_eval_accuracy_ci=final and _interval(final),
        eval_loss_size=len(f.heldout),
        eval_accuracy_size=len(evaluate.accuracy_records) if evaluate else 0,
        initial_lm_eval=read_lm_eval(out).get("initial"),
        final_lm_eval=final_lm,
        updates_accepted=server.stats.accepted,
        updates_rejected=len(server.stats.rejected),
        clients_dropped=server.stats.dropped,
        blocks=selected,
        plan=plan,
        lr=client_lr(cfg),
        run_dir=str(out),
        tensorboard_dir=str(tb) if (tb := log_dir(cfg, out)) is not None else None,
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
        **compute_summary(cfg, serve),
    )
    for e in evals[1:]:
        files.add(e.to_json())
    files.close()
    write_final(out, evals, summary)
    lora = lora_settings(cfg)
    if lora is None:
        model.save_pretrained(out / "model")
    else:
        export(model, lora, cfg.model.name_or_path, out / "model", out / "model-adapter")
    tokenizer.save_pretrained(out / "model")
    log.info(
        "wall time %.1fs, mean round %.2fs; run directory: %s", wall, summary["mean_round_s"], out
    )
    return summary


def saving(store: CheckpointStore, server: Server):
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


def describe_eval(r: EvalResult) -> str:
    acc = ""
    if r.accuracy is not None:
        acc = f", accuracy {accuracy_text(r.accuracy, r.accuracy_ci)} on {len(r.items)} items"
    return f"held-out loss {r.loss:.4f}{acc}"


def _interval(r: EvalResult) -> list[float] | None:
    return None if r.accuracy_ci is None else list(r.accuracy_ci)


def evaluate_history(
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
        blocks_for(replica, cfg.model.extra_blocks, lora_settings(cfg), cfg.run.seed)
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
            log.info("after round %d: %s", t, describe_eval(results[-1]))
        del replica
    results.append(evaluate(server.model, last, history.times.get(last, float("nan"))))
    return results


LM_EVAL_FILE = "lm_eval.json"  # eval.tasks' results, the base model's from the run's start


def standard_eval(cfg: Config, model, tokenizer, when: str, out: Path | None = None) -> dict | None:
    """eval.tasks on the global model through the lm-evaluation-harness (None without tasks);
    given ``out``, also recorded there as the base model's, so that a resume still has them."""
    ev = cfg.eval
    if not ev.tasks:
        return None
    from parablock.evaluation.harness import HarnessSettings, describe, run_tasks

    settings = HarnessSettings(
        size=ev.tasks_size,
        batch_size=ev.generate_batch_size,
        max_new_tokens=ev.max_new_tokens,
        seed=cfg.run.seed,
    )
    results = run_tasks(model, tokenizer, ev.tasks, settings)
    log.info("%s: %s", when, describe(results))
    if out is not None:
        (out / LM_EVAL_FILE).write_text(json.dumps({"initial": results}, indent=2) + "\n")
    return results


def read_lm_eval(out: Path) -> dict:
    path = out / LM_EVAL_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def write_final(out: Path, evals: list[EvalResult], summary: dict) -> None:
    """What only a finished run has: every evaluation's answers, then the summary (last: its
    presence marks the run finished)."""
    with open(out / "eval_items.jsonl", "w") as f:
        for e in evals:
            for item in e.items:
                f.write(json.dumps(item) + "\n")
    if summary.get("final_lm_eval") is not None:
        lm = {"initial": summary["initial_lm_eval"], "final": summary["final_lm_eval"]}
        (out / LM_EVAL_FILE).write_text(json.dumps(lm, indent=2) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


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


def privacy_summary(cfg: Config, server: Server, records: list) -> dict:
    """What the run's privacy guarantee is: the settings, and epsilon at delta (record mode:
    each site's own, and the largest; client mode: the server's, one release per round)."""
    p = cfg.privacy
    out: dict = {"privacy_mode": p.mode}
    if p.mode == "none":
        return out
    out.update(
        privacy_delta=p.delta,
        privacy_clip_norm=p.clip_norm,
        privacy_noise_multiplier=p.noise_multiplier,
        privacy_accountant=p.accountant,
        privacy_noise_at=p.noise_at if p.mode == "client" else None,
        privacy_max_epsilon=p.max_epsilon or None,
    )
    if p.mode == "client":
        eps = server.stats.epsilon
        out["privacy_epsilon"] = eps[max(eps)] if eps else 0.0
        return out
    by_site: dict[int, float] = {}
    for r in records:  # in round order: each site's last epsilon
        if r.epsilon is not None:
            by_site[r.client] = r.epsilon
    out["privacy_epsilon_by_client"] = {str(c): e for c, e in sorted(by_site.items())}
    out["privacy_epsilon"] = max(by_site.values(), default=0.0)
    return out
