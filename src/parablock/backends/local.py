"""The local backend: the server and every client in this process, each client on its own threads.

Clients run concurrently (one computation thread and one communication thread each). Torch's
intra-op threads are shared out so that the clients together use the machine's cores once.
"""

from __future__ import annotations

import logging
import os
import threading

import torch

from parablock.backends import ClientSpec, build_client, run_spec
from parablock.backends.shared import FrozenShare
from parablock.core.metrics import ClientLog
from parablock.core.server import Server
from parablock.errors import RunStopped

log = logging.getLogger(__name__)


def torch_threads(clients: int, requested: int = 0) -> int:
    return requested or max(1, (os.cpu_count() or 1) // clients)


def run_local(
    specs: list[ClientSpec],
    server: Server,
    *,
    threads: int = 0,
    on_barrier=None,
    on_phase=None,
    stop: threading.Event | None = None,
) -> list[ClientLog]:
    torch.set_num_threads(torch_threads(len(specs), threads))
    share = FrozenShare()

    def build(spec: ClientSpec):
        model = None
        if spec.gpus <= 0 and spec.lora is not None:  # an adapter run trains no base weight
            model = share.model(spec.model, spec.extra_blocks, ())
        elif spec.trained and spec.gpus <= 0:
            model = share.model(
                spec.model, spec.extra_blocks, spec.trained, spec.algorithm, spec.frozen_dtype
            )
        return build_client(spec, server, on_barrier, stop, on_phase, model)

    clients = [build(s) for s in specs]
    errors: list[BaseException] = []

    def work(i: int, spec: ClientSpec) -> None:
        def current(client) -> None:  # a client that restarted is a new object
            clients[i] = client

        try:
            run_spec(spec, build, clients[i], current)
        except RunStopped:
            log.info("client %d stopped; its last barrier is saved", spec.client_id)
        except BaseException as e:  # reported after every thread has stopped
            log.error("client %d failed: %s", spec.client_id, e)
            errors.append(e)

    threads_ = [
        threading.Thread(target=work, args=(i, s), name=f"client{s.client_id}-compute")
        for i, s in enumerate(specs)
    ]
    for t in threads_:
        t.start()
    for t in threads_:
        t.join()
    for c in clients:
        if c.checkpoint is not None:
            c.checkpoint.flush()
    if errors:
        raise errors[0]
    return [c.log for c in clients]
