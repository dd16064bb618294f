"""Data sources: file formats (and malformed files), reasoning-gym, mixing, disjoint held-out sets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from parablock.data.examples import IGNORE, DataError, encode
from parablock.data.sources import (
    parse_sources,
    read_file,
    reasoning_gym_records,
    split_counts,
    train_and_heldout,
)
from parablock.registry import UnknownNameError

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_alpaca_prompt_joins_instruction_and_nonempty_input(tmp_path):
    f = tmp_path / "a.json"
    f.write_text(
        json.dumps(
            [
                {"instruction": "Translate.", "input": "Bonjour", "output": "Hello"},
                {"instruction": "Say hi.", "input": "", "output": "Hi"},
            ]
        )
    )
    a, b = read_file(f)
    assert (a.prompt, a.response, a.label) == ("Translate.\n\nBonjour", "Hello", "a")
    assert (b.prompt, b.response, b.scorer) == ("Say hi.", "Hi", "")


def test_gsm8k_record_keeps_solution_and_reference(tmp_path):
    f = _jsonl(tmp_path / "g.jsonl", [{"question": "2+2?", "answer": "2+2=4\n#### 4"}])
    (r,) = read_file(f, "gsm8k")
    assert (r.prompt, r.response, r.answer, r.scorer) == ("2+2?", "2+2=4\n#### 4", "4", "number")


def test_chat_last_assistant_message_is_the_response(tmp_path, tiny_tokenizer):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris"},
    ]
    (r,) = read_file(_jsonl(tmp_path / "c.jsonl", [{"messages": msgs}]))
    assert r.prompt == "Capital of France?" and r.response == "Paris"
    assert r.context == (("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello"))
    ex = encode(r, tiny_tokenizer, 512)
    response = tiny_tokenizer.decode([t for t in ex.labels if t != IGNORE])
    prompt = tiny_tokenizer.decode(
        [t for t, y in zip(ex.input_ids, ex.labels, strict=True) if y == IGNORE]
    )
    # loss on the last answer only; earlier turns (including the earlier assistant) are prompt
    assert response.startswith("Paris") and "Hello" not in response
    assert "Be brief." in prompt and "Hello" in prompt and "Paris" not in prompt


def test_format_is_detected_per_record_and_label_field_is_used(tmp_path):
    rows = [
        {"instruction": "i", "output": "o", "cat": "x"},
        {"question": "q", "answer": "a #### 1", "cat": "y"},
        {
            "messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "v"}],
            "cat": 3,
        },
    ]
    recs = read_file(_jsonl(tmp_path / "mix.jsonl", rows), label_field="cat")
    assert [r.response for r in recs] == ["o", "a #### 1", "v"]
    assert [r.label for r in recs] == ["x", "y", "3"]


@pytest.mark.parametrize(
    "name, content, fmt, message",
    [
        (
            "bad.jsonl",
            '{"question": "q", "answer": "a"}\n{"question": oops}\n',
            "",
            "bad.jsonl:2: malformed JSON",
        ),
        (
            "miss.jsonl",
            '{"instruction": "i"}\n',
            "",
            "miss.jsonl:1: missing field 'output' for the alpaca format",
        ),
        (
            "miss2.jsonl",
            '{"question": "q"}\n',
            "gsm8k",
            "missing field 'answer' for the gsm8k format",
        ),
        ("none.jsonl", '{"text": "t"}\n', "", "none of the accepted formats' fields"),
        (
            "chat.jsonl",
            '{"messages": [{"role": "user", "content": "u"}]}\n',
            "",
            "needs an assistant message",
        ),
        ("list.json", '{"a": 1}', "", "must hold a list of records"),
        ("broken.json", '[{"a": 1},\n {"b": }]', "", "broken.json:2: malformed JSON"),
        ("num.jsonl", '{"question": 1, "answer": "a"}\n', "", "field 'question' must be a string"),
        ("empty.jsonl", "\n", "", "holds no records"),
    ],
)
def test_malformed_files_name_file_line_and_field(tmp_path, name, content, fmt, message):
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace("[", r"\[")) as e:
        read_file(f, fmt)
    if "accepted formats" in str(e.value):
        assert "alpaca (instruction, input, output)" in str(e.value)


def test_unknown_kind_task_and_missing_file_list_what_is_valid(tmp_path):
    with pytest.raises(UnknownNameError, match=r"unknown kind 'csv'; valid: reasoning_gym:\.\.\."):
        parse_sources("csv:x.csv")
    with pytest.raises(
        UnknownNameError, match="unknown reasoning-gym task 'gsm9k'; valid: .*gsm_symbolic"
    ):
        parse_sources("reasoning_gym:gsm9k")
    with pytest.raises(DataError, match="does not exist"):
        train_and_heldout(str(tmp_path / "nope.jsonl"), 4, 2, 0)
    with pytest.raises(DataError, match="bad task options"):
        reasoning_gym_records("basic_arithmetic", 2, 0, {"max_terms": 0})


def test_reasoning_gym_options_weights_and_labels():
    (src, w), (src2, w2) = parse_sources(
        "reasoning_gym:basic_arithmetic?max_terms=2&max_digits=1@1,reasoning_gym:gsm_symbolic@3"
    )
    assert (w, w2) == (1.0, 3.0) and dict(src.options) == {"max_terms": 2, "max_digits": 1}
    recs = src.generate(20, seed=0)
    assert all(len(r.prompt) < 40 for r in recs)  # 2 one-digit terms: short questions
    templates = {r.label for r in src2.generate(30, seed=0)}
    assert len(templates) > 5 and all(t.startswith("gsm_symbolic/t") for t in templates)
    assert split_counts(8, [1, 3]) == [2, 6] and sum(split_counts(7, [1, 1, 1])) == 7


def test_mixed_sources_train_and_heldout_are_disjoint_and_weighted(tmp_path):
    rows = [{"instruction": f"task {i}", "input": "", "output": str(i)} for i in range(60)]
    f = _jsonl(tmp_path / "alp.jsonl", rows)
    spec = f"reasoning_gym:basic_arithmetic@1,alpaca:{f}@1"
    train, heldout = train_and_heldout(spec, 40, 10, seed=3)
    assert len(train) == 40 and len(heldout) == 10
    assert not {r.key for r in train} & {r.key for r in heldout}
    assert (
        sum(r.label == "alp" for r in train) == 20 and sum(r.label == "alp" for r in heldout) == 5
    )
    assert (train, heldout) == train_and_heldout(spec, 40, 10, seed=3)  # seeded


def test_explicit_eval_source_never_overlaps_training(tmp_path):
    rows = [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(30)]
    train_file = _jsonl(tmp_path / "train.jsonl", rows)
    eval_file = _jsonl(
        tmp_path / "test.jsonl", rows[20:] + [{"question": "new", "answer": "#### 1"}]
    )
    train, heldout = train_and_heldout(
        str(train_file), 30, 11, 0, heldout_spec=f"gsm8k:{eval_file}"
    )
    assert len(heldout) == 11 and len(train) == 20
    assert not {r.key for r in train} & {r.key for r in heldout}


@pytest.mark.skipif(not (SHARED / "alpaca").is_dir(), reason="../shared/data is not present")
def test_real_alpaca_and_gsm8k_files_parse():
    alpaca = read_file(SHARED / "alpaca" / "alpaca_5000.json")
    assert len(alpaca) == 5000 and sum(not r.response for r in alpaca) < 50
    assert any("\n\n" in r.prompt for r in alpaca)  # records with an input
    gsm = read_file(SHARED / "gsm8k" / "test.jsonl")
    assert len(gsm) == 1319 and all(r.scorer == "number" and r.answer for r in gsm)
