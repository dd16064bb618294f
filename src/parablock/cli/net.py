"""The networked federation's commands: ``parablock server``, ``parablock client``, ``parablock certs``.

``server`` takes the same config as ``run`` (plus the ``[server]`` section); ``client`` takes only
what a data owner's site knows (where the server is, its credentials, its own data and model);
``certs`` writes what a trial needs (test CA, server certificate, one token per client, the
server's clients file with the tokens' hashes).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

EXAMPLES_SERVER = """examples:
  parablock certs creds --clients 2 --hosts coordinator.example
  parablock server --config fed.toml --set server.address=0.0.0.0:8470 \\
      --set server.tls_cert=creds/server.pem --set server.tls_key=creds/server.key \\
      --set server.clients_file=creds/clients.toml
"""
EXAMPLES_CLIENT = """examples:
  parablock client --server coordinator.example:8470 --ca creds/ca.pem --id 0 \\
      --token-file creds/client-0.token --data gsm8k:/data/site0/train.jsonl --out site0
  # the same command again after a crash or a lost connection rejoins from site0/checkpoint
"""


def add_parsers(sub, config_args) -> None:
    s = sub.add_parser(
        "server",
        help="serve a federated run to remote clients over gRPC (TLS, per-client tokens)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Hold the global model, hand the training settings to every client at "
        "join, aggregate their block updates and write the run directory (config.toml, "
        "metrics.jsonl, timeline.jsonl from the clients' reports, summary.json, checkpoint/, "
        "model/). Training data never reaches the server; it evaluates on eval.source if "
        "set. Takes every key of `parablock run --help`, plus [server]: server.address, "
        "server.tls_cert, server.tls_key, server.client_ca, server.insecure, "
        "server.clients_file, server.join_timeout_s, server.metrics_address (a Prometheus "
        "endpoint).",
        epilog=EXAMPLES_SERVER,
    )
    config_args(s)
    s.add_argument(
        "--quiet", action="store_true", help="warnings only (default: joins and one line a round)"
    )
    s.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue a server run that stopped or crashed, from its checkpoint (its own "
        "config.toml; --set may change [server] keys); clients rejoin with theirs",
    )

    c = sub.add_parser(
        "client",
        help="take part in a `parablock server` run from this machine, with this machine's data",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Load the base model and this site's own data, join the server, train the "
        "blocks it asks for (two threads: compute and communication) and keep checkpoints in "
        "--out. The server decides the training settings.",
        epilog=EXAMPLES_CLIENT,
    )
    c.add_argument("--server", required=True, metavar="HOST:PORT", help="the server's address")
    c.add_argument("--id", dest="client", type=int, required=True, help="this client's id (0..N-1)")
    c.add_argument(
        "--token-file", required=True, metavar="FILE", help="this client's token (keep it secret)"
    )
    c.add_argument("--ca", metavar="FILE", default="", help="CA that signed the server's cert")
    c.add_argument("--cert", metavar="FILE", default="", help="client certificate (mutual TLS)")
    c.add_argument("--key", metavar="FILE", default="", help="client key (mutual TLS)")
    c.add_argument(
        "--insecure", action="store_true", help="plain text (only against server.insecure=true)"
    )
    site_args(c)

    k = sub.add_parser(
        "certs",
        help="make a test CA, a server certificate, client tokens and the clients file",
        description="Write DIR/ca.pem, DIR/ca.key, DIR/server.pem, DIR/server.key, one "
        "DIR/client-<id>.token per client and DIR/clients.toml (the tokens' hashes, for "
        "server.clients_file). For trials; bring your own CA in production (see docs/deploying.md).",
    )
    k.add_argument("dir", metavar="DIR")
    k.add_argument("--clients", type=int, required=True, help="how many clients (ids 0..N-1)")
    k.add_argument(
        "--hosts",
        default="",
        help="comma-separated names/IPs the clients dial (localhost and 127.0.0.1 always)",
    )
    k.add_argument(
        "--client-certs", action="store_true", help="also client certificates (mutual TLS)"
    )


def site_args(p) -> None:
    """The options of a client at its own site (``client`` and ``flower-worker``)."""
    p.add_argument(
        "--data",
        required=True,
        metavar="SOURCE",
        help="this site's training data, any data.source syntax (e.g. gsm8k:train.jsonl, "
        "alpaca:a.json, reasoning_gym:gsm_symbolic)",
    )
    p.add_argument(
        "--model",
        default="smollm2-135m-instruct",
        help="local model directory, or arch:<preset>[@seed] (random weights, built alike everywhere); "
        "must be the server's base model (default: embedded SmolLM2)",
    )
    p.add_argument("--out", default="", help="this site's directory (default: site-<id>)")
    p.add_argument(
        "--threads", type=int, default=0, metavar="N", help="torch threads (default: all cores)"
    )
    p.add_argument(
        "--device",
        default="cpu",
        metavar="DEVICE",
        help="where this site trains: cpu, cuda or cuda:N (the model on that GPU, the forward in "
        "bf16 autocast where train.precision is auto or bf16; default: cpu)",
    )
    p.add_argument(
        "--emulate-up-mbps",
        type=float,
        default=None,
        metavar="MBPS",
        help="pace uploads as if the link had this speed (default: the network's own)",
    )
    p.add_argument(
        "--emulate-down-mbps",
        type=float,
        default=None,
        metavar="MBPS",
        help="pace downloads likewise",
    )
    p.add_argument(
        "--emulate-latency-ms", type=float, default=0.0, metavar="MS", help="add this latency"
    )
    p.add_argument(
        "--compute-slowdown",
        type=float,
        default=1.0,
        metavar="F",
        help="for studies of slow clients: take F (>= 1) times the compute time (a simulation's "
        "federation.compute_slowdown for this client)",
    )
    p.add_argument(
        "--frozen-dtype",
        default="fp32",
        choices=("fp32", "bf16", "int8", "nf4"),
        help="hold the weights no block trains in bf16 (about half the client's memory for "
        "them; int8: the frozen layers' linear weights in int8 too, nf4: in 4-bit NormalFloat, "
        "both with torchao installed); "
        "needs the server's train.precision to be bf16 or auto on a bf16 device; the trained "
        "blocks stay fp32 and equal to the server's; default fp32",
    )
    p.add_argument(
        "--recompute",
        action="store_true",
        help="keep only each layer's input during a step and recompute the layer in backward: "
        "far less activation memory, about a quarter more compute, the same results",
    )
    p.add_argument(
        "--return-memory",
        action="store_true",
        help="give freed memory back to the system as it goes: allocations of 256 KiB or more "
        "mapped apart (glibc's M_MMAP_THRESHOLD) and the heap trimmed after loading the model "
        "and after each step (glibc only; a lower peak, a little more time)",
    )
    p.add_argument(
        "--reconnect-s",
        type=float,
        default=300.0,
        metavar="S",
        help="after losing a server it had joined, keep trying to rejoin for this long "
        "(from its checkpoint) before giving up (default: 300; 0 = give up at once)",
    )
    p.add_argument(
        "--faults",
        default="",
        metavar="SPEC",
        help="fault injection for tests and benchmarks (run.faults syntax, e.g. 'nan@0:3,"
        "crash~0.05'): this client's uploads go wrong on purpose",
    )
    p.add_argument(
        "--stall-s",
        type=float,
        default=30.0,
        metavar="S",
        help="with --faults: how long an injected stall lasts (default: 30; make it outlast "
        "the server's federation.round_timeout_s)",
    )
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning"))


def site_options(args, **transport):
    """``SiteOptions`` from the ``site_args`` options and the transport's own."""
    from parablock.run.site import SiteOptions

    return SiteOptions(
        client=args.client,
        data=args.data,
        model=args.model,
        out=args.out,
        threads=args.threads,
        device=args.device,
        up_mbps=args.emulate_up_mbps,
        down_mbps=args.emulate_down_mbps,
        latency_ms=args.emulate_latency_ms,
        slowdown=args.compute_slowdown,
        frozen_dtype=args.frozen_dtype,
        recompute=args.recompute,
        return_memory=args.return_memory,
        reconnect_s=args.reconnect_s,
        faults=args.faults,
        stall_s=args.stall_s,
        **transport,
    )


