"""Where records come from: reasoning-gym tasks and JSON/JSONL files, mixed with weights.

``data.source`` (and ``eval.source``) is a comma-separated list of sources, each optionally
weighted with ``@W``::

    reasoning_gym:gsm_symbolic
    reasoning_gym:basic_arithmetic?max_terms=2&max_digits=2     (task options after '?')
    alpaca:data/alpaca.json   gsm8k:train.jsonl   chat:dialogs.jsonl
    file:any.jsonl   or a bare path ending .json/.jsonl          (format detected per record)
    reasoning_gym:basic_arithmetic@1,alpaca:data/alpaca.json@3  (a 1:3 mix)

File formats: Alpaca ``{instruction, input, output}`` (prompt = instruction, plus a blank line
and the input when it is non-empty), GSM8K ``{question, answer}`` (answer ending ``#### N``), and
chat ``{messages: [{role, content}, ...]}`` (the last assistant message is the response; the
messages before it are the prompt). A ``.jsonl`` file holds one object per line; a ``.json``
file a list of objects.

Train and held-out records never share a question: reasoning-gym draws them from different seeds
and filters overlaps; a file is shuffled once (seeded), the held-out items are taken first and
training draws from the rest. Then any training record whose question is also held out (a file
that repeats a record, a mix of overlapping sources, an explicit ``eval.source``) is removed and
counted (``heldout_duplicates`` in data.json).

``client_records`` is the one way to get a single client's records from its own source
(``data.partition=per_client``); the simulator and a networked client both call it, so the same
arguments give the same records, in the same order, on any machine.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from parablock.data.examples import DataError, DataStats, Record
from parablock.data.textfile import read_utf8
from parablock.registry import Registry, UnknownNameError

log = logging.getLogger(__name__)

_HELDOUT_SEED = 1_000_003  # reasoning-gym held-out items come from a different seed
FileFormat = Callable[[dict, str], Record]
FORMATS: Registry[FileFormat] = Registry("file format")
FORMAT_HELP = (
    "alpaca (instruction, input, output), gsm8k (question, answer), "
    "chat (messages: [{role, content}, ...])"
)


def _field(obj: dict, name: str, fmt: str, where: str) -> str:
    if name not in obj:
        raise DataError(
            f"{where}: missing field {name!r} for the {fmt} format; accepted formats: {FORMAT_HELP}"
        )
    value = obj[name]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    return value


def gsm8k_reference(answer: str) -> str:
    """The final answer of a GSM8K solution: the text after '####' (or '' if it has none)."""
    return answer.rsplit("####", 1)[1].strip() if "####" in answer else ""


@FORMATS.register("alpaca")
def alpaca(obj: dict, where: str) -> Record:
    instruction = _field(obj, "instruction", "alpaca", where)
    output = _field(obj, "output", "alpaca", where)
    extra = obj.get("input", "")
    if not isinstance(extra, str):
        raise DataError(f"{where}: field 'input' must be a string, got {type(extra).__name__}")
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return Record(prompt, output)


@FORMATS.register("gsm8k")
def gsm8k(obj: dict, where: str) -> Record:
    question = _field(obj, "question", "gsm8k", where)
    answer = _field(obj, "answer", "gsm8k", where)
    ref = gsm8k_reference(answer)
    return Record(question, answer, answer=ref, scorer="number" if ref else "")


@FORMATS.register("chat")
def chat(obj: dict, where: str) -> Record:
    msgs = obj.get("messages")
    if not isinstance(msgs, list):
        raise DataError(
            f"{where}: missing field 'messages' (a list of {{role, content}}) for the chat "
            f"format; accepted formats: {FORMAT_HELP}"
        )
    turns = []
    for k, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise DataError(f"{where}: messages[{k}] needs a string 'role'")
        if not isinstance(m.get("content"), str):
            raise DataError(f"{where}: messages[{k}] needs a string 'content'")
        turns.append((m["role"], m["content"]))
    last = max((k for k, (r, _) in enumerate(turns) if r == "assistant"), default=-1)
    if last < 0:
        raise DataError(f"{where}: a chat record needs an assistant message (the response)")
    before = turns[:last]
    if before and before[-1][0] == "user":
        return Record(before[-1][1], turns[last][1], context=tuple(before[:-1]))
    return Record("", turns[last][1], context=tuple(before))


def detect_format(obj: dict, where: str) -> str:
    """The format a record is in, judged by its fields."""
    if "messages" in obj:
        return "chat"
    if "instruction" in obj or "output" in obj:
        return "alpaca"
    if "question" in obj or "answer" in obj:
        return "gsm8k"
    raise DataError(
        f"{where}: the record has none of the accepted formats' fields "
        f"(it has {', '.join(map(repr, obj)) or 'none'}); accepted formats: {FORMAT_HELP}"
    )


def read_text(path: Path) -> str:
    """A data file's text, or a one-line DataError naming it (and a bad byte's line/offset)."""
    return read_utf8(path, "data file", DataError)


def read_objects(path: Path) -> list[tuple[dict, str]]:
    """The JSON objects of a .json or .jsonl file, each with 'file:line' for error messages."""
    text = read_text(path)
    out: list[tuple[dict, str]] = []
    if path.suffix == ".jsonl":
        # split on '\n' only: str.splitlines would also cut at U+2028 and the like, which a
        # JSON string may hold unescaped
        for n, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: malformed JSON line ({e.msg})") from None
            except RecursionError:
                raise DataError(f"{path}:{n}: JSON nested too deeply") from None
            out.append((obj, f"{path}:{n}"))
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        except RecursionError:
            raise DataError(f"{path}: JSON nested too deeply") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise DataError(f"{path}: a .json data file must hold a list of records")
        out = [(obj, f"{path} record {k}") for k, obj in enumerate(data)]
    for obj, where in out:
        if not isinstance(obj, dict):
            raise DataError(f"{where}: a record must be a JSON object, got {type(obj).__name__}")
    if not out:
        raise DataError(f"data file {path} holds no records")
    return out


def read_file(path: Path, fmt: str = "", label_field: str = "") -> list[Record]:
    """Every record of a data file; ``fmt`` '' detects the format record by record."""
    records = []
    for obj, where in read_objects(path):
        parse = FORMATS.get(fmt or detect_format(obj, where))
        rec = parse(obj, where)
        label = path.stem
        if label_field:
            if label_field not in obj:
                raise DataError(f"{where}: missing field {label_field!r} (data.label_field)")
            label = str(obj[label_field])
        records.append(_with(rec, label=label))
    return records


def _with(rec: Record, **changes: Any) -> Record:
    from dataclasses import replace

    return replace(rec, **changes)


# -- sources ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileSource:
    path: Path
    fmt: str
    label_field: str = ""

    @property
    def name(self) -> str:
        return str(self.path)

    def draw(self, n_train: int, n_heldout: int, seed: int) -> tuple[list[Record], list[Record]]:
        records = read_file(self.path, self.fmt, self.label_field)
        order = np.random.default_rng([seed, 13]).permutation(len(records))
        heldout = [records[i] for i in order[:n_heldout]]
        rest = order[n_heldout:]
        if n_train > len(rest):
            log.warning(
                "%s: %d training records asked for, only %d left after %d held-out",
                self.path,
                n_train,
                len(rest),
                len(heldout),
            )
        train = [records[i] for i in rest[:n_train]]
        return train, heldout


def _gym_options(text: str, where: str) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    for part in filter(None, text.split("&")):
        key, eq, value = part.partition("=")
        if not eq or not key:
            raise DataError(f"{where}: task options must be key=value&key=value, got {part!r}")
        for cast in (int, float):
            try:
                opts[key] = cast(value)
                break
            except ValueError:
                continue
        else:
            opts[key] = {"true": True, "false": False}.get(value.lower(), value)
    return opts


@dataclass(frozen=True)
class GymSource:
    task: str
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def name(self) -> str:
        return f"reasoning_gym:{self.task}"

    def generate(self, size: int, seed: int) -> list[Record]:
        return reasoning_gym_records(self.task, size, seed, dict(self.options))

    def draw(self, n_train: int, n_heldout: int, seed: int) -> tuple[list[Record], list[Record]]:
        train = self.generate(n_train, seed) if n_train else []
        if not n_heldout:
            return train, []
        seen = {r.key for r in train}
        # Twice as many as needed, so that dropping overlaps with training still leaves enough.
        pool = self.generate(2 * n_heldout + 8, seed + _HELDOUT_SEED)
        heldout = [r for r in pool if r.key not in seen][:n_heldout]
        return train, heldout


def gym_tasks() -> list[str]:
    from reasoning_gym.factory import DATASETS

    return sorted(DATASETS)


def reasoning_gym_records(
    task: str, size: int, seed: int, options: dict[str, Any] | None = None
) -> list[Record]:
    """``size`` items of a reasoning-gym task, generated offline from ``seed``."""
    import reasoning_gym

    if task not in gym_tasks():
        raise UnknownNameError(
            f"unknown reasoning-gym task {task!r}; valid: {', '.join(gym_tasks())}"
        )
    try:
        ds = reasoning_gym.create_dataset(task, size=size, seed=seed, **(options or {}))
    except (AssertionError, TypeError, ValueError) as e:
        raise DataError(f"reasoning_gym:{task}: bad task options {options} ({e})") from None
    templates = getattr(ds, "task_indices", None)  # gsm_symbolic: which template made item i
    records = []
    for i in range(size):
        item = ds[i]
        meta = item.get("metadata", {})
        # gsm_symbolic carries a worked solution ending '#### N'; other tasks only the answer.
        response = meta.get("answer_cot") or str(item["answer"])
        label = meta.get("source_dataset", task)
        if templates is not None:
            label = f"{label}/t{templates[i]:02d}"
        records.append(
            Record(
                item["question"],
                response,
                label,
                answer=str(item["answer"]),
                scorer=f"reasoning_gym:{meta.get('source_dataset', task)}",
                entry=item,
            )
        )
    return records


Source = FileSource | GymSource
KINDS = ("reasoning_gym", "file", *FORMATS.names())


def parse_source(text: str, label_field: str = "") -> Source:
    """One source spec (without its weight)."""
    kind, sep, rest = text.partition(":")
    if not sep and text.endswith((".json", ".jsonl")):
        kind, rest = "file", text
    if kind == "reasoning_gym":
        task, _, opts = rest.partition("?")
        if not task:
            raise DataError(f"source {text!r}: name a task, e.g. reasoning_gym:gsm_symbolic")
        if task not in gym_tasks():
            raise UnknownNameError(
                f"source {text!r}: unknown reasoning-gym task {task!r}; "
                f"valid: {', '.join(gym_tasks())}"
            )
        return GymSource(task, tuple(sorted(_gym_options(opts, text).items())))
    if kind in ("file", *FORMATS.names()) and rest:
        path = Path(rest).expanduser()
        if path.suffix not in (".json", ".jsonl"):
            raise DataError(f"source {text!r}: data files must end in .json or .jsonl")
        return FileSource(path, "" if kind == "file" else kind, label_field)
    raise UnknownNameError(
        f"source {text!r}: unknown kind {kind!r}; valid: {', '.join(f'{k}:...' for k in KINDS)} "
        "or a path ending .json/.jsonl"
    )


def parse_sources(spec: str, label_field: str = "") -> list[tuple[Source, float]]:
    """A comma-separated source list with optional '@weight' suffixes."""
    out = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        weight = 1.0
        m = re.fullmatch(r"(.*)@([0-9.eE+-]+)", part)
        if m:
            part, weight = m.group(1), float(m.group(2))
            if not (weight > 0 and math.isfinite(weight)):
                raise DataError(f"source {part!r}: weight must be a positive number")
        out.append((parse_source(part, label_field), weight))
    if not out:
        raise DataError("data.source is empty; e.g. reasoning_gym:gsm_symbolic")
    return out


def split_counts(total: int, weights: list[float]) -> list[int]:
    """``total`` split in proportion to ``weights`` (largest remainder, sums exactly)."""
    shares = [total * w / sum(weights) for w in weights]
    counts = [math.floor(s) for s in shares]
    order = sorted(range(len(shares)), key=lambda k: counts[k] - shares[k])
    for k in order[: total - sum(counts)]:
        counts[k] += 1
    return counts


def _looks_like_test_split(source: Source) -> bool:
    return isinstance(source, FileSource) and bool(
        re.search(r"(^|[_.-])(test|testing)$", source.path.stem.lower())
    )


def _warn_test_splits(sources: list[tuple[Source, float]]) -> None:
    for src, _ in sources:
        if _looks_like_test_split(src):
            log.warning(
                "%s looks like a test split: training on it invalidates evaluation", src.name
            )


def _draw_each(
    sources: list[tuple[Source, float]],
    train_counts: list[int],
    heldout_counts: list[int],
    seed: int,
) -> tuple[list[Record], list[Record]]:
    """Each source's own draw (source k seeded ``seed + 7919 * k``), concatenated in order."""
    train: list[Record] = []
    heldout: list[Record] = []
    for k, ((src, _), n, h) in enumerate(zip(sources, train_counts, heldout_counts, strict=True)):
        t, e = src.draw(n, h, seed + 7919 * k)
        train += t
        heldout += e
    return train, heldout


