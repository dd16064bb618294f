"""The one client assembly: every client (local, Ray, networked, Flower) is built here.

A client is given two things. Its **placement**, what its site decides (``Placement``: its id,
its copy of the base model, its data, its device and threads, its links, its checkpoint
directory, and for tests and studies its faults and slow-down; picklable, so a Ray actor gets
it whole), and the **settings** the server hands every client when it joins (``RunSettings``:
the algorithm, the block plan, the training step, the codec, the adapter, the overlap). So
``assemble`` joins first, with what the client's checkpoint holds, and builds the client from the
server's answer: a simulated client and a networked one cannot be told different settings, and
a setting reaches every client by one route, the join.

``Host`` holds what a process lends the clients it runs beside each other (the local backend:
one shared copy of the frozen weights, the copy-on-write block store, the compute gate) and the
hooks that watch them; a client of its own process needs none of it.

``run_placed`` runs one client to the end and restarts it from its checkpoint after a crash or a
round that closed without it, as a process that died would be restarted.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from parablock.core import secagg
from parablock.core.algorithms import ALGORITHMS, run_client
from parablock.core.checkpoint import CheckpointStore, ClientState
from parablock.core.client import Client
from parablock.core.correction import CORRECTIONS
from parablock.core.metrics import PhaseListener
from parablock.core.privacy import Ledger, SitePrivacy
from parablock.core.schedule import protocol_blocks
from parablock.core.secure import SecureClient
from parablock.data.examples import DataStats, Example, encode_all
from parablock.data.sources import client_records
from parablock.errors import ClientRestart, ConfigError
from parablock.model.cow import SharedBlocks
from parablock.model.devices import train_device
from parablock.model.forward import resolve_precision
from parablock.model.frozen import base_fingerprint, hold_frozen
from parablock.model.load import load_model, load_tokenizer
from parablock.transport.faults import faulty
from parablock.transport.link import LinkSpec
from parablock.wire.protocol import PROTOCOL, JoinReply, JoinRequest, RunSettings
from parablock.wire.seams import ServerConnection

log = logging.getLogger(__name__)
MAX_RESTARTS = 100  # a client that keeps crashing is a failure, not a fault to ride out


@dataclass(frozen=True)
class Placement:
    """Where and with what one client runs: everything it is given besides the settings."""

    client_id: int
    model: str  # its copy of the base model: model.name_or_path
    data: tuple[Example, ...] | str  # its examples, or a data.source it reads itself
    pad_id: int | None = None  # the tokenizer's padding id (None: read from the model's)
    device: str = "cpu"  # where it trains: cpu, cuda, cuda:N (model/devices.py)
    device_key: str = "run.client_devices"  # the option that set it, for a one-line error
    threads: int = 0  # torch threads (0: as the process has them)
    cpus: float = 1.0  # what it reserves where a backend places clients (Ray)
    gpus: float = 0.0  # > 0: a GPU of its own (Ray gives it as ``cuda``)
    uplink: LinkSpec | None = None  # emulated links (None: the transport's own time)
    downlink: LinkSpec | None = None
    checkpoint_dir: str | None = None  # where it saves its state at every barrier
    resume: ClientState | None = None  # the state to continue from
    prove_base: bool = False  # send its base model's fingerprint (a networked server checks)
    frozen_dtype: str = "fp32"  # model.frozen_dtype: the weights no block trains
    recompute: bool = False  # recompute activations in backward (a site's memory choice)
    slowdown: float = 1.0  # for studies: its compute takes this many times longer
    faults: str = ""  # run.faults: what goes wrong in its uploads (tests, benchmarks)
    fault_seed: int = 0  # the seed of a probabilistic fault plan
    stall_s: float = 0.0  # how long an injected stall lasts

    def train_device(self) -> torch.device:
        """Where the client trains, checked to exist (a GPU given by Ray is ``cuda``)."""
        if self.gpus > 0:
            return train_device("cuda", f"run.client_gpus={self.gpus:g} asks for a GPU; device")
        return train_device(self.device, self.device_key)


@dataclass
class Host:
    """What the process running a client lends it, and the hooks that watch it."""

    # (settings, placement) -> the client's model, when the process shares one base among its
    # clients (``backends/shared.py``); None: the client loads its own
    model: Callable[[RunSettings, Placement], nn.Module | None] | None = None
    store: SharedBlocks | None = None  # blocks equal to the global model, shared, copy on write
    gate: AbstractContextManager | None = None  # held around each training step
    on_barrier: Callable[[Client, int], None] | None = None
    on_phase: PhaseListener | None = None
    stop: threading.Event | None = None  # asks the client to leave at its next barrier
    data_stats: DataStats | None = None  # filled with what a client reading its own data kept
    # the fault plans of the clients it runs: a fault fires once across a client's restarts
    fault_plans: dict = field(default_factory=dict)


def assemble(
    placement: Placement, connection: ServerConnection, host: Host | None = None
) -> tuple[Client, JoinReply]:
    """Join the server with what ``placement``'s checkpoint holds, then build the client from
    the settings the server hands out; returns the client and the join's reply."""
    p, host = placement, host or Host()
    conn = faulty(connection, p.client_id, p.faults, p.fault_seed, p.stall_s, host.fault_plans)
    device = p.train_device()
    model = None if host.model else load_model(p.model)  # mapped: pages read as they are used
    fingerprint = base_fingerprint(model, p.model) if model is not None and p.prove_base else ""
    key = secagg.new_key()  # secure aggregation's, should the run use it (a new one per start)
    try:
        reply = conn.join(join_request(p.client_id, fingerprint, p.resume, key))
    except BaseException:
        conn.close()
        raise
    s = reply.settings
    ALGORITHMS.get(s.algorithm)  # a server newer than this client: a clear error, now
    shared = host.model(s, p) if host.model else None  # None: the host shares none with it
    own = shared is None
    if own and model is None:
        model = load_model(p.model)
    model = shared if shared is not None else model
    blocks = protocol_blocks(model, s.algorithm, s.extra_blocks, s.lora(), s.seed, s.block_size)
    if own:  # a shared base is converted once by the host; an adapter is injected on the CPU
        _hold_frozen(p, model, blocks, s, device)
        model = model.to(device)
    privacy = None
    if s.privacy.private:  # its mechanism, and (record mode) its ledger from its checkpoint
        ledger = Ledger.from_json(s.privacy.accountant, p.resume.privacy if p.resume else [])
        privacy = SitePrivacy(
            s.privacy, p.client_id, s.seed, s.local_steps, s.batch_size, s.privacy.shares, ledger
        )
    secure = None
    if s.privacy.secure_aggregation:  # its masks, from the key it joined with
        secure = SecureClient(
            p.client_id, key, s.privacy, s.privacy.secagg_clients, s.client_clip_norm
        )
    client = Client(
        p.client_id,
        model,
        blocks,
        _data(p, s, host.data_stats or DataStats()),
        replace(s.train_settings(), recompute=p.recompute),
        conn,
        CORRECTIONS.get(s.correction),
        seed=s.seed,
        pad_id=p.pad_id if p.pad_id is not None else load_tokenizer(p.model).pad_token_id,
        on_barrier=host.on_barrier,
        stop=host.stop,
        resume=p.resume,
        checkpoint=CheckpointStore(p.checkpoint_dir) if p.checkpoint_dir else None,
        fingerprint=fingerprint,
        slowdown=p.slowdown,
        compression=s.compression,
        server_lr=s.server_lr,
        clip_norm=s.client_clip_norm,
        privacy=privacy,
        overlap=s.overlap(),
        store=host.store if device.type == "cpu" else None,  # the store's tensors are the host's
        gate=host.gate if device.type == "cpu" else None,
        secure=secure,
    )
    client.log.listener = host.on_phase
    return client, reply


