"""Quality benchmark: does federated block training improve held-out loss and accuracy, and does
ParaBlock match FedBCD after the same rounds?

On SmolLM2-135M with 4 clients and a non-IID (Dirichlet) split:
  1. GSM8K train -> held-out loss on a fixed subset of GSM8K *test* (and accuracy on its first
     --gsm8k-accuracy items): base vs ParaBlock vs FedBCD;
  2. an Alpaca subset -> held-out loss: base vs ParaBlock;
  3. reasoning-gym basic_arithmetic (2 terms, 2 digits) -> accuracy: base vs ParaBlock.
Target: ParaBlock's final held-out loss within 2% of FedBCD's, both clearly below the base model's.

GSM8K and Alpaca records carry no category, so their non-IID split is Dirichlet quantity skew
(unequal client sizes); links are unlimited because this measures quality, not time.

    python benchmarks/quality.py                  # the full benchmark (about 25 min on 2 cores)
    python benchmarks/quality.py --quick          # a smoke check with tiny sizes
    python benchmarks/quality.py --quick --model /path/to/tiny-model
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from parablock.config import from_dict  # noqa: E402
from parablock.run.runner import run  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _config(args, out: Path, algorithm: str, data: dict, ev: dict) -> dict:
    return {
        "model": {"name_or_path": args.model, "blocks": args.blocks},
        "data": {
            "train_size": args.train_size,
            "max_length": args.max_length,
            "partition": "dirichlet",
            "alpha": args.alpha,
            **data,
        },
        "federation": {
            "algorithm": algorithm,
            "clients": args.clients,
            "rounds": args.rounds,
            "local_steps": args.local_steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
        },
        "link": {"up_mbps": float("inf"), "down_mbps": float("inf"), "latency_ms": 0.0},
        "eval": {"batch_size": 8, "every": 0, **ev},
        "run": {"out": str(out), "seed": args.seed, "log_level": "warning"},
    }


def _run(args, name: str, algorithm: str, data: dict, ev: dict) -> dict:
    out = args.out / f"{name}-{algorithm}"
    print(f"running {name} / {algorithm} -> {out}", file=sys.stderr, flush=True)
    return run(from_dict(_config(args, out, algorithm, data, ev)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=REPO / ".." / "shared" / "data")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--blocks", default="top:8")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--local-steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--train-size", type=int, default=1024)
    p.add_argument("--max-length", type=int, default=320)
    p.add_argument("--gsm8k-eval", type=int, default=200, help="fixed GSM8K test subset (loss)")
    p.add_argument("--gsm8k-accuracy", type=int, default=16, help="of which scored by generation")
    p.add_argument("--gsm8k-new-tokens", type=int, default=160)
    p.add_argument("--alpaca-eval", type=int, default=100)
    p.add_argument("--arith-eval", type=int, default=64)
    p.add_argument("--arith-accuracy", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default="gsm8k,alpaca,arith", help="which experiments to run")
    p.add_argument("--out", type=Path, default=None, help="run directories (default: a temp dir)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke check in ~a minute")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.local_steps, args.train_size = 2, 1, 32
        args.gsm8k_eval, args.gsm8k_accuracy, args.gsm8k_new_tokens = 8, 2, 8
        args.alpaca_eval, args.arith_eval, args.arith_accuracy = 8, 8, 4
    args.out = args.out or Path(tempfile.mkdtemp(prefix="parablock-quality-"))
    logging.basicConfig(level=logging.WARNING)
    gsm = args.data_dir / "gsm8k"
    alpaca = args.data_dir / "alpaca" / "alpaca_5000.json"
    only = set(args.only.split(","))
    if only & {"gsm8k", "alpaca"} and not (gsm.is_dir() and alpaca.is_file()):
        p.error(f"{args.data_dir} lacks gsm8k/ or alpaca/alpaca_5000.json (see --data-dir)")

    rows: list[dict] = []
    if "gsm8k" in only:
        data = {"source": f"gsm8k:{gsm / 'train.jsonl'}"}
        ev = {
            "source": f"gsm8k:{gsm / 'test.jsonl'}",  # never trained on
            "size": args.gsm8k_eval,
            "accuracy_size": args.gsm8k_accuracy,
            "max_new_tokens": args.gsm8k_new_tokens,
        }
        for alg in ("parablock", "fedbcd"):
            s = _run(args, "gsm8k", alg, data, ev)
            rows.append({"experiment": "gsm8k", "algorithm": alg, **_pick(s)})
    if "alpaca" in only:
        data = {"source": f"alpaca:{alpaca}"}
        ev = {"size": args.alpaca_eval, "accuracy_size": 0}
        s = _run(args, "alpaca", "parablock", data, ev)
        rows.append({"experiment": "alpaca", "algorithm": "parablock", **_pick(s)})
    if "arith" in only:
        data = {"source": "reasoning_gym:basic_arithmetic?max_terms=2&max_digits=2"}
        ev = {"size": args.arith_eval, "accuracy_size": args.arith_accuracy, "max_new_tokens": 16}
        s = _run(args, "arith", "parablock", data, ev)
        rows.append({"experiment": "arith", "algorithm": "parablock", **_pick(s)})

    _table(rows)
    verdict = _check(rows)
    result = {"settings": {k: str(v) for k, v in vars(args).items()}, "rows": rows, **verdict}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(verdict))
    return 0


def _pick(s: dict) -> dict:
    keys = (
        "initial_eval_loss",
        "final_eval_loss",
        "initial_eval_accuracy",
        "final_eval_accuracy",
        "eval_loss_size",
        "eval_accuracy_size",
        "wall_time_s",
        "run_dir",
    )
    return {k: s.get(k) for k in keys}


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _table(rows: list[dict]) -> None:
    head = f"{'experiment':<10} {'algorithm':<10} {'loss base':>9} {'loss after':>10} "
    head += f"{'acc base':>8} {'acc after':>9} {'n loss/acc':>10} {'wall s':>7}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['experiment']:<10} {r['algorithm']:<10} {_fmt(r['initial_eval_loss'], '.4f'):>9} "
            f"{_fmt(r['final_eval_loss'], '.4f'):>10} {_fmt(r['initial_eval_accuracy'], '.3f'):>8} "
            f"{_fmt(r['final_eval_accuracy'], '.3f'):>9} "
            f"{str(r['eval_loss_size']) + '/' + str(r['eval_accuracy_size']):>10} "
            f"{r['wall_time_s']:>7.1f}"
        )


def _check(rows: list[dict]) -> dict:
    """ParaBlock's final loss within 2% of FedBCD's, both at least 2% below the base model's."""
    by = {(r["experiment"], r["algorithm"]): r for r in rows}
    pb, fb = by.get(("gsm8k", "parablock")), by.get(("gsm8k", "fedbcd"))
    if not (pb and fb):
        return {"target": "not checked (needs the gsm8k experiment)"}
    gap = abs(pb["final_eval_loss"] - fb["final_eval_loss"]) / fb["final_eval_loss"]
    base = pb["initial_eval_loss"]
    below = all(r["final_eval_loss"] < 0.98 * base for r in (pb, fb))
    ok = gap <= 0.02 and below
    print(
        f"\nParaBlock vs FedBCD final held-out loss gap: {gap:.2%} (target <= 2%); "
        f"both >= 2% below base {base:.4f}: {below} -> {'PASS' if ok else 'FAIL'}"
    )
    return {"loss_gap": gap, "both_below_base": below, "target_met": ok}


if __name__ == "__main__":
    sys.exit(main())