def _interleave(records: list[Record], seed: int) -> list[Record]:
    """A seeded shuffle, so that the records of mixed sources interleave."""
    order = np.random.default_rng([seed, 17]).permutation(len(records))
    return [records[i] for i in order]


def client_records(source: str, train_size: int, seed: int, label_field: str = "") -> list[Record]:
    """The training records of ONE client from its own ``source`` (any ``data.source`` syntax).

    A pure function of its arguments: the simulator and a networked client that call it with the
    same arguments get the same records in the same order. The draw is the training draw of
    ``train_and_heldout`` with nothing held out: ``train_size`` is split over the mix's sources in
    proportion to their ``@weights`` (largest remainder); source k draws its share with seed
    ``seed + 7919 * k`` (a file: the whole file in the seeded order ``rng([seed_k, 13])`` and its
    first n records, all of them if it holds fewer; reasoning-gym: n items generated from
    ``seed_k``); the result is shuffled with ``rng([seed, 17])``. So it holds at most
    ``train_size`` records. A bad file raises DataError naming the file and line.
    """
    if train_size < 1:
        raise DataError(f"client source {source!r}: train_size must be >= 1, got {train_size}")
    sources = parse_sources(source, label_field)
    _warn_test_splits(sources)
    counts = split_counts(train_size, [w for _, w in sources])
    train, _ = _draw_each(sources, counts, [0] * len(sources), seed)
    if not train:
        raise DataError(f"client source {source!r} gave no training records")
    return _interleave(train, seed)


