"""Held-out evaluation: loss/perplexity on response tokens, and generation-based accuracy.

Accuracy comes from batched greedy decoding (``generate.py``: left padding, KV cache, each
completion stopped at its answer or ``eval.max_new_tokens``), answer extraction and a scorer
chosen per record: ``number`` for GSM8K-style answers (the number after '####', else the last
number, normalised: commas, currency and trailing zeros dropped) and ``reasoning_gym:<task>``
for reasoning-gym's own scorer. Records with no checkable answer (Alpaca,
chat) count towards the loss only.

Evaluating every ``eval.every`` rounds must not take CPU from the timed rounds, so the run only
records each round's aggregate (``AggregateHistory``, hooked into the server) and afterwards
replays them onto the initial model to evaluate the global model as it was after round t.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from functools import cache

import torch
from torch import nn

from parablock.data.examples import Example, Record, collate
from parablock.evaluation.generate import generate
from parablock.evaluation.interval import wilson_interval
from parablock.model.blocks import Block, set_block
from parablock.model.forward import postprocessed_logits, response_loss
from parablock.registry import Registry

# -- loss ------------------------------------------------------------------------------------


@torch.no_grad()
def eval_loss(model: nn.Module, data: list[Example], batch_size: int, pad_id: int) -> float:
    """Mean per-token loss on the response tokens of ``data`` (fp32; the LM head only where the
    loss is, as in training)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    plain = postprocessed_logits(model)
    head = nn.Identity() if plain else model.get_output_embeddings()
    device = next(model.parameters()).device
    for i in range(0, len(data), batch_size):
        batch = {k: v.to(device) for k, v in collate(data[i : i + batch_size], pad_id).items()}
        if plain:  # the model's own logits, all positions
            hidden = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
        else:
            hidden = model.model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).last_hidden_state
        loss, n = response_loss(hidden, batch["labels"], head)
        total += loss.item()
        count += n
    model.train(was_training)
    return total / max(count, 1)


# -- answer extraction and scoring -----------------------------------------------------------

_NUMBER = re.compile(r"-?\$?\s?\d[\d,]*(?:\.\d+)?|-?\$?\s?\.\d+")


def normalise_number(text: str) -> str | None:
    """'1,234.50' -> '1234.5', '$18' -> '18', '-0' -> '0', '7.' -> '7'; None if not a number."""
    t = text.strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    try:
        d = Decimal(t)
    except InvalidOperation:
        return None
    if not d.is_finite():
        return None
    if d == d.to_integral_value():
        return str(int(d))
    return format(d.normalize(), "f")


def extract_number(text: str) -> str | None:
    """The final numeric answer: the first number after the last '####', else the last number."""
    if "####" in text:
        m = _NUMBER.search(text.rsplit("####", 1)[1])
        if m:
            return normalise_number(m.group())
    found = _NUMBER.findall(text)
    return normalise_number(found[-1]) if found else None


def final_answer(text: str) -> str:
    """A free-form final answer: the line after the last '####', else the whole stripped output."""
    if "####" in text:
        return text.rsplit("####", 1)[1].strip().split("\n")[0].strip()
    return text.strip()


Scorer = Callable[[str, Record], tuple[str, float]]  # output, record -> extracted, score in [0, 1]
SCORERS: Registry[Scorer] = Registry("scorer")


@SCORERS.register("number")
def score_number(output: str, record: Record) -> tuple[str, float]:
    got = extract_number(output)
    want = normalise_number(record.answer) or extract_number(record.answer)
    return got or "", float(got is not None and got == want)


@cache
def _gym_scorer(task: str):
    import reasoning_gym

    return reasoning_gym.get_score_answer_fn(task)


def score_reasoning_gym(output: str, record: Record) -> tuple[str, float]:
    task = record.scorer.split(":", 1)[1]
    answer = final_answer(output)
    score = _gym_scorer(task)(answer=answer, entry=record.entry)
    return answer, float(score or 0.0)


def scorer_for(record: Record) -> Scorer | None:
    if not record.scorer:
        return None
    if record.scorer.startswith("reasoning_gym:"):
        return score_reasoning_gym
    return SCORERS.get(record.scorer)


@dataclass(frozen=True)
class EvalSettings:
    batch_size: int = 8
    accuracy_size: int = 16
    max_new_tokens: int = 256
    generate_batch_size: int = 32


