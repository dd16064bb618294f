"""Evaluation's generation loop: the same tokens as ``model.generate`` greedily, whatever the
batch, the padding or the rows that finish early; and each completion cut at its answer."""

from __future__ import annotations

import pytest
import torch

from conftest import make_model, make_tokenizer
from parablock.data.examples import Record, render_prompt
from parablock.data.sources import reasoning_gym_records
from parablock.evaluation import generate as gen
from parablock.evaluation.generate import (
    greedy,
    stop_after_answer_line,
    stop_after_first_line,
    stop_rule,
)


def _prompts(tok, records):
    return [tok(render_prompt(r, tok), add_special_tokens=False)["input_ids"] for r in records]


def _model(seed: int = 3):
    """A tiny random Llama whose weights are scaled up so that its greedy text varies from
    prompt to prompt and token to token (at the usual init it repeats one token)."""
    model = make_model(len(make_tokenizer()), seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(5.0)
    return model


def _hf_greedy(model, tok, prompt: list[int], n: int) -> str:
    ids = torch.tensor([prompt])
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return tok.decode(out[0, len(prompt) :], skip_special_tokens=True)


@pytest.fixture
def records():
    recs = reasoning_gym_records("basic_arithmetic", 5, seed=1)
    recs += reasoning_gym_records("gsm_symbolic", 2, seed=2)  # long prompts: heavy padding
    return recs + [Record("Hi", "")]


def test_batched_greedy_equals_model_generate_one_at_a_time(tiny_tokenizer, records):
    model = _model()
    prompts = _prompts(tiny_tokenizer, records)
    want = [_hf_greedy(model, tiny_tokenizer, p, 10) for p in prompts]
    for batch_size in (1, 3, 8):
        assert greedy(model, tiny_tokenizer, prompts, 10, batch_size) == want, batch_size
    assert len(set(want)) == len(want)  # every prompt got its own text


def test_rows_that_stop_early_leave_the_others_unchanged(tiny_tokenizer, records):
    model = _model()
    prompts = _prompts(tiny_tokenizer, records)
    full = greedy(model, tiny_tokenizer, prompts, 12, 8)
    # every other row stops after its first 4 characters; the rows left keep generating
    stops = [(lambda t: 4 if len(t) >= 4 else None) if k % 2 else None for k in range(len(full))]
    cut = greedy(model, tiny_tokenizer, prompts, 12, 8, stops)
    for k, (c, f) in enumerate(zip(cut, full, strict=True)):
        assert c == (f[:4] if k % 2 else f), k


def test_a_model_that_ends_its_turn_stops_there(tiny_tokenizer):
    model = make_model(len(tiny_tokenizer), seed=0)
    model.lm_head = torch.nn.Linear(64, len(tiny_tokenizer))  # end of turn wins every step
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.bias.zero_()
        model.lm_head.bias[tiny_tokenizer.eos_token_id] = 1.0
    recs = reasoning_gym_records("basic_arithmetic", 3, seed=4)
    assert greedy(model, tiny_tokenizer, _prompts(tiny_tokenizer, recs), 50, 4) == ["", "", ""]


@pytest.mark.parametrize(
    "text, want",
    [
        ("so 3 + 4 = 7\n#### 7\nand more", "so 3 + 4 = 7\n#### 7"),
        ("#### 7", None),  # the answer line may still be growing
        ("####\n", None),
        ("no answer yet\n", None),
    ],
)
def test_stop_after_answer_line(text, want):
    end = stop_after_answer_line(text)
    assert (None if end is None else text[:end]) == want


@pytest.mark.parametrize(
    "text, want",
    [("42\nbecause", "42"), ("\n\n 42\n", "\n\n 42"), ("42", None), ("\n\n", None)],
)
def test_stop_after_first_line(text, want):
    end = stop_after_first_line(text)
    assert (None if end is None else text[:end]) == want


def test_each_record_stops_where_its_reference_answer_ends():
    (gsm,) = reasoning_gym_records("gsm_symbolic", 1, seed=0)
    (arith,) = reasoning_gym_records("basic_arithmetic", 1, seed=0)
    assert stop_rule(gsm) is stop_after_answer_line
    assert stop_rule(arith) is stop_after_first_line
    assert stop_rule(Record("Write a poem", "Roses\nare red")) is None


def test_generate_gives_each_record_its_own_stop_rule(tiny_tokenizer, records, monkeypatch):
    seen = {}

    def fake(model, tok, prompts, n, batch_size, stops):
        seen.update(prompts=prompts, stops=stops)
        return ["x"] * len(prompts)

    monkeypatch.setattr(gen, "greedy", fake)
    assert gen.generate(None, tiny_tokenizer, records, 16, 8) == ["x"] * len(records)
    assert seen["stops"] == [stop_rule(r) for r in records]
    assert seen["stops"][0] is stop_after_first_line and seen["stops"][-1] is None
    assert seen["prompts"] == _prompts(tiny_tokenizer, records)
