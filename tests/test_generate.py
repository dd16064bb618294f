"""``parablock generate``: greedy decoding with the chat template, against a hand-rolled loop."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from parablock.cli import main
from parablock.tools.generate import generate, reply_ids


def _greedy_by_hand(model_dir: str, prompt: str, n: int) -> list[int]:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    text = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    start = ids.shape[1]
    with torch.no_grad():
        for _ in range(n):
            nxt = model(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
            if nxt.item() == tok.eos_token_id:
                break
    return ids[0, start:].tolist()


def test_generate_is_greedy_with_the_chat_template(tiny_model_dir):
    prompt = "Tom has 3 apples and buys 4 more. How many apples does he have?"
    tok, got = reply_ids(tiny_model_dir, prompt, max_new_tokens=12)
    assert got == _greedy_by_hand(tiny_model_dir, prompt, 12) and len(got) >= 1
    assert generate(tiny_model_dir, prompt, max_new_tokens=12) == (
        tok.decode(got, skip_special_tokens=True).strip()
    )


def test_generate_cli(tiny_model_dir, tmp_path, capsys):
    assert main(["generate", tiny_model_dir, "What is 2 + 2?", "--max-new-tokens", "5"]) == 0
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "nope"), "hi"]) == 2
    err = capsys.readouterr().err
    assert "no such directory" in err and err.count("\n") == 1
    assert main(["generate", tiny_model_dir, "hi", "--max-new-tokens", "0"]) == 2
