"""The local backend: the server and every client in this process, each client on its own threads.

Clients run concurrently (one computation thread and one communication thread each). Torch's
intra-op threads are shared out so that the clients together use the machine's cores once, and
a ``ComputeGate`` lets at most ``run.compute_slots`` clients run a training step at the same
time (by default as many as the cores hold), so that many clients neither fight over the cores
nor hold their training activations all at once; their rounds still interleave step by step.
Each step ends with a trim of the C heap (``heap.py``): without it the activations a step freed
stay resident in its thread's arena, up to one step's worth per arena.
CPU clients share the frozen weights and, copy on write, every trained block that equals the
global model (``shared.py``).
"""

from __future__ import annotations

import logging
import os
import threading

import torch

from parablock.backends.assembly import Host, Placement, assemble, run_placed, trained_blocks
from parablock.backends.heap import StepTrim
from parablock.backends.shared import BlockStore, FrozenShare
from parablock.core.metrics import ClientLog
from parablock.errors import RunStopped
from parablock.transport.inprocess import InProcessConnection
from parablock.wire.protocol import RunSettings
from parablock.wire.seams import ServerEndpoint

log = logging.getLogger(__name__)


def torch_threads(clients: int, requested: int = 0) -> int:
    return requested or max(1, (os.cpu_count() or 1) // clients)


def step_slots(threads: int, requested: int = 0) -> int:
    """How many clients may step at once: ``run.compute_slots``, or (0) as many as the cores
    hold at ``threads`` torch threads each, at least one."""
    return requested or max(1, (os.cpu_count() or 1) // threads)


class ComputeGate:
    """Held around each training step of a client: at most ``slots`` clients step at once."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._free = threading.BoundedSemaphore(slots)

    def __enter__(self) -> ComputeGate:
        self._free.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self._free.release()


def run_local(
    placements: list[Placement],
    server: ServerEndpoint,
    *,
    threads: int = 0,
    on_barrier=None,
    on_phase=None,
    stop: threading.Event | None = None,
    compute_slots: int = 0,
    share_blocks: bool = True,
) -> list[ClientLog]:
    """``compute_slots``: ``run.compute_slots`` (0 = auto); ``share_blocks``: CPU clients share
    the trained blocks that equal the global model (``run.share_blocks``)."""
    n_threads = torch_threads(len(placements), threads)
    torch.set_num_threads(n_threads)
    slots = step_slots(n_threads, compute_slots)
    cpu_clients = sum(p.train_device().type == "cpu" for p in placements)
    # at most ``slots`` steps at once (a gate with as many slots as clients never waits), and
    # a trim after each step: what it freed goes back before another client's step (heap.py)
    gate = StepTrim(ComputeGate(slots) if slots < cpu_clients else None) if cpu_clients else None
    share = FrozenShare()
    store = BlockStore() if share_blocks else None

    def model(s: RunSettings, p: Placement):
        """A CPU client's copy of the base, on the frozen weights every client shares."""
        if p.train_device().type != "cpu":
            return None  # it loads its own onto its device
        if s.lora_r:  # an adapter run trains no base weight
            return share.model(p.model, s.extra_blocks, ())
        if store is not None:  # a rebuilt client starts from the base: drop what it held
            store.release_all(p.client_id)
        trained = trained_blocks(s)
        return share.model(
            p.model, s.extra_blocks, trained, s.algorithm, store, p.frozen_dtype, s.block_size
        )

    host = Host(model, store, gate, on_barrier, on_phase, stop)

    def build(p: Placement):
        link = InProcessConnection(server, p.client_id, p.uplink, p.downlink)
        return assemble(p, link, host)

    built = [build(p) for p in placements]
    clients = [c for c, _ in built]
    errors: list[BaseException] = []

    def work(i: int, p: Placement) -> None:
        def current(client) -> None:  # a client that restarted is a new object
            clients[i] = client

        try:
            run_placed(p, build, built[i], current)
        except RunStopped:
            log.info("client %d stopped; its last barrier is saved", p.client_id)
        except BaseException as e:  # reported after every thread has stopped
            log.error("client %d failed: %s", p.client_id, e)
            errors.append(e)

    threads_ = [
        threading.Thread(target=work, args=(i, p), name=f"client{p.client_id}-compute")
        for i, p in enumerate(placements)
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
