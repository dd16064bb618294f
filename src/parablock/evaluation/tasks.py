"""Standard evaluation tasks for the lm-evaluation-harness, written as local data and task files.

A task spec names a kind and its argument, ``KIND[:ARG]``::

    gsm8k:PATH                      GSM8K test items from a local JSONL file (question, answer)
    reasoning_gym:TASK[?k=v&k=v]    a reasoning-gym task, generated offline (as in data.source)
    syllogism_choice                reasoning-gym syllogisms as a Yes/No multiple choice, scored
                                    by log-likelihood (no generation)

``prepare`` writes each task's first ``size`` items as JSONL into a work directory, and beside it
the task's YAML (the harness's own format, from the templates in ``lm_eval_tasks/``) pointing at
that file, so the harness reads only local files and nothing is downloaded. Kinds live in a
registry that fails fast on an unknown name; this module never imports the harness.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from parablock.data.examples import DataError
from parablock.data.sources import _gym_options, gym_tasks, read_file, reasoning_gym_records
from parablock.registry import Registry, UnknownNameError

TEMPLATES = Path(__file__).with_name("lm_eval_tasks")
# Generated tasks draw from their own seed, never the seeds a run trains or holds out with.
_TASK_SEED = 2_000_029


@dataclass(frozen=True)
class TaskKind:
    """How one kind of task is built: its YAML template, the metric its score is read from,
    whether it needs an argument, and ``rows(arg, size, seed)`` -> the JSONL rows."""

    template: str
    metric: str
    rows: Callable[[str, int, int], list[dict]]
    needs_arg: bool
    usage: str


TASK_KINDS: Registry[TaskKind] = Registry("evaluation task")


@dataclass(frozen=True)
class TaskSpec:
    """One parsed task spec: ``key`` names it in results (``gsm8k``, ``reasoning_gym:TASK``,
    ``syllogism_choice``), ``name`` is the harness's task name."""

    spec: str
    kind: str
    arg: str

    @property
    def key(self) -> str:
        return (
            f"{self.kind}:{self.arg.partition('?')[0]}"
            if self.kind == "reasoning_gym"
            else self.kind
        )

    @property
    def name(self) -> str:
        base = self.key.replace(":", "_")
        return "parablock_" + "".join(c if c.isalnum() else "_" for c in base)


@dataclass(frozen=True)
class PreparedTask:
    spec: TaskSpec
    data: Path
    items: int
    metric: str


def _gsm8k_rows(arg: str, size: int, seed: int) -> list[dict]:
    path = Path(arg).expanduser()
    if path.suffix not in (".json", ".jsonl"):
        raise DataError(f"evaluation task gsm8k:{arg}: the file must end in .json or .jsonl")
    records = read_file(path, "gsm8k")[:size]  # the file's first items: the same every time
    return [{"question": r.prompt, "answer": r.response} for r in records]


def _gym_rows(arg: str, size: int, seed: int) -> list[dict]:
    task, _, opts = arg.partition("?")
    records = reasoning_gym_records(task, size, seed, _gym_options(opts, f"reasoning_gym:{arg}"))
    return [{"question": r.prompt, "answer": r.answer} for r in records]


def _syllogism_rows(arg: str, size: int, seed: int) -> list[dict]:
    records = reasoning_gym_records("syllogism", size, seed)
    # the choices are ["Yes", "No"]: the label is the right one's index
    return [{"question": r.prompt, "label": 0 if r.answer == "Yes" else 1} for r in records]


TASK_KINDS.add(
    "gsm8k",
    TaskKind("gsm8k.yaml", "exact_match,flexible-extract", _gsm8k_rows, True, "gsm8k:PATH.jsonl"),
)
TASK_KINDS.add(
    "reasoning_gym",
    TaskKind("reasoning_gym.yaml", "exact_match,strip", _gym_rows, True, "reasoning_gym:TASK"),
)
TASK_KINDS.add(
    "syllogism_choice",
    TaskKind("syllogism_choice.yaml", "acc,none", _syllogism_rows, False, "syllogism_choice"),
)


def parse_task(text: str) -> TaskSpec:
    """One spec, checked without generating or reading anything but the reasoning-gym names."""
    kind, sep, arg = text.strip().partition(":")
    try:
        entry = TASK_KINDS.get(kind)
    except UnknownNameError:
        usages = ", ".join(TASK_KINDS.get(k).usage for k in TASK_KINDS.names())
        raise UnknownNameError(
            f"evaluation task {text!r}: unknown kind {kind!r}; valid: {usages}"
        ) from None
    if entry.needs_arg and not arg:
        raise DataError(f"evaluation task {text!r} needs an argument: {entry.usage}")
    if not entry.needs_arg and sep:
        raise DataError(f"evaluation task {text!r} takes no argument: {entry.usage}")
    if kind == "gsm8k" and not Path(arg).expanduser().is_file():
        raise DataError(f"evaluation task {text!r}: no such file {arg}")
    if kind == "reasoning_gym" and arg.partition("?")[0] not in gym_tasks():
        raise UnknownNameError(
            f"evaluation task {text!r}: unknown reasoning-gym task "
            f"{arg.partition('?')[0]!r}; valid: {', '.join(gym_tasks())}"
        )
    return TaskSpec(text.strip(), kind, arg)


def parse_tasks(specs: Sequence[str]) -> list[TaskSpec]:
    """Every spec parsed; two specs with one result key are refused."""
    parsed = [parse_task(s) for s in specs if s.strip()]
    keys = [t.key for t in parsed]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise DataError(f"evaluation tasks name {', '.join(twice)} more than once")
    return parsed


def split_tasks(text: str) -> list[str]:
    """A comma list of specs, as ``--tasks`` and ``--set eval.tasks=`` give it."""
    return [s.strip() for s in text.split(",") if s.strip()]


def prepare(
    tasks: Sequence[TaskSpec], size: int, seed: int, workdir: Path, max_new_tokens: int
) -> list[PreparedTask]:
    """Each task's data (``size`` items) and YAML in ``workdir``, ready for a TaskManager whose
    include path is ``workdir``."""
    out = []
    for k, task in enumerate(tasks):
        entry = TASK_KINDS.get(task.kind)
        rows = entry.rows(task.arg, size, seed + _TASK_SEED + k)
        if not rows:
            raise DataError(f"evaluation task {task.spec!r} has no items")
        data = workdir / f"{task.name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        yaml = (TEMPLATES / entry.template).read_text()
        for field, value in (
            ("TASK", task.name),
            ("DATA", json.dumps(str(data))),
            ("CACHE", json.dumps(str(workdir / "cache"))),
            ("MAX_NEW_TOKENS", str(max_new_tokens)),
        ):
            yaml = yaml.replace("{{@" + field + "}}", value)
        (workdir / f"{task.name}.yaml").write_text(yaml)
        out.append(PreparedTask(task, data, len(rows), entry.metric))
    return out
