"""``parablock eval MODEL_DIR --tasks ...``: standard benchmarks on a saved model through the
lm-evaluation-harness (``evaluation/harness.py``), with local task files only."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from parablock.errors import ConfigError

EXAMPLES = """\
task specs (comma-separated; see docs/evaluation.md):
  gsm8k:PATH.jsonl                 GSM8K items from a local file (question, answer)
  reasoning_gym:TASK[?k=v&k=v]     a reasoning-gym task, generated offline
  syllogism_choice                 Yes/No syllogisms scored by log-likelihood

examples:
  parablock eval runs/smoke/model --tasks syllogism_choice --limit 16
  parablock eval smollm2-135m-instruct --tasks gsm8k:data/gsm8k/test.jsonl,syllogism_choice
  parablock eval runs/cmp/parablock/model --tasks reasoning_gym:basic_arithmetic --json
"""


def add_parsers(sub) -> None:
    e = sub.add_parser(
        "eval",
        help="standard benchmarks on a model directory (e.g. RUN_DIR/model) through the "
        "lm-evaluation-harness, local task files only",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Evaluate MODEL_DIR (a run's model/ directory, any local Hugging Face model "
        "directory, or 'smollm2-135m-instruct') on local tasks with EleutherAI's "
        "lm-evaluation-harness. Nothing is downloaded: the task data are local files or "
        "generated here.",
        epilog=EXAMPLES,
    )
    e.add_argument("model_dir", metavar="MODEL_DIR")
    e.add_argument("--tasks", required=True, help="comma-separated task specs (below)")
    e.add_argument("--limit", type=int, default=64, help="items per task (default: 64)")
    e.add_argument("--batch-size", type=int, default=8, help="default: 8")
    e.add_argument(
        "--max-new-tokens", type=int, default=256, help="tokens generated per item (default: 256)"
    )
    e.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    e.add_argument(
        "--seed", type=int, default=0, help="seed of generated tasks and the harness (default: 0)"
    )
    e.add_argument(
        "--no-chat-template",
        action="store_true",
        help="prompt with the raw text instead of a user turn in the tokenizer's chat template",
    )
    e.add_argument("--json", action="store_true", help="print the results as JSON")
    e.add_argument("--out", metavar="FILE", help="also write the results as JSON to FILE")


def _settings(args):
    from parablock.evaluation.harness import HarnessSettings

    for name, value, low in (
        ("--limit", args.limit, 1),
        ("--batch-size", args.batch_size, 1),
        ("--max-new-tokens", args.max_new_tokens, 1),
        ("--threads", args.threads, 0),
        ("--seed", args.seed, 0),
    ):
        if value < low:
            raise ConfigError(f"{name}={value} must be >= {low}")
    return HarnessSettings(
        size=args.limit,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        chat_template=not args.no_chat_template,
        threads=args.threads,
    )


def evaluate(args) -> int:
    from parablock.evaluation.harness import run_tasks, table
    from parablock.evaluation.tasks import parse_tasks, split_tasks
    from parablock.model.load import load_model, load_tokenizer

    settings = _settings(args)
    specs = split_tasks(args.tasks)
    if not specs:
        raise ConfigError("--tasks is empty; e.g. --tasks syllogism_choice")
    parse_tasks(specs)  # a bad name fails before the model loads
    out = Path(args.out) if args.out else None
    if out is not None and out.is_dir():
        raise ConfigError(f"--out={args.out} is a directory; name a file")
    tokenizer = load_tokenizer(args.model_dir)
    model = load_model(args.model_dir)
    results = run_tasks(model, tokenizer, specs, settings)
    record = {"model": args.model_dir, "results": results}
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=2) + "\n")
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        print(table(results), end="")
    sys.stdout.flush()
    return 0
