"""Backends decide where clients run; the algorithm and the server never know which one is used.

A backend takes one ``ClientSpec`` per client (everything needed to build that client, picklable)
and the server, runs every client to the end, and returns each client's ``ClientLog``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from parablock.blocks import model_blocks
from parablock.checkpoint import CheckpointStore, ClientState
from parablock.client import Client
from parablock.correction import CORRECTIONS
from parablock.data import Example
from parablock.link import LinkSpec
from parablock.metrics import ClientLog, PhaseListener
from parablock.model import load_model
from parablock.registry import Registry
from parablock.train import TrainSettings
from parablock.transport import Connection, ServerEndpoint


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


def build_client(
    spec: ClientSpec,
    server: ServerEndpoint,
    on_barrier=None,
    stop=None,
    on_phase: PhaseListener | None = None,
) -> Client:
    """A client with its own freshly loaded model copy, connected to ``server``.

    ``on_phase`` (optional) hears every phase span start and end, for progress displays;
    ``stop`` (a threading.Event) asks the client to leave at its next barrier.
    """
    model = load_model(spec.model)
    client = Client(
        spec.client_id,
        model,
        model_blocks(model, spec.extra_blocks),
        list(spec.data),
        spec.settings,
        Connection(server, spec.uplink, spec.downlink),
        CORRECTIONS.get(spec.correction),
        seed=spec.seed,
        pad_id=spec.pad_id,
        on_barrier=on_barrier,
        stop=stop,
        resume=spec.resume,
        checkpoint=CheckpointStore(spec.checkpoint_dir) if spec.checkpoint_dir else None,
    )
    client.log.listener = on_phase
    return client


Backend = Callable[..., list[ClientLog]]
BACKENDS: Registry[Backend] = Registry("backend")


def _local(*args, **kwargs) -> list[ClientLog]:
    from parablock.backends.local import run_local

    return run_local(*args, **kwargs)


BACKENDS.add("local", _local)
