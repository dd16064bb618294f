"""What scoring by generation costs: seconds for N held-out items, before and after.

``hf`` is how accuracy was computed before (``model.generate``, batches of 8 in item order,
every batch running until all its rows end their turn or reach ``--max-new-tokens``);
``parablock`` is ``evaluation/generate.py`` (prompts sorted by length, finished rows leave the
batch, each completion stopped at its answer). Both are greedy on the same model and items;
the table gives seconds, generated tokens per item and accuracy.

    python benchmarks/generation.py                                # SmolLM2, the default task
    python benchmarks/generation.py --task gsm_symbolic --items 8,64
    python benchmarks/generation.py --modes parablock --batch 8,32,64
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from parablock.data.examples import render_prompt  # noqa: E402
from parablock.data.sources import parse_sources  # noqa: E402
from parablock.evaluation.evaluate import scorer_for  # noqa: E402
from parablock.evaluation.generate import generate  # noqa: E402
from parablock.model.load import load_model, load_tokenizer  # noqa: E402


def hf_generate(model, tokenizer, records, max_new_tokens: int, batch_size: int) -> list[str]:
    """The previous way: ``model.generate`` on batches in item order, no stop at the answer."""
    from transformers import GenerationConfig

    gen = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    out = []
    for i in range(0, len(records), batch_size):
        texts = [render_prompt(r, tokenizer) for r in records[i : i + batch_size]]
        batch = tokenizer(
            texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
        )
        with torch.no_grad():
            ids = model.generate(**batch, generation_config=gen)
        out += tokenizer.batch_decode(
            ids[:, batch["input_ids"].shape[1] :], skip_special_tokens=True
        )
    return out


MODES = {"hf": hf_generate, "parablock": generate}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--task", default="reasoning_gym:gsm_symbolic", help="a data.source")
    p.add_argument("--items", default="8,64")
    p.add_argument("--modes", default="hf,parablock")
    p.add_argument("--batch", default="8", help="generation batch sizes to try")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model).eval(), load_tokenizer(args.model)
    items = [int(x) for x in args.items.split(",")]
    ((source, _),) = parse_sources(args.task)
    _, records = source.draw(0, max(items), seed=0)
    print("| task | items | mode | batch | seconds | tokens/item | accuracy |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for n in items:
        for mode in args.modes.split(","):
            for bs in (int(x) for x in args.batch.split(",")):
                recs = records[:n]
                t = time.perf_counter()
                outs = MODES[mode](model, tok, recs, args.max_new_tokens, bs)
                secs = time.perf_counter() - t
                made = sum(len(tok(o, add_special_tokens=False)["input_ids"]) for o in outs)
                acc = (
                    sum(scorer_for(r)(o, r)[1] >= 1.0 for r, o in zip(recs, outs, strict=True)) / n
                )
                print(
                    f"| {source.name} | {n} | {mode} | {bs} | {secs:.1f} | {made / n:.1f} | "
                    f"{acc:.3f} |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