def join_request(client: int, fingerprint: str, state: ClientState | None, key=None) -> JoinRequest:
    """The join request of a fresh client, or of one restarting from its checkpoint ``state``
    (the dirty blocks it restores are the only ones it holds beyond the base model); ``key``:
    its secure-aggregation key, whose public half it sends."""
    public = secagg.public_bytes(key).hex() if key is not None else ""
    if state is None:
        return JoinRequest(PROTOCOL, client, fingerprint, secagg_key=public)
    return JoinRequest(
        PROTOCOL,
        client,
        fingerprint,
        {b: state.versions.get(b, -1) for b in state.dirty},
        state.round + 1,
        -1 if state.pending is None else state.pending.round,
        sorted(state.dirty),
        secagg_key=public,
    )


def trained_blocks(s: RunSettings) -> tuple[int, ...]:
    """The blocks the run's plan trains (the rest of the model stays the base)."""
    return tuple(sorted(set(s.plan)))


def _hold_frozen(p: Placement, model: nn.Module, blocks, s: RunSettings, device) -> None:
    """``model.frozen_dtype`` other than fp32: the weights no block of the plan trains, held in
    that dtype, where the forward runs in bf16 (an fp32 forward cannot multiply bf16 weights)."""
    if p.frozen_dtype == "fp32":
        return
    if s.lora_r:
        raise ConfigError(
            f"model.frozen_dtype={p.frozen_dtype}: not supported for {s.algorithm} (adapter runs "
            "keep the base model in fp32); use fp32"
        )
    if resolve_precision(s.train_settings().precision, device) != "bf16":
        raise ConfigError(
            f"model.frozen_dtype={p.frozen_dtype} needs a bf16 forward, but this run's "
            f"train.precision={s.precision} resolves to fp32 on {device}; use fp32"
        )
    names = {n for b in trained_blocks(s) for n in blocks[b].param_names}
    hold_frozen(model, p.model, names, p.frozen_dtype)


def _data(p: Placement, s: RunSettings, stats: DataStats) -> list[Example]:
    """The client's examples: given, or read from its own source with the run's settings."""
    if not isinstance(p.data, str):
        return list(p.data)
    records = client_records(p.data, s.train_size, s.seed, s.label_field)
    tokenizer = load_tokenizer(p.model)
    return encode_all(records, tokenizer, s.max_length, f"client {p.client_id} data", stats)


def run_placed(
    placement: Placement,
    build: Callable[[Placement], tuple[Client, JoinReply]],
    built: tuple[Client, JoinReply] | None = None,
    on_client: Callable[[Client], None] | None = None,
) -> Client:
    """Run one client to the end (``built``, or what ``build`` assembles); returns the client
    that finished. A crash, or a round that closed without it (``ClientRestart``), restarts it
    from its last checkpoint, as a process that died would be restarted, and it rejoins (at the
    open round); ``on_client`` hears each new client object."""
    for restart in range(MAX_RESTARTS + 1):
        client, reply = built or build(placement)
        if on_client is not None:
            on_client(client)
        try:
            run_client(client, reply)
            return client
        except ClientRestart as e:
            if restart == MAX_RESTARTS:
                raise
            state = None
            if client.checkpoint is not None:
                client.checkpoint.flush()
                state = client.checkpoint.latest_client(placement.client_id)
            after = f"after round {state.round}" if state is not None else "afresh (no checkpoint)"
            log.warning("%s; it restarts %s and rejoins", e, after)
            placement, built = replace(placement, resume=state), None
    raise AssertionError("unreachable")
