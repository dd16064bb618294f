"""Training and held-out data: generation, chat formatting, response-only labels, partitions, batches.

Examples are formatted with the tokenizer's own chat template (user = question, assistant =
response); the loss covers the response tokens only (prompt labels are -100). ``data.max_length``
truncates from the right; an example whose prompt alone fills it is dropped (it has nothing to learn).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)

IGNORE = -100


class DataError(ValueError):
    """Bad or unusable data: the message names the source and what was wrong."""


@dataclass(frozen=True)
class Record:
    """One raw example before tokenization."""

    prompt: str
    response: str
    label: str = ""  # task/template name, used by non-IID partitions


@dataclass(frozen=True)
class Example:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    @property
    def response_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


@dataclass
class DataStats:
    kept: int = 0
    truncated: int = 0
    dropped: int = 0


def reasoning_gym_records(task: str, size: int, seed: int) -> list[Record]:
    import reasoning_gym

    try:
        ds = reasoning_gym.create_dataset(task, size=size, seed=seed)
    except (KeyError, ValueError) as e:
        raise DataError(f"data.source: unknown reasoning-gym task {task!r} ({e})") from None
    records = []
    for i in range(size):
        item = ds[i]
        meta = item.get("metadata", {})
        # gsm_symbolic carries a worked solution ending '#### N'; other tasks only the answer.
        response = meta.get("answer_cot") or str(item["answer"])
        records.append(Record(item["question"], response, meta.get("source_dataset", task)))
    return records


def load_records(source: str, size: int, seed: int) -> list[Record]:
    kind, _, name = source.partition(":")
    if kind != "reasoning_gym" or not name:
        raise DataError(f"data.source={source!r} is not supported; use 'reasoning_gym:<task>'")
    return reasoning_gym_records(name, size, seed)


def train_and_heldout(source: str, train_size: int, eval_size: int, seed: int):
    """Disjoint train and held-out records (different seeds, overlapping prompts removed)."""
    train = load_records(source, train_size, seed)
    seen = {r.prompt for r in train}
    heldout = [
        r for r in load_records(source, eval_size * 2, seed + 1_000_003) if r.prompt not in seen
    ]
    return train, heldout[:eval_size]


def encode(
    record: Record, tokenizer, max_length: int, stats: DataStats | None = None
) -> Example | None:
    user = [{"role": "user", "content": record.prompt}]
    full = user + [{"role": "assistant", "content": record.response}]
    prompt_text = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(full, tokenize=False)
    if not full_text.startswith(prompt_text):
        raise DataError(
            "the tokenizer's chat template does not extend the prompt with the response"
        )
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(full_text[len(prompt_text) :], add_special_tokens=False)["input_ids"]
    ids = list(prompt_ids) + list(response_ids)
    labels = [IGNORE] * len(prompt_ids) + list(response_ids)
    if len(prompt_ids) >= max_length:
        if stats:
            stats.dropped += 1
        return None
    if len(ids) > max_length and stats:
        stats.truncated += 1
    if stats:
        stats.kept += 1
    return Example(tuple(ids[:max_length]), tuple(labels[:max_length]))


def encode_all(records: list[Record], tokenizer, max_length: int, what: str) -> list[Example]:
    stats = DataStats()
    out = [e for r in records if (e := encode(r, tokenizer, max_length, stats)) is not None]
    log.info(
        "%s: %d examples kept, %d truncated, %d dropped (prompt >= data.max_length=%d)",
        what,
        stats.kept,
        stats.truncated,
        stats.dropped,
        max_length,
    )
    if not out:
        raise DataError(
            f"{what}: every example was dropped; raise data.max_length above {max_length}"
        )
    return out


def partition(n: int, clients: int, kind: str, seed: int) -> list[list[int]]:
    """Indices of the examples each client holds."""
    if kind == "replicate":  # every client holds all data (tests: staleness changes nothing)
        return [list(range(n)) for _ in range(clients)]
    if kind != "iid":
        raise DataError(f"data.partition={kind!r} is not supported; valid: iid, replicate")
    if n < clients:
        raise DataError(
            f"{n} examples cannot give each of {clients} clients one; use fewer clients or more data"
        )
    perm = np.random.default_rng([seed, 7]).permutation(n)
    return [sorted(int(i) for i in part) for part in np.array_split(perm, clients)]


def round_indices(n: int, round: int, steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """The examples of each of a round's ``steps`` batches, a pure function of (seed, round)."""
    rng = np.random.default_rng([seed, 11, round])
    need = steps * batch_size
    idx = rng.choice(n, size=need, replace=need > n)
    return [idx[k * batch_size : (k + 1) * batch_size].tolist() for k in range(steps)]


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