def heldout_draw(spec: str, size: int, seed: int, label_field: str = "") -> list[Record]:
    """The held-out draw of ``eval.source``: ``size`` records split over the mix by weight,
    source k drawn from its own seed stream (``seed + 104729 * (k + 1)``, never training's).
    The simulator and a ``parablock server`` evaluate on exactly these."""
    sources = parse_sources(spec, label_field)
    counts = split_counts(size, [w for _, w in sources])
    out: list[Record] = []
    for k, ((src, _), h) in enumerate(zip(sources, counts, strict=True)):
        out += src.draw(0, h, seed + 104_729 * (k + 1))[1]
    return out


def drop_heldout(train: list[Record], heldout: list[Record]) -> tuple[list[Record], int]:
    """``train`` without the records whose question is also held out, and how many went."""
    seen = {r.key for r in heldout}
    kept = [r for r in train if r.key not in seen]
    if len(kept) < len(train):
        log.info(
            "removed %d training record(s) that duplicate a held-out question",
            len(train) - len(kept),
        )
    return kept, len(train) - len(kept)


def train_and_heldout(
    train_spec: str,
    train_size: int,
    heldout_size: int,
    seed: int,
    *,
    heldout_spec: str = "",
    label_field: str = "",
    stats: DataStats | None = None,
) -> tuple[list[Record], list[Record]]:
    """Disjoint training and held-out records; held-out from ``heldout_spec`` or the same mix.

    A training record whose question (``Record.key``) is also held out is dropped, whichever
    source it came from: a file that repeats a record would otherwise put the same item on both
    sides. The number dropped goes to ``stats.heldout_duplicates``."""
    sources = parse_sources(train_spec, label_field)
    _warn_test_splits(sources)
    weights = [w for _, w in sources]
    train_counts = split_counts(train_size, weights)
    own_heldout = split_counts(heldout_size, weights) if not heldout_spec else [0] * len(sources)
    train, heldout = _draw_each(sources, train_counts, own_heldout, seed)
    if heldout_spec:
        heldout += heldout_draw(heldout_spec, heldout_size, seed, label_field)
    train, dropped = drop_heldout(train, heldout)
    if stats is not None:
        stats.heldout_duplicates += dropped
    train = _interleave(train, seed)  # mixed sources interleave
    if not train:
        also = f" ({dropped} dropped as duplicates of held-out records)" if dropped else ""
        raise DataError(f"data.source={train_spec!r} gave no training records{also}")
    if not heldout:
        raise DataError("no held-out records; raise eval.size or give eval.source more data")
    return train, heldout
