"""Backends decide where clients run; the algorithm and the server never know which one is used.

A backend is called as ``backend(specs, server, *, threads, on_barrier, address,
compute_slots, share_blocks)``: one ``ClientSpec`` per client (everything needed to build that
client, picklable), the server, torch threads per client, a progress callback
``on_barrier(client, round)``, a cluster address (only the Ray backend uses one), and how many
clients step at once and whether they share blocks (only the local backend, whose clients share a
process, uses these). It runs every client to the end, leaves the final global model in
``server.model``, and returns each client's ``ClientLog``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace

import torch
from torch import nn

from parablock.core.algorithms import run_client
from parablock.core.baselines import protocol_blocks
from parablock.core.checkpoint import CheckpointStore, ClientState
from parablock.core.client import Client
from parablock.core.correction import CORRECTIONS
from parablock.core.metrics import ClientLog, PhaseListener
from parablock.data.examples import Example
from parablock.errors import ClientRestart, ConfigError
from parablock.model.cow import SharedBlocks
from parablock.model.frozen import hold_frozen
from parablock.model.load import load_model
from parablock.model.lora import LoraSettings
from parablock.model.train import TrainSettings
from parablock.registry import Registry
from parablock.transport.faults import faulty
from parablock.transport.inprocess import InProcessConnection
from parablock.transport.link import LinkSpec
from parablock.wire.protocol import Overlap
from parablock.wire.seams import ServerEndpoint

log = logging.getLogger(__name__)
MAX_RESTARTS = 100  # a client that keeps crashing is a failure, not a fault to ride out
_PLANS: dict = {}  # this process's fault plans: a fault fires once across a client's restarts


@dataclass(frozen=True)
class ClientSpec:
    client_id: int
    model: str  # model.name_or_path
    extra_blocks: str
    data: tuple[Example, ...]
    settings: TrainSettings
    uplink: LinkSpec
    downlink: LinkSpec
    algorithm: str
    correction: str
    seed: int
    pad_id: int
    checkpoint_dir: str | None = None  # where the client saves its state at every barrier
    resume: ClientState | None = None  # the state to continue from
    cpus: float = 1.0  # resources the client reserves where a backend places clients (Ray)
    gpus: float = 0.0  # > 0: the client trains on a GPU
    faults: str = ""  # run.faults: what goes wrong in this client's uploads (tests, benchmarks)
    stall_s: float = 0.0  # how long an injected stall lasts
    trained: tuple[int, ...] = ()  # the blocks the run trains (the rest may be shared)
    slowdown: float = 1.0  # federation.compute_slowdown: its compute takes this many times longer
    compression: str = "none"  # link.compression
    server_lr: float = 1.0  # federation.server_lr (a compressed aggregate is applied with it)
    lora: LoraSettings | None = None  # the adapter the client trains instead (fedit_lora)
    overlap: Overlap = Overlap()  # extra steps while the link is busy, full duplex (parablock)
    frozen_dtype: str = "fp32"  # model.frozen_dtype: the weights no block trains (frozen.py)


def client_device(spec: ClientSpec) -> torch.device:
    """Where the client trains: a GPU when it has one (Ray makes the one it got ``cuda:0``)."""
    if spec.gpus <= 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(
            f"client {spec.client_id}: run.client_gpus={spec.gpus:g} but no CUDA device is visible"
        )
    return torch.device("cuda")


def build_client(
    spec: ClientSpec,
    server: ServerEndpoint,
    on_barrier=None,
    stop=None,
    on_phase: PhaseListener | None = None,
    model: nn.Module | None = None,
    store: SharedBlocks | None = None,
    gate: AbstractContextManager | None = None,
) -> Client:
    """A client with its own freshly loaded model copy on its device, connected to ``server``.

    ``on_phase`` (optional) hears every phase span start and end, for progress displays;
    ``stop`` (a threading.Event) asks the client to leave at its next barrier; ``model``: its
    copy of the base model when the backend made one (``shared.FrozenShare``); ``store``: the
    blocks equal to the global model that it shares with other clients (copy on write; its
    trained parameters must be objects of its own, as ``FrozenShare`` makes them); ``gate``: held around each training
    step. A LoRA adapter is injected on the CPU, before the model moves to the client's device.
    """
    fresh = model is None
    if model is None:
        model = load_model(spec.model)
    blocks = protocol_blocks(model, spec.algorithm, spec.extra_blocks, spec.lora, spec.seed)
    if fresh:
        trained = {n for b in spec.trained for n in blocks[b].param_names}
        hold_frozen(model, spec.model, trained, spec.frozen_dtype)
        model = model.to(client_device(spec))
    client = Client(
        spec.client_id,
        model,
        blocks,
        list(spec.data),
        spec.settings,
        faulty(
            InProcessConnection(server, spec.client_id, spec.uplink, spec.downlink),
            spec.client_id,
            spec.faults,
            spec.seed,
            spec.stall_s,
            _PLANS,
        ),
        CORRECTIONS.get(spec.correction),
        seed=spec.seed,
        pad_id=spec.pad_id,
        on_barrier=on_barrier,
        stop=stop,
        resume=spec.resume,
        checkpoint=CheckpointStore(spec.checkpoint_dir) if spec.checkpoint_dir else None,
        slowdown=spec.slowdown,
        compression=spec.compression,
        server_lr=spec.server_lr,
        overlap=spec.overlap,
        store=store,
        gate=gate,
    )
    client.log.listener = on_phase
    return client


def run_spec(
    spec: ClientSpec,
    build: Callable[[ClientSpec], Client],
    client: Client | None = None,
    on_client: Callable[[Client], None] | None = None,
) -> Client:
    """Run one client to the end (``client``, or one ``build`` makes); returns the client that
    finished. A crash, or a round that closed without it (``ClientRestart``), restarts it from
    its last checkpoint, as a process that died would be restarted, and it rejoins (at the open
    round); ``on_client`` hears each new client object."""
    for restart in range(MAX_RESTARTS + 1):
        client = client or build(spec)
        if on_client is not None:
            on_client(client)
        try:
            run_client(client, spec.algorithm)
            return client
        except ClientRestart as e:
            if restart == MAX_RESTARTS:
                raise
            state = None
            if client.checkpoint is not None:
                client.checkpoint.flush()
                state = client.checkpoint.latest_client(spec.client_id)
            after = f"after round {state.round}" if state is not None else "afresh (no checkpoint)"
            log.warning("%s; it restarts %s and rejoins", e, after)
            spec, client = replace(spec, resume=state), None
    raise AssertionError("unreachable")


Backend = Callable[..., list[ClientLog]]
BACKENDS: Registry[Backend] = Registry("backend")


# Backends import lazily, so that e.g. ``ray`` is imported only when the ray backend runs.
def _local(specs, server, *, address="", **kwargs) -> list[ClientLog]:
    from parablock.backends.local import run_local

    return run_local(specs, server, **kwargs)  # one process: no cluster address


def _ray(specs, server, *, compute_slots=0, share_blocks=True, **kwargs) -> list[ClientLog]:
    # each client is its own process: no gate and nothing shared between clients
    try:
        from parablock.backends.ray import run_ray
    except ModuleNotFoundError as e:
        if e.name != "ray":
            raise
        raise ConfigError(
            "run.backend=ray needs the package ray: pip install 'parablock[ray]' "
            "(scripts/install.sh installs it)"
        ) from None

    return run_ray(specs, server, **kwargs)


BACKENDS.add("local", _local)
BACKENDS.add("ray", _ray)
