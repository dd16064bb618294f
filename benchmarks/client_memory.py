"""Peak memory of one real client process (issue 11, item 7: a lone SmolLM2 client under 1 GB).

A ``parablock server`` and one ``parablock client`` on loopback (TLS, a token), SmolLM2-135M,
top:8, batch 4 x 256, 4 local steps, a few rounds of FedBCD and ParaBlock. The client process
holds only what a site holds: the model, its own data, the two threads. Its peak resident
memory (``VmHWM``, which counts the mapped pages of torch's libraries and of the model file it
touched) is read from the site's ``summary.json``, for each memory setting:

- ``defaults``: what a client gets without asking (bf16 forward, prefix cache, response logits);
- ``frozen bf16``: ``--frozen-dtype bf16`` (the weights no block trains held in bf16);
- ``+ recompute``: also ``--recompute`` (each layer's activations recomputed in backward);
- ``+ chunk 128``: also the server's ``train.loss_chunk=128``;
- ``... + return-memory``: also ``--return-memory`` (large allocations mapped apart, the heap
  trimmed after the model load and each step);
- ``frozen int8``, ``int8 + recompute``: ``--frozen-dtype int8`` (the frozen layers' linear
  weights in int8), ``frozen nf4`` and the rest: ``--frozen-dtype nf4`` (in 4-bit NormalFloat);
  only where torchao, the optional extra, is installed.

    .venv/bin/python benchmarks/client_memory.py            # SmolLM2, about 5 minutes
    .venv/bin/python benchmarks/client_memory.py --tiny     # seconds: a smoke check
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EMBEDDED = "smollm2-135m-instruct"
LISTENING = re.compile(r"listening on \S+ \(port (\d+),")
SETTINGS = (  # label, client flags, server --set items
    ("defaults", [], []),
    ("frozen bf16", ["--frozen-dtype", "bf16"], []),
    ("+ recompute", ["--frozen-dtype", "bf16", "--recompute"], []),
    ("+ chunk 128", ["--frozen-dtype", "bf16", "--recompute"], ["train.loss_chunk=128"]),
)
CHUNK = ["train.loss_chunk=128"]
SETTINGS += (
    (
        "bf16 + recompute + chunk 128 + return-memory",
        ["--frozen-dtype", "bf16", "--recompute", "--return-memory"],
        CHUNK,
    ),
)
if importlib.util.find_spec("torchao") is not None:
    SETTINGS += (
        ("frozen int8", ["--frozen-dtype", "int8"], []),
        ("int8 + recompute", ["--frozen-dtype", "int8", "--recompute"], []),
        ("frozen nf4", ["--frozen-dtype", "nf4"], []),
        ("nf4 + recompute + chunk 128", ["--frozen-dtype", "nf4", "--recompute"], CHUNK),
        (
            "nf4 + recompute + chunk 128 + return-memory",
            ["--frozen-dtype", "nf4", "--recompute", "--return-memory"],
            CHUNK,
        ),
    )


def exe() -> str:
    return str(Path(sys.executable).parent / "parablock")


def one(work: Path, args, algorithm: str, flags: list[str], sets: list[str]) -> dict:
    """Run a server and one client to the end; returns the site's summary."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    creds = work / "creds"
    if not creds.exists():
        subprocess.run(
            [exe(), "certs", str(creds), "--clients", "1"], check=True, env=env, capture_output=True
        )
    items = {
        "model.name_or_path": args.model,
        "model.blocks": args.blocks,
        "federation.clients": 1,
        "federation.rounds": args.rounds,
        "federation.algorithm": algorithm,
        "data.train_size": 64,
        "data.max_length": args.tokens,
        "run.out": work / "server",
        "server.address": "127.0.0.1:0",
        "server.tls_cert": creds / "server.pem",
        "server.tls_key": creds / "server.key",
        "server.clients_file": creds / "clients.toml",
    }
    cmd = [exe(), "server"]
    for k, v in items.items():
        cmd += ["--set", f"{k}={v}"]
    for s in sets:
        cmd += ["--set", s]
    log = work / "server.log"
    server = subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    client = None
    try:
        port = None
        while port is None:
            m = LISTENING.search(log.read_text())
            if m:
                port = int(m.group(1))
            elif server.poll() is not None:
                raise RuntimeError(log.read_text()[-2000:])
            else:
                time.sleep(0.2)
        site = work / "site"
        client = subprocess.run(
            [
                exe(),
                "client",
                "--server",
                f"localhost:{port}",
                "--ca",
                str(creds / "ca.pem"),
                "--id",
                "0",
                "--token-file",
                str(creds / "client-0.token"),
                "--data",
                "reasoning_gym:gsm_symbolic",
                "--model",
                args.model,
                "--out",
                str(site),
                "--threads",
                "1",
                "--log-level",
                "warning",
                *flags,
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        if client.returncode:
            raise RuntimeError(client.stdout[-2000:] + client.stderr[-2000:])
        server.wait(120)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    return json.loads((site / "summary.json").read_text())


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default=EMBEDDED)
    p.add_argument("--blocks", default="top:8")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--algorithms", default="fedbcd,parablock")
    p.add_argument("--settings", default="", help="';'-separated setting labels (default: all)")
    p.add_argument("--tiny", action="store_true", help="a smoke check on a tiny random Llama")
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="client-memory-"))
    if args.tiny:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from speed import _vocab_model

        args.model, args.blocks, args.rounds = _vocab_model(root), "top:2", 2
    rows = []
    for algorithm in args.algorithms.split(","):
        for label, flags, sets in SETTINGS:
            if args.settings and label not in args.settings.split(";"):
                continue
            work = root / f"{algorithm}-{label.replace(' ', '_').replace('+', 'and')}"
            work.mkdir()
            s = one(work, args, algorithm, flags, sets)
            rows.append(
                {
                    "algorithm": algorithm,
                    "setting": label,
                    "peak_mb": s["peak_rss_mb"],
                    "wall_s": s["wall_time_s"],
                    "precision": s["precision"],
                }
            )
            print(
                f"  {algorithm} {label}: {s['peak_rss_mb']:.0f} MB, {s['wall_time_s']:.1f}s",
                flush=True,
            )
    print(
        f"\none `parablock client` process, {Path(args.model).name}, {args.blocks}, batch 4 x "
        f"{args.tokens}, {args.rounds} rounds (peak RSS, MB = 2**20 bytes):"
    )
    print("| algorithm | setting | peak MB | client wall s |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['algorithm']} | {r['setting']} | {r['peak_mb']:.0f} | {r['wall_s']:.1f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
