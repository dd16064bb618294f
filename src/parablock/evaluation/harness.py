"""Standard evaluation through EleutherAI's lm-evaluation-harness, on a model already in memory.

``run_tasks`` writes the tasks' data and YAML into a temporary directory (``tasks.py``), points a
``TaskManager`` at it (the harness's own tasks are not indexed: nothing of theirs is read or
downloaded), wraps the model in the harness's ``HFLM`` and calls ``simple_evaluate``. The Hugging
Face hub and datasets are set offline first. The result, per task key: the headline metric and
its standard error, every metric the harness reported, and the number of items.

The model is put in eval mode with its KV cache on for the call and given back as it was, so a
run can evaluate its global model before and after training.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from parablock.errors import ConfigError
from parablock.evaluation.tasks import PreparedTask, parse_tasks, prepare

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HarnessSettings:
    size: int = 64  # items per task
    batch_size: int = 8
    max_new_tokens: int = 256
    seed: int = 0
    chat_template: bool = True
    threads: int = 0  # torch threads; 0 = leave as is


def _offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"


def _harness():
    """The harness's entry points; a one-line error where the optional package is absent."""
    _offline()  # before datasets is first imported: it reads these once
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ConfigError(
            f"standard evaluation needs the lm-evaluation-harness ({e}); install it with "
            "scripts/install.sh (or pip install -e '.[lmeval]')"
        ) from None
    import datasets
    import lm_eval.evaluator

    # it records `git describe` of the working directory, which prints "fatal: not a git
    # repository" outside one and says nothing about the model
    lm_eval.evaluator.get_git_commit_hash = lambda: None

    datasets.disable_progress_bars()
    for name in ("lm_eval", "lm-eval"):  # its INFO lines would drown a run's own
        logging.getLogger(name).setLevel(logging.WARNING)
    return lm_eval, HFLM, TaskManager


@contextmanager
def _eval_mode(model: torch.nn.Module):
    training, use_cache = model.training, getattr(model.config, "use_cache", None)
    model.eval()
    model.config.use_cache = True  # load_model turns it off for training
    try:
        yield
    finally:
        model.train(training)
        model.config.use_cache = use_cache


def run_tasks(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    settings: HarnessSettings = HarnessSettings(),
) -> dict[str, dict]:
    """Each task spec's result: ``{key: {"task", "metric", "score", "stderr", "metrics",
    "items", "seconds"}}`` (``score`` is the headline metric, e.g. GSM8K's flexible-extract
    exact match)."""
    specs = parse_tasks(tasks)
    if not specs:
        return {}
    lm_eval, HFLM, TaskManager = _harness()
    if settings.threads > 0:
        torch.set_num_threads(settings.threads)
    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="parablock-lmeval-") as tmp:
        work = Path(tmp)
        prepared = prepare(specs, settings.size, settings.seed, work, settings.max_new_tokens)
        manager = TaskManager(include_path=str(work), include_defaults=False)
        with _eval_mode(model):
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=settings.batch_size)
            for task in prepared:  # one call per task, so that each is timed
                started = time.monotonic()
                results = lm_eval.simple_evaluate(
                    model=lm,
                    tasks=[task.spec.name],
                    task_manager=manager,
                    apply_chat_template=settings.chat_template,
                    log_samples=False,
                    random_seed=settings.seed,
                    numpy_random_seed=settings.seed,
                    torch_random_seed=settings.seed,
                    fewshot_random_seed=settings.seed,
                    bootstrap_iters=1000,
                )
                out[task.spec.key] = _result(task, results, time.monotonic() - started)
    return out


def _number(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _result(task: PreparedTask, results: dict, seconds: float) -> dict:
    row = results["results"][task.spec.name]
    metrics = {k: _number(v) for k, v in row.items() if k not in ("alias", "name", "sample_len")}
    stderr_key = task.metric.replace(",", "_stderr,", 1)
    return {
        "task": task.spec.spec,
        "metric": task.metric,
        "score": metrics.get(task.metric),
        "stderr": metrics.get(stderr_key),
        "metrics": metrics,
        "items": task.items,
        "seconds": round(seconds, 2),
    }


def table(results: dict[str, dict]) -> str:
    """A markdown table: task, metric, score, standard error, items, seconds."""
    lines = ["| task | metric | score | stderr | items | seconds |", "|---|---|---|---|---|---|"]
    for key, r in results.items():
        score = "-" if r["score"] is None else f"{r['score']:.3f}"
        err = "-" if r.get("stderr") is None else f"{r['stderr']:.3f}"
        lines.append(
            f"| {key} | {r['metric']} | {score} | {err} | {r['items']} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def describe(results: dict[str, dict]) -> str:
    """One line: each task's headline score with its standard error."""
    parts = []
    for key, r in results.items():
        score = "-" if r["score"] is None else f"{r['score']:.3f}"
        err = f"±{r['stderr']:.3f}" if r.get("stderr") is not None else ""
        parts.append(f"{key} {r['metric'].split(',')[0]} {score}{err} (n={r['items']})")
    return ", ".join(parts)
