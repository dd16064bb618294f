"""Cheap greedy generation for accuracy: batched, left-padded, with the KV cache, and each
completion stopped as soon as its answer is complete.

The cost of scoring by generation is the tokens the model runs through, so this loop:

- sorts the prompts by length before batching them (little left padding);
- runs each batch's prompts once (the LM head only at the last position) and then one token per
  step from the KV cache;
- stops each completion at an end-of-turn token or when its answer is complete (its stop rule,
  ``stop_rule``), and drops finished rows from the batch and its cache, so a batch costs what its
  live rows need, not ``max_new_tokens`` steps of all of them.

With no stop rule the output is exactly what ``model.generate`` gives greedily (tested against
it on a tiny model); a row's output does not depend on the other rows of its batch.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn

from parablock.data.examples import Record, render_prompt

StopRule = Callable[[str], int | None]  # completion so far -> where the answer ends, or None


def stop_after_answer_line(text: str) -> int | None:
    """GSM8K-style: the answer is the line that starts with '####'; it ends at its newline."""
    head = text.rfind("####")
    if head < 0:
        return None
    end = text.find("\n", head)
    return end if end >= 0 and text[head + 4 : end].strip() else None


def stop_after_first_line(text: str) -> int | None:
    """A one-line answer: it ends at the first newline after some text."""
    start = len(text) - len(text.lstrip())
    end = text.find("\n", start)
    return end if end >= 0 else None


def stop_rule(record: Record) -> StopRule | None:
    """How a completion of ``record`` ends, judged by its reference response: after the '####'
    line when that ends it, after the first line when it is one line, else only at end of turn."""
    response = record.response.strip()
    if "####" in response:
        return stop_after_answer_line
    if response and "\n" not in response:
        return stop_after_first_line
    return None


def end_ids(model: nn.Module, tokenizer) -> set[int]:
    """The tokens that end a turn: the tokenizer's EOS and the model's generation EOS ids."""
    ids = {tokenizer.eos_token_id}
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None)
    ids |= set(extra) if isinstance(extra, (list, tuple)) else {extra}
    return {i for i in ids if i is not None}


def _cache_arg(model: nn.Module) -> str:
    """The forward keyword for the KV cache (``cache`` in newer transformers)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for k, r in enumerate(rows):
        ids[k, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[k, width - len(r) :] = 1
    return ids, mask


@torch.no_grad()
def greedy(
    model: nn.Module,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int,
    batch_size: int,
    stops: list[StopRule | None] | None = None,
) -> list[str]:
    """Greedy completions of token-id ``prompts`` (decoded, special tokens dropped), each cut
    where its stop rule says its answer ends."""
    from transformers import DynamicCache

    stops = stops or [None] * len(prompts)
    ends = end_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(ends)
    cache_kw = _cache_arg(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    texts: list[str] = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for b in range(0, len(order), batch_size):
        live = order[b : b + batch_size]  # the prompts still generating, one per batch row
        ids, mask = _left_pad([prompts[i] for i in live], pad_id)
        ids, mask = ids.to(device), mask.to(device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=model.config)
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            use_cache=True,
            logits_to_keep=1,
            **{cache_kw: cache},
        )
        pos = pos[:, -1]
        made: dict[int, list[int]] = {i: [] for i in live}
        for step in range(max_new_tokens):
            nxt = out.logits[:, -1].argmax(-1)
            keep = []
            for row, (i, token) in enumerate(zip(live, nxt.tolist(), strict=True)):
                if token in ends:
                    continue
                made[i].append(token)
                rule = stops[i]
                if (
                    rule is not None
                    and rule(tokenizer.decode(made[i], skip_special_tokens=True)) is not None
                ):
                    continue
                keep.append(row)
            if not keep or step == max_new_tokens - 1:
                break
            if len(keep) < len(live):  # finished rows leave the batch and the cache
                rows = torch.tensor(keep, device=device)
                cache.batch_select_indices(rows)
                mask, pos, nxt = mask[rows], pos[rows], nxt[rows]
                live = [live[r] for r in keep]
            mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=1)
            pos = pos + 1
            out = model(
                input_ids=nxt[:, None],
                attention_mask=mask,
                position_ids=pos[:, None],
                use_cache=True,
                **{cache_kw: cache},
            )
        for i, tokens in made.items():
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            cut = stops[i](text) if stops[i] is not None else None
            texts[i] = text if cut is None else text[:cut]
    model.train(was_training)
    return texts


def generate(
    model: nn.Module,
    tokenizer,
    records: list[Record],
    max_new_tokens: int,
    batch_size: int,
) -> list[str]:
    """Greedy completions of the records' chat prompts, each stopped at its answer."""
    prompts = [
        tokenizer(render_prompt(r, tokenizer), add_special_tokens=False)["input_ids"]
        for r in records
    ]
    return greedy(
        model, tokenizer, prompts, max_new_tokens, batch_size, [stop_rule(r) for r in records]
    )