def server(args, load, setup_logging) -> int:
    from parablock.errors import ConfigError
    from parablock.run.runner import RunInterrupted, run

    if args.resume:
        if args.config:
            raise ConfigError("--resume takes the run's own config.toml; drop --config")
        bad = [o for o in args.overrides if not o.strip().startswith("server.")]
        if bad:
            raise ConfigError(
                f"--resume keeps the run's settings; only server.* may change: {bad[0]}"
            )
        cfg = load(Path(args.resume) / "config.toml", [*args.overrides, f"run.out={args.resume}"])
    else:
        cfg = load(args.config, args.overrides)
    setup_logging(cfg.run.log_level, args.quiet)
    logging.getLogger("parablock").setLevel(logging.WARNING if args.quiet else logging.INFO)
    try:
        summary = run(cfg, serve=True, resume=bool(args.resume))
    except RunInterrupted as e:
        print(f"parablock: {e}", file=sys.stderr)
        return 130
    from parablock.tools.status import summary_table

    print(summary_table({"server": summary}, "done:"), end="")
    return 0


def client(args, setup_logging) -> int:
    from parablock.run.site import run_site

    setup_logging(args.log_level)
    o = site_options(
        args,
        server=args.server,
        token_file=args.token_file,
        ca=args.ca,
        cert=args.cert,
        key=args.key,
        insecure=args.insecure,
    )
    return run_and_say(lambda: run_site(o), o)


def run_and_say(go, o) -> int:
    """Run a site to its end (``client`` or ``flower-worker``) and say how it ended."""
    from parablock.errors import BudgetSpent, RunStopped

    try:
        summary = go()
    except BudgetSpent as e:  # the site's own privacy budget: a clean end, its checkpoint kept
        print(f"stopped: {e}")
        return 0
    except RunStopped as e:
        print(f"parablock: error: the server stopped the run ({e})", file=sys.stderr)
        return 1
    print(
        f"done: client {summary['client']}, {summary['rounds']} rounds, "
        f"{summary['bytes_up'] / 1e6:.1f} MB up, {summary['bytes_down'] / 1e6:.1f} MB down; "
        f"site directory {o.out_dir()}"
    )
    return 0


def certs(args) -> int:
    from parablock.transport.certs import make_client_cert, make_trial_credentials

    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    files = make_trial_credentials(args.dir, args.clients, hosts)
    if args.client_certs:
        for i in range(args.clients):
            files += list(make_client_cert(args.dir, i))
    for f in files:
        print(f)
    print(
        f"give client i {args.dir}/ca.pem and its own {args.dir}/client-<i>.token; keep ca.key, "
        "server.key and the tokens secret",
        file=sys.stderr,
    )
    return 0
