"""The ClientApp: a thin hand-over between Flower and this node's ParaBlock worker.

Flower starts it for each message. It passes the message's frames to the worker
(``parablock flower-worker``, at the address in the SuperNode's node config key
``parablock-worker``) over one local gRPC stream and returns the worker's frames as its reply:
the round's aggregate goes in, the next update comes out, and Flower moves both while the worker
already trains the next block. It imports no torch and parses nothing: the worker checks what
comes from the server and the ServerApp what comes from the worker.
"""

from __future__ import annotations

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