@dataclass
class EvalResult:
    round: int
    time_s: float
    loss: float
    accuracy: float | None
    items: list[dict] = field(default_factory=list)
    accuracy_ci: tuple[float, float] | None = None  # Wilson's 95% interval (interval.py)

    def to_json(self) -> dict:
        return {
            "kind": "eval",
            "round": self.round,
            "time_s": self.time_s,
            "eval_loss": self.loss,
            "eval_perplexity": math.exp(min(self.loss, 50.0)),
            "eval_accuracy": self.accuracy,
            "eval_accuracy_ci": None if self.accuracy_ci is None else list(self.accuracy_ci),
            "eval_items": len(self.items),
        }

    @classmethod
    def from_json(cls, row: dict) -> EvalResult:
        """Back from ``to_json`` (per-item answers are not kept there)."""
        ci = row.get("eval_accuracy_ci")
        return cls(
            row["round"],
            row["time_s"],
            row["eval_loss"],
            row["eval_accuracy"],
            accuracy_ci=None if ci is None else (ci[0], ci[1]),
        )


class Evaluator:
    """Loss on every held-out example; accuracy on the first ``accuracy_size`` checkable ones."""

    def __init__(
        self,
        tokenizer,
        examples: list[Example],
        records: list[Record],
        settings: EvalSettings,
    ) -> None:
        self.tokenizer = tokenizer
        self.examples = examples
        self.settings = settings
        checkable = [r for r in records if scorer_for(r) is not None]
        self.accuracy_records = checkable[: settings.accuracy_size]

    def __call__(self, model: nn.Module, round: int, time_s: float) -> EvalResult:
        s = self.settings
        loss = eval_loss(model, self.examples, s.batch_size, self.tokenizer.pad_token_id)
        if not self.accuracy_records:
            return EvalResult(round, time_s, loss, None)
        outputs = generate(
            model, self.tokenizer, self.accuracy_records, s.max_new_tokens, s.generate_batch_size
        )
        items = []
        for k, (rec, out) in enumerate(zip(self.accuracy_records, outputs, strict=True)):
            extracted, score = scorer_for(rec)(out, rec)
            items.append(
                {
                    "round": round,
                    "item": k,
                    "prompt": rec.prompt,
                    "reference": rec.answer,
                    "output": out,
                    "extracted": extracted,
                    "score": score,
                    "correct": score >= 1.0,
                }
            )
        correct = sum(it["correct"] for it in items)
        ci = wilson_interval(correct, len(items))
        return EvalResult(round, time_s, loss, correct / len(items), items, ci)


def eval_rounds(rounds: int, every: int) -> list[int]:
    """The rounds after which the global model is evaluated (the last one always)."""
    picked = {t for t in range(rounds) if every > 0 and (t + 1) % every == 0}
    return sorted(picked | {rounds - 1})


# -- replaying the aggregate history ---------------------------------------------------------


class AggregateHistory:
    """Keeps, per evaluation window, the newest value of each block the server aggregated.

    A ``Server.aggregate_listeners`` entry; it only stores references to the fresh tensors the
    server already built, so it costs the timed rounds nothing but a dict update.
    """

    def __init__(self, eval_at: list[int], start: float | None = None) -> None:
        self.eval_at = sorted(eval_at)
        self.start = start if start is not None else time.time()
        self.windows: dict[int, dict[int, dict[str, torch.Tensor]]] = {}
        self.times: dict[int, float] = {}
        self._lock = threading.Lock()

    def _window(self, round: int) -> int:
        return next((t for t in self.eval_at if t >= round), self.eval_at[-1])

    def record(self, round: int, block: int, value: dict[str, torch.Tensor], *_) -> None:
        with self._lock:
            self.windows.setdefault(self._window(round), {})[block] = value
            self.times[round] = time.time() - self.start

    def replay(self, model: nn.Module, blocks: list[Block]) -> Iterator[tuple[int, float]]:
        """Advance ``model`` (the initial global model) to each evaluation round in turn."""
        for t in self.eval_at:
            for b, value in sorted(self.windows.get(t, {}).items()):
                set_block(model, blocks[b], value)
            yield t, self.times.get(t, float("nan"))
