"""The ``parablock`` command. Configuration is parsed here and only here.

Expected user errors (bad config, missing model, bad data, unusable run directory) print one line
``parablock: error: ...`` and exit with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from parablock.config import ConfigError, help_text, load


def _user_errors() -> tuple[type[BaseException], ...]:
    from parablock.blocks import BlockError
    from parablock.data import DataError
    from parablock.model import ModelError
    from parablock.registry import UnknownNameError
    from parablock.runner import RunDirError

    return (ConfigError, BlockError, DataError, ModelError, UnknownNameError, RunDirError)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="parablock",
        description="Federated block-coordinate fine-tuning of LLMs with ParaBlock "
        "(communication and computation in parallel) or FedBCD (sequential).",
    )
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser(
        "run",
        help="run one federated fine-tuning job",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run one federated fine-tuning job. With no options it fine-tunes the embedded "
        "SmolLM2-135M-Instruct on generated GSM8K-style math with 2 ParaBlock clients "
        "(a few minutes on 2 CPU cores).",
        epilog="configuration keys (set with --set section.key=value or in a TOML file):\n\n"
        + help_text()
        + "\n\nexamples:\n"
        "  parablock run\n"
        "  parablock run --set federation.algorithm=fedbcd --set run.out=runs/fedbcd\n"
        "  parablock run --set link.up_mbps=inf --set link.down_mbps=inf",
    )
    r.add_argument("--config", metavar="FILE.toml", help="TOML file with [section] key = value")
    r.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one key (repeatable)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights and data never come from a hub
    try:
        cfg = load(args.config, args.overrides)
        logging.basicConfig(
            level=cfg.run.log_level.upper(),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            datefmt="%H:%M:%S",
        )
        from parablock.runner import run

        summary = run(cfg)
    except _user_errors() as e:
        print(f"parablock: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("parablock: interrupted", file=sys.stderr)
        return 130
    acc = ""
    if summary["final_eval_accuracy"] is not None:
        acc = (
            f", accuracy {summary['initial_eval_accuracy']:.3f} -> "
            f"{summary['final_eval_accuracy']:.3f}"
        )
    print(
        f"done: held-out loss {summary['initial_eval_loss']:.4f} -> "
        f"{summary['final_eval_loss']:.4f}{acc}, wall {summary['wall_time_s']:.1f}s; "
        f"run directory {summary['run_dir']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
