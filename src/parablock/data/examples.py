"""Formatting, encoding and batching: chat template, response-only labels, truncation, batches.

Records come from ``sources.py``; here each becomes token ids through the tokenizer's own chat
template (the prompt messages, then the assistant response), with the loss on the response tokens
only (prompt labels are -100). ``data.max_length`` truncates from the right; an example whose
prompt alone fills it is dropped (it has nothing to learn). Both are counted and reported. Only
the head of a long text is tokenised (``head_ids``), so one huge record costs no more memory than
the tokens that can be kept.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from parablock.errors import DataError  # noqa: F401

log = logging.getLogger(__name__)

IGNORE = -100

# Characters tokenised per token still wanted, at first: far more than a token spans in practice,
# so one pass usually settles it; a text whose tokens are longer is retried with a larger piece.
CHARS_PER_TOKEN = 32
# Trailing tokens of a cut piece that are not trusted: near the cut, a piece may tokenise
# differently from the whole text (a word or merge split in two).
CUT_MARGIN = 16


@dataclass(frozen=True)
class Record:
    """One raw example before tokenization.

    ``context`` holds earlier chat turns (role, content) that come before the user ``prompt``
    (a system message, earlier exchanges); ``response`` is the assistant turn the loss covers.
    ``answer`` and ``scorer`` say how a generated answer is checked (see ``evaluate.py``);
    ``entry`` is the reasoning-gym item its own scorer needs.
    """

    prompt: str
    response: str
    label: str = ""  # task/template/field value, used by non-IID partitions
    context: tuple[tuple[str, str], ...] = ()
    answer: str = ""
    scorer: str = ""
    entry: Any = field(default=None, compare=False, hash=False, repr=False)

    def messages(self) -> list[dict[str, str]]:
        """The prompt side of the conversation, in the chat template's format."""
        msgs = [{"role": r, "content": c} for r, c in self.context]
        if self.prompt or not msgs:
            msgs.append({"role": "user", "content": self.prompt})
        return msgs

    @property
    def key(self) -> tuple:
        """What makes two records the same question (train and held-out never share one)."""
        return (self.context, self.prompt)


@dataclass(frozen=True)
class Example:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    group: str = ""  # the record's partition label

    @property
    def response_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


@dataclass
class DataStats:
    kept: int = 0
    truncated: int = 0
    dropped: int = 0
    # training records removed before encoding because a held-out record asks the same question
    heldout_duplicates: int = 0

    def to_json(self) -> dict[str, int]:
        return asdict(self)


def render_prompt(record: Record, tokenizer) -> str:
    """The prompt as the chat template renders it, ending where the assistant's answer begins."""
    return tokenizer.apply_chat_template(
        record.messages(), tokenize=False, add_generation_prompt=True
    )


def encode(
    record: Record, tokenizer, max_length: int, stats: DataStats | None = None
) -> Example | None:
    full = record.messages() + [{"role": "assistant", "content": record.response}]
    prompt_text = render_prompt(record, tokenizer)
    full_text = tokenizer.apply_chat_template(full, tokenize=False)
    if not full_text.startswith(prompt_text):
        raise DataError(
            "the tokenizer's chat template does not extend the prompt with the response"
        )
    prompt_ids = head_ids(tokenizer, prompt_text, max_length)
    if len(prompt_ids) < max_length:
        response = full_text[len(prompt_text) :]
        response_ids = head_ids(tokenizer, response, max_length - len(prompt_ids))
    else:
        response_ids = []
    ids = prompt_ids + response_ids
    labels = [IGNORE] * len(prompt_ids) + list(response_ids)
    if len(prompt_ids) >= max_length:
        if stats is not None:
            stats.dropped += 1
        return None
    if stats is not None:
        stats.kept += 1
        stats.truncated += len(ids) > max_length
    return Example(tuple(ids[:max_length]), tuple(labels[:max_length]), record.label)


def head_ids(tokenizer, text: str, n: int) -> list[int]:
    """The token ids of ``text`` when it has at most ``n`` tokens, else more than ``n`` of its
    leading ids (exactly the whole text's), without tokenising the rest.

    Tokenising a 50 MB line whole takes gigabytes for tokens that truncation then throws away.
    A prefix of the text gives the same leading ids except near the cut, so a piece is
    tokenised, its last ``CUT_MARGIN`` ids are dropped, and if more than ``n`` remain, they are
    the answer; otherwise the piece grows. Callers can still tell truncation: a cut text always
    returns more than ``n`` ids.
    """
    budget = max(n, 1) * CHARS_PER_TOKEN
    while len(text) > budget:
        ids = _ids(tokenizer, text[: _cut(text, budget)])
        if len(ids) - CUT_MARGIN > n:
            return ids[: len(ids) - CUT_MARGIN]
        budget *= 4
    return _ids(tokenizer, text)


def _cut(text: str, budget: int) -> int:
    """Where to cut ``text`` near ``budget`` characters: before a space in the last quarter if
    there is one (a word boundary, so fewer tokens differ near the cut), else at ``budget``."""
    space = text.rfind(" ", budget - budget // 4, budget)
    return space if space > 0 else budget


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_all(
    records: list[Record],
    tokenizer,
    max_length: int,
    what: str,
    stats: DataStats | None = None,
) -> list[Example]:
    """Encode every record; log (and count into ``stats``) what was kept, truncated, dropped."""
    stats = stats if stats is not None else DataStats()
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


def round_indices(n: int, round: int, steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """The examples of each of a round's ``steps`` batches, a pure function of (seed, round)."""
    return list(itertools.islice(round_batches(n, round, steps, batch_size, seed), steps))


def round_batches(
    n: int, round: int, steps: int, batch_size: int, seed: int
) -> Iterator[list[int]]:
    """A round's batches as an endless stream, a pure function of (seed, round): the first
    ``steps`` are exactly ``round_indices`` (``steps`` x ``batch_size`` examples drawn at once,
    without replacement while there are enough); every later one continues the same seeded
    generator, one batch at a time (a client that takes extra steps while its link is busy,
    ``federation.local_steps_max``, takes the next ones)."""
    rng = np.random.default_rng([seed, 11, round])
    need = steps * batch_size
    idx = rng.choice(n, size=need, replace=need > n)
    for k in range(steps):
        yield idx[k * batch_size : (k + 1) * batch_size].tolist()
    while True:
        yield rng.choice(n, size=batch_size, replace=batch_size > n).tolist()


def poisson_indices(n: int, round: int, steps: int, rate: float, seed: int) -> list[list[int]]:
    """A round's ``steps`` batches by Poisson sampling, as DP-SGD's accountant assumes: every
    example joins each batch on its own with probability ``rate`` (a batch may come out empty);
    a pure function of (seed, round)."""
    rng = np.random.default_rng([seed, 13, round])
    return [np.flatnonzero(rng.random(n) < rate).tolist() for _ in range(steps)]


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
