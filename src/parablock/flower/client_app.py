"""The ClientApp: a thin hand-over between Flower and this node's ParaBlock worker.

Flower starts it for each message. It passes the message's frames to the worker
(``parablock flower-worker``, at the address in the SuperNode's node config key
``parablock-worker``) over one local gRPC stream and returns the worker's frames as its reply:
the round's aggregate goes in, the next update comes out, and Flower moves both while the worker
already trains the next block. It imports no torch and parses nothing: the worker checks what
comes from the server and the ServerApp what comes from the worker.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from parablock.flower.frames import from_record, to_record

WORKER_KEY = "parablock-worker"
TIMEOUT_KEY = "handover-timeout-s"
METHOD = "/parablock.v1.Worker/HandOver"
OPTIONS = [("grpc.max_send_message_length", 1 << 30), ("grpc.max_receive_message_length", 1 << 30)]

app = ClientApp()


@app.query()
def hand_over(message: Message, context: Context) -> Message:
    address = context.node_config.get(WORKER_KEY)
    if "partition-id" in context.node_config and not address:
        address = simulated_worker(context, message.metadata.run_id)
    if not isinstance(address, str) or not address:
        raise RuntimeError(
            f"this SuperNode has no {WORKER_KEY!r} in its node config: start it with "
            f"--node-config '{WORKER_KEY}=\"unix:/path/to/site/worker.sock\"' beside "
            "`parablock flower-worker`"
        )
    timeout = float(context.run_config.get(TIMEOUT_KEY, 3600.0))
    frames = from_record(message.content)
    with grpc.insecure_channel(address, options=OPTIONS) as channel:
        call = channel.stream_stream(METHOD)
        out = list(call(iter(frames), timeout=timeout + 60.0))
    return Message(to_record(out), reply_to=message)


def simulated_worker(context: Context, run_id: int) -> str:
    """In Flower's Simulation Engine there is no SuperNode to start a worker beside: the first
    ClientApp of each simulated node starts one (``parablock flower-worker`` as a process of its
    own, which lives until the run's end or ``--handover-timeout-s`` without a message) and the
    later ones reuse it. Its data is the node's entry of the run config's ``parablock-sources``
    (one data source per partition, ``;``-separated), its directory ``parablock-sites/site-<id>``.
    """
    client = int(context.node_config["partition-id"])
    rc = context.run_config
    sources = [x.strip() for x in str(rc.get("parablock-sources", "")).split(";") if x.strip()]
    if not 0 <= client < len(sources):
        raise RuntimeError(
            f"simulated node {client}: the run config's parablock-sources names "
            f"{len(sources)} source(s), one per partition is needed"
        )
    root = str(rc.get("parablock-sites", "")) or os.path.join(
        tempfile.gettempdir(), f"parablock-flower-run{run_id}"
    )
    out = Path(root) / f"site-{client}"
    sock = out / "worker.sock"
    out.mkdir(parents=True, exist_ok=True)
    try:  # the first ClientApp of this node starts the worker; the others find it
        fd = os.open(out / "worker.pid", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        fd = None
    if fd is not None:
        args = [sys.executable, "-m", "parablock.cli", "flower-worker", "--id", str(client)]
        args += ["--data", sources[client], "--out", str(out), "--log-level", "warning"]
        args += ["--model", str(rc.get("parablock-model", "smollm2-135m-instruct"))]
        args += ["--threads", str(rc.get("parablock-threads", 1))]
        args += ["--handover-timeout-s", str(rc.get(TIMEOUT_KEY, 3600.0))]
        with open(out / "worker.log", "a") as log:
            proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        os.write(fd, f"{proc.pid}\n".encode())
        os.close(fd)
    deadline = time.monotonic() + 120.0
    while not sock.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the worker of simulated node {client} did not start: {out}")
        time.sleep(0.1)
    return f"unix:{sock}"
