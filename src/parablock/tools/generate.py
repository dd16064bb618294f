"""``parablock generate``: try a fine-tuned model (a run's ``model/`` directory) on one prompt.

The prompt goes in as a user turn through the tokenizer's chat template with the assistant
generation prompt, exactly as training formatted questions; decoding is greedy unless a
temperature is given.
"""

from __future__ import annotations

from typing import Any

import torch

from parablock.model.load import ModelError, load_model, load_tokenizer


def generate(
    model_dir: str,
    prompt: str,
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    seed: int = 0,
) -> str:
    """The model's reply to ``prompt`` (the new tokens only, special tokens removed)."""
    tokenizer, ids = reply_ids(
        model_dir, prompt, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed
    )
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def reply_ids(
    model_dir: str,
    prompt: str,
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    seed: int = 0,
) -> tuple[Any, list[int]]:
    """The tokenizer and the reply's new token ids."""
    if max_new_tokens < 1:
        raise ModelError(f"--max-new-tokens={max_new_tokens} must be >= 1")
    if temperature < 0:
        raise ModelError(f"--temperature={temperature} must be >= 0 (0 = greedy)")
    tokenizer = load_tokenizer(model_dir)
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(f"the tokenizer in {model_dir} has no chat template")
    model = load_model(model_dir)
    model.eval()
    model.config.use_cache = True  # load_model turns it off for training
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    torch.manual_seed(seed)
    sampling = (
        {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    )
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **sampling,
        )
    return tokenizer, out[0, inputs["input_ids"].shape[1] :].tolist()
