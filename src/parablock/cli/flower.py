"""The Flower commands: ``parablock flower-worker`` (the persistent client beside a SuperNode)
and ``parablock flower new DIR`` (a Flower app directory that runs ParaBlock)."""

from __future__ import annotations

import argparse

from parablock.cli import net as cli_net

EXAMPLES = """\
examples (a local trial; see docs/flower.md):
  parablock flower new app --set federation.rounds=8 --set run.out=$PWD/runs/flower
  parablock flower-worker --id 0 --data gsm8k:client0.jsonl --out site-0 &
  flower-supernode --insecure --superlink 127.0.0.1:9092 --clientappio-api-address \\
      127.0.0.1:9094 --node-config "parablock-worker=\\"unix:$PWD/site-0/worker.sock\\""
  flwr run app local --stream
"""


def add_parsers(sub, config_args) -> None:
    w = sub.add_parser(
        "flower-worker",
        help="the persistent ParaBlock client beside a Flower SuperNode (holds the model, the "
        "data and the computation thread; the ClientApp hands it each message)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Load the base model and this site's own data and serve the ClientApp's "
        "hand-overs on --listen (default: a Unix socket in --out). Start the SuperNode with "
        "--node-config 'parablock-worker=\"unix:SOCKET\"'. The ServerApp decides the training "
        "settings; checkpoints, metrics.jsonl and summary.json go to --out.",
        epilog=EXAMPLES,
    )
    w.add_argument("--id", dest="client", type=int, required=True, help="this client's id (0..N-1)")
    w.add_argument(
        "--listen",
        default="",
        metavar="ADDRESS",
        help="where the ClientApp reaches this worker: unix:/abs/path.sock or 127.0.0.1:PORT "
        "(default: unix:<--out>/worker.sock)",
    )
    w.add_argument(
        "--handover-timeout-s",
        type=float,
        default=3600.0,
        metavar="S",
        help="how long one hand-over may wait for the client to need the server (default 3600)",
    )
    cli_net.site_args(w)

    f = sub.add_parser("flower", help="Flower tools: `parablock flower new DIR`")
    fsub = f.add_subparsers(dest="flower_command", required=True)
    n = fsub.add_parser(
        "new",
        help="write a Flower app directory (pyproject.toml, ServerApp, ClientApp, "
        "parablock.toml) that runs ParaBlock with `flwr run`",
    )
    n.add_argument("dir", metavar="DIR")
    config_args(n)


def worker(args, setup_logging) -> int:
    from parablock.flower.worker import run_worker

    setup_logging(args.log_level)
    o = cli_net.site_options(args, server="flower", token_file="")
    return cli_net.run_and_say(lambda: run_worker(o, args.listen, args.handover_timeout_s), o)


def flower(args, load) -> int:
    from parablock.flower.template import new_app, refuse_secure_aggregation

    cfg = load(args.config, args.overrides)  # a bad key: one line, before anything is written
    refuse_secure_aggregation(cfg)  # before an app is written (docs/flower.md says why)
    d = cfg.data  # simulated nodes: one source each (the clients' own, else the run's source)
    sources = d.client_sources or ";".join([d.source] * cfg.federation.clients)
    root = new_app(args.dir, cfg.to_toml(), sources=sources, model=cfg.model.name_or_path)
    print(f"wrote the Flower app {root}: run it with `flwr run {root} <superlink connection>`")
    return 0
