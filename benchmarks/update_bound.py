"""The default update bound (``federation.update_bound``, ``core/trust.py``) on honest updates.

Runs the default federation (SmolLM2-135M, 2 ParaBlock clients, top:8 blocks, 4 AdamW steps at
lr 1e-3, batch 4) for a few rounds per setting and records, for every update the server checks,
how far it goes towards the bound (the largest |delta| / bound over its coordinates; the server
refuses above ``MARGIN``), its L2 norm, and the L2 norm of the block it moves. Prints one row per
setting: the ratio's median and maximum, the margin the default leaves (``MARGIN`` / largest
ratio), and the norms.

    .venv/bin/python benchmarks/update_bound.py              # SmolLM2, 6 rounds per setting
    .venv/bin/python benchmarks/update_bound.py --tiny       # the tiny random Llama: a smoke check
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from parablock.config import from_dict  # noqa: E402
from parablock.core import trust  # noqa: E402
from parablock.run.runner import run  # noqa: E402

SETTINGS = {  # name -> federation/link overrides on the defaults
    "defaults": {},
    "int8 deltas": {"link": {"compression": "int8"}},
    "lr 1e-2 wd 0.1": {"federation": {"lr": 1e-2, "weight_decay": 0.1}},
    "8 steps warm-up 2 cosine": {
        "federation": {"local_steps": 8, "warmup_steps": 2, "lr_schedule": "cosine"}
    },
}


def measure(args, name: str, extra: dict, out: Path) -> dict:
    seen: list[tuple[float, float, float]] = []  # (ratio, |delta|, |block|)
    excess = trust.UpdateBound.excess

    def recording(self, delta, value, step=1 << 20):
        ratio = excess(self, delta, value, step)
        norm = float(torch.sqrt(sum((t.double() ** 2).sum() for t in delta.values())))
        block = float(torch.sqrt(sum((value[n].double() ** 2).sum() for n in delta)))
        seen.append((ratio, norm, block))
        return ratio

    cfg = {
        "model": {"name_or_path": args.model},
        "federation": {"rounds": args.rounds, **extra.get("federation", {})},
        "link": {"up_mbps": 1e9, "down_mbps": 1e9, "latency_ms": 0.0, **extra.get("link", {})},
        "eval": {"size": 8, "accuracy_size": 0},
        "run": {"out": str(out / name.replace(" ", "_")), "log_level": "warning"},
    }
    if args.tiny:
        cfg["model"]["blocks"] = "all"
        cfg["data"] = {"train_size": 32, "max_length": 128}
    trust.UpdateBound.excess = recording
    try:
        summary = run(from_dict(cfg))
    finally:
        trust.UpdateBound.excess = excess
    ratios = [r for r, _, _ in seen]
    return {
        "setting": name,
        "updates": len(seen),
        "rejected": summary["updates_rejected"],
        "median_ratio": statistics.median(ratios),
        "max_ratio": max(ratios),
        "margin": trust.MARGIN / max(ratios),
        "max_delta_norm": max(n for _, n, _ in seen),
        "max_relative_norm": max(n / b for _, n, b in seen),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama (smoke check)")
    p.add_argument("--settings", default=";".join(SETTINGS), help="';'-separated names")
    p.add_argument("--out", default="")
    args = p.parse_args()
    if args.tiny:
        sys.path.insert(0, str(Path(__file__).parent))
        from ray_overhead import tiny_model_dir

        args.model = tiny_model_dir(Path(tempfile.mkdtemp(prefix="parablock-bound-")))
    out = Path(args.out or tempfile.mkdtemp(prefix="parablock-bound-"))
    rows = [measure(args, n, SETTINGS[n], out) for n in args.settings.split(";")]
    print(
        f"\nhonest updates against the bound (refused above {trust.MARGIN:g}x); "
        f"{args.rounds} rounds of {args.model}"
    )
    print(
        "| setting | updates | rejected | median ratio | max ratio | margin left "
        "| max L2 norm | max L2 / block L2 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['setting']} | {r['updates']} | {r['rejected']} | {r['median_ratio']:.3f} "
            f"| {r['max_ratio']:.3f} | {r['margin']:.2f}x | {r['max_delta_norm']:.3g} "
            f"| {r['max_relative_norm']:.3%} |"
        )
    (out / "update_bound.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
