"""The ``parablock`` command. Configuration is parsed here and only here.

Expected user errors (bad config, missing model, bad data, unusable run directory) print one line
``parablock: error: ...`` and exit with code 2, without a traceback.

Subcommands: ``run`` (the simulator), ``server`` / ``client`` / ``certs`` (a real networked
federation, cli_net.py), ``compare`` (every algorithm on one config, table and plots), ``report``
(plots from run directories), ``status`` (where a run stands, from its files), ``estimate`` (the
timing model), ``generate`` (try a model), ``eval`` (standard benchmarks, cli/evaluate.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from parablock.cli import evaluate as cli_evaluate
from parablock.cli import flower as cli_flower
from parablock.cli import net as cli_net
from parablock.config import help_text, load
from parablock.errors import ConfigError, RunFailed, UserError


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE.toml", help="TOML file with [section] key = value")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one key (repeatable)",
    )


def _progress_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--quiet",
        action="store_true",
        help="one plain line per round and warnings only (the default when stdout is not a "
        "terminal; on a terminal the default is a live table)",
    )


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
    _config_args(r)
    r.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue an interrupted run from its last checkpoint, with its own config.toml; "
        "--set may change only what does not change the results (link.*, run.threads, "
        "run.backend, eval.every, federation.round_timeout_s, ...; recorded in config.toml) "
        "and federation.rounds (to extend the run)",
    )
    _progress_args(r)

    c = sub.add_parser(
        "compare",
        help="run several algorithms on identical config, data, seeds and links; table and plots",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run each algorithm on the same configuration (run.out becomes the compare "
        "directory, each run goes to run.out/<algorithm>), then write compare.md, compare.json "
        "and plots/ (held-out loss by round and time, round time split, per-client timeline, "
        "bytes per round, peak memory and time to the target loss). eval.every defaults to 1 "
        "here (every round's model is evaluated, after training) unless set.",
        epilog="examples:\n"
        "  parablock compare --set run.out=runs/cmp\n"
        "  parablock compare --config configs/smollm2-math.toml --algorithms parablock,fedbcd\n"
        "  parablock compare --algorithms parablock,fedbcd,fedavg_full,cyclic --target-loss 1.1",
    )
    _config_args(c)
    _progress_args(c)
    c.add_argument(
        "--algorithms",
        default="parablock,fedbcd",
        help="comma-separated algorithms to run (default: parablock,fedbcd; also fedavg_full, "
        "cyclic)",
    )
    c.add_argument(
        "--target-loss",
        type=float,
        metavar="X",
        help="held-out loss for the time-to-target column (default: the worst of the "
        "algorithms' final losses)",
    )

    rep = sub.add_parser(
        "report",
        help="(re)draw the plots of a run or compare directory from its files",
        description="Write plots/ into RUN_DIR from its config.toml, metrics.jsonl, "
        "timeline.jsonl and summary.json (a compare directory: every run in it, on shared plots).",
    )
    rep.add_argument("run_dir", metavar="RUN_DIR")
    rep.add_argument(
        "--target-loss",
        type=float,
        metavar="X",
        help="held-out loss for the time-to-target bars (default: the worst final loss)",
    )

    st = sub.add_parser(
        "status",
        help="where a run stands, during the run or after it, from its files",
        description="Read RUN_DIR's config.toml, metrics.jsonl, lock, checkpoint/ and "
        "summary.json (never writing them) and say: running, finished or stopped; the rounds "
        "done and the time left; each client's last round and train loss; the held-out "
        "evaluations; rejected updates and dropped clients; epsilon; where the model is. A "
        "compare directory: every run in it.",
    )
    st.add_argument("run_dir", metavar="RUN_DIR")
    st.add_argument("--json", action="store_true", help="print the status as JSON")

    e = sub.add_parser(
        "estimate",
        help="per-round time of ParaBlock, FedBCD, fedavg_full and cyclic from block sizes, "
        "links and compute time",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The timing model: FedBCD round = T_comp + T_up + T_agg + T_down, ParaBlock "
        "round = max(T_comp, T_comm), block bytes from the block's real parameter counts. "
        "model.name_or_path may be a local model directory, 'smollm2-135m-instruct', or an "
        "architecture built without weights: "
        + ", ".join("arch:" + a for a in _architectures())
        + ".",
        epilog="[estimate] keys: estimate.compute_s, estimate.step_s, estimate.full_compute_s, "
        "estimate.aggregate_s, "
        "estimate.dtype {float32, bfloat16, float16}, estimate.seq_len\n"
        "other keys: model.*, federation.*, link.*, data.max_length (see parablock run --help)"
        "\n\nexamples:\n"
        "  parablock estimate --config configs/estimate-llama3-8b.toml\n"
        "  parablock estimate --measure --set federation.local_steps=2\n"
        "  parablock estimate --from-run runs/cmp",
    )
    _config_args(e)
    e.add_argument(
        "--measure", action="store_true", help="time one round of local block training here"
    )
    e.add_argument(
        "--from-run",
        metavar="RUN_DIR",
        help="predict a finished run's (or compare directory's) mean round time from its own "
        "measured compute time and links, and print predicted vs measured",
    )
    e.add_argument("--json", action="store_true", help="print the result as JSON")

    g = sub.add_parser(
        "generate",
        help="reply to a prompt with a model directory (e.g. RUN_DIR/model), chat template applied",
    )
    g.add_argument("model_dir", metavar="MODEL_DIR")
    g.add_argument("prompt", metavar="PROMPT")
    g.add_argument("--max-new-tokens", type=int, default=256, help="default: 256")
    g.add_argument(
        "--temperature", type=float, default=0.0, help="0 (the default) = greedy decoding"
    )
    g.add_argument("--seed", type=int, default=0, help="sampling seed (with --temperature)")
    cli_evaluate.add_parsers(sub)
    cli_net.add_parsers(sub, _config_args)
    cli_flower.add_parsers(sub, _config_args)
    return p


def _architectures() -> list[str]:
    from parablock.model.architectures import ARCHITECTURES

    return list(ARCHITECTURES)


def _setup_logging(level: str, quiet: bool = False) -> None:
    logging.basicConfig(
        level="WARNING" if quiet else level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def _run(args) -> int:
    from parablock.run.runner import RunInterrupted, run
    from parablock.tools.progress import make_progress

    if args.resume:
        if args.config:
            raise ConfigError("--resume takes the run's own config.toml; drop --config")
        cfg = load(
            os.path.join(args.resume, "config.toml"), [*args.overrides, f"run.out={args.resume}"]
        )
    else:
        cfg = load(args.config, args.overrides)
    _setup_logging(cfg.run.log_level, args.quiet)
    try:
        with make_progress(cfg, args.quiet) as display:
            summary = run(
                cfg, on_barrier=display.barrier, on_phase=display.phase, resume=bool(args.resume)
            )
    except RunInterrupted as e:
        print(f"parablock: {e}", file=sys.stderr)
        return 130
    from parablock.tools.status import summary_table

    print(summary_table({"run": summary}, "done:"), end="")
    return 0


def _compare(args) -> int:
    from parablock.tools.compare import compare, eval_every_given, markdown, parse_algorithms
    from parablock.tools.progress import make_progress
    from parablock.tools.status import summary_table

    cfg = load(args.config, args.overrides)
    if not eval_every_given(args.config, args.overrides):  # a loss curve for time to target
        cfg = cfg.replace(eval={"every": 1})
    algorithms = parse_algorithms(args.algorithms)
    _setup_logging(cfg.run.log_level, args.quiet)
    result = compare(
        cfg,
        algorithms,
        hooks=lambda sub: make_progress(sub, args.quiet),
        target_loss=args.target_loss,
    )
    print(markdown(result["rows"], result["notes"], result["target"]))
    out = Path(result["compare_dir"])  # each run's summary.json, for the end's table
    summaries = {
        a: json.loads((out / a / "summary.json").read_text()) for a in result["algorithms"]
    }
    print(summary_table(summaries, "done:"), end="")
    print(f"compare directory {result['compare_dir']} (compare.md, compare.json, plots/)")
    return 0


def _report(args) -> int:
    from parablock.tools.report import report

    files, notes = report(args.run_dir, args.target_loss)
    for n in notes:
        print(f"note: {n}")
    for f in files:
        print(f)
    return 0


def _status(args) -> int:
    import json
    from pathlib import Path

    from parablock.errors import ReportError
    from parablock.tools.status import format_status, status

    p = Path(args.run_dir)
    if (p / "config.toml").is_file():
        found = [status(p)]
    elif p.is_dir():  # a compare directory: each run in it
        found = [status(d) for d in sorted(p.iterdir()) if (d / "config.toml").is_file()]
    else:
        found = []
    if not found:
        raise ReportError(f"{p} is not a run directory (no config.toml in it or below it)")
    if args.json:
        print(json.dumps(found[0] if len(found) == 1 else found, indent=2))
    else:
        print("\n".join(format_status(s) for s in found), end="")
    return 0


def _estimate(args) -> int:
    from parablock.tools import estimate as est
    from parablock.tools.estimate_runs import format_from_run, from_run

    if args.from_run:
        rows = from_run(args.from_run)
        print(est.to_json(rows) if args.json else format_from_run(rows))
        return 0
    cfg, settings = est.load(args.config, args.overrides)
    measured = est.measure_compute_s(cfg, settings) if args.measure else None
    full = est.measure_compute_s(cfg, settings, whole_model=True) if args.measure else None
    result = est.estimate(cfg, settings, measured, full)
    print(est.to_json(result) if args.json else est.format_estimate(result))
    return 0


def _generate(args) -> int:
    from parablock.tools.generate import generate

    reply = generate(
        args.model_dir,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
    )
    print(reply)
    if not reply:
        print("parablock: the reply was empty (only whitespace or special tokens)", file=sys.stderr)
    return 0


COMMANDS = {
    "server": lambda args: cli_net.server(args, load, _setup_logging),
    "client": lambda args: cli_net.client(args, _setup_logging),
    "certs": cli_net.certs,
    "flower-worker": lambda args: cli_flower.worker(args, _setup_logging),
    "flower": lambda args: cli_flower.flower(args, load),
    "run": _run,
    "compare": _compare,
    "report": _report,
    "status": _status,
    "estimate": _estimate,
    "generate": _generate,
    "eval": cli_evaluate.evaluate,
}


# Commands whose process ends right after them: a client whose server vanished can leave native
# threads (gRPC's, torch's) mid-call, and tearing the interpreter down around them sometimes
# aborts ("terminate called without an active exception", SIGABRT) after the one-line error.
# Everything is written and flushed by then, so these leave without the interpreter's teardown.
EXIT_AT_ONCE = frozenset({"client", "flower-worker"})


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    code = _main(args)
    if args.command in EXIT_AT_ONCE and argv is None:  # a process of its own, not a caller's
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    return code


def _main(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights and data never come from a hub
    try:
        return COMMANDS[args.command](args)
    except UserError as e:
        print(f"parablock: error: {e}", file=sys.stderr)
        return 2
    except RunFailed as e:  # e.g. too few clients: the run cannot go on, and says why
        print(f"parablock: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("parablock: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
