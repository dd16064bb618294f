"""The remote backend: clients are ``parablock client`` processes elsewhere, joined over gRPC.

This side only serves: it opens the gRPC port (TLS, per-client tokens), waits for the clients to
join (all ``federation.clients``, or ``federation.min_clients`` once ``server.join_timeout_s`` has
passed), lets the rounds run, and collects what each client reported. The run directory is
written by the runner as for any backend.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import grpc

from parablock.backends.exporter import (
    FederationCollector,
    MetricsEndpoint,
    check_available,
    parse_address,
)
from parablock.core.metrics import ClientLog
from parablock.core.server import Server
from parablock.errors import ConfigError, CredentialsError, RoundFailedError, RunStopped
from parablock.transport.auth import ClientsFile
from parablock.transport.certs import read_pem
from parablock.transport.grpc_service import CALLS_PER_CLIENT, FederationService, start

log = logging.getLogger(__name__)

FINISH_GRACE_S = 30.0  # after the last aggregate, how long clients have to send final reports


@dataclass(frozen=True)
class Listener:
    """Where and how the server listens (the ``[server]`` config section, checked)."""

    address: str
    credentials: grpc.ServerCredentials | None
    clients: ClientsFile
    join_timeout_s: float
    request_timeout_s: float = 30.0
    metrics_address: str = ""  # the Prometheus endpoint's host:port; "" = none


def listener(cfg) -> Listener:
    """Check the ``[server]`` settings and load certificates and the clients file."""
    s = cfg.server
    if not s.clients_file:
        raise ConfigError(
            "server.clients_file is required: the client ids and token hashes that may join "
            "(parablock certs DIR --clients N writes one)"
        )
    clients = ClientsFile.load(s.clients_file)
    missing = sorted(set(range(cfg.federation.clients)) - set(clients.ids))
    if missing:
        raise ConfigError(
            f"server.clients_file {s.clients_file} has no entry for client(s) {missing}; "
            f"federation.clients={cfg.federation.clients} needs ids 0..{cfg.federation.clients - 1}"
        )
    if bool(s.tls_cert) != bool(s.tls_key):
        raise ConfigError("server.tls_cert and server.tls_key go together")
    if s.insecure and s.tls_cert:
        raise ConfigError("server.insecure=true and server.tls_cert: choose one")
    if s.metrics_address:
        parse_address(s.metrics_address)
        check_available()
    if not s.tls_cert and not s.insecure:
        raise ConfigError(
            "server.tls_cert and server.tls_key are required (parablock certs DIR makes a test "
            "pair), or server.insecure=true for a plain-text trial on a trusted network"
        )
    creds = None
    if s.tls_cert:
        key, cert = read_pem(s.tls_key, "server.tls_key"), read_pem(s.tls_cert, "server.tls_cert")
        ca = read_pem(s.client_ca, "server.client_ca") if s.client_ca else None
        try:
            creds = grpc.ssl_server_credentials(
                [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
            )
        except (RuntimeError, ValueError) as e:
            raise CredentialsError(f"server.tls_cert/server.tls_key are unusable: {e}") from None
    else:
        log.warning(
            "server.insecure=true: tokens and model blocks cross the network in PLAIN TEXT; "
            "use TLS (server.tls_cert, server.tls_key) anywhere but a trusted test network"
        )
    return Listener(
        s.address, creds, clients, s.join_timeout_s, s.request_timeout_s, s.metrics_address
    )


def run_remote(
    server: Server,
    where: Listener,
    *,
    stop: threading.Event | None = None,
    on_listening=None,
) -> list[ClientLog]:
    """Serve the run to remote clients until it ends; returns what each client reported."""
    stop = stop or threading.Event()
    service = FederationService(
        server, where.clients, hold_joins=True, request_timeout_s=where.request_timeout_s
    )
    workers = CALLS_PER_CLIENT * server.clients + 8  # no client can hold more
    try:
        grpc_server, port = start(service, where.address, where.credentials, workers)
    except OSError as e:
        raise ConfigError(f"server.address={where.address!r}: {e}") from None
    tls = "TLS" if where.credentials is not None else "PLAIN TEXT"
    log.info(
        "listening on %s (port %d, %s); waiting for %d client(s)",
        where.address,
        port,
        tls,
        server.clients,
    )
    if on_listening is not None:
        on_listening(port)

    def announce(round: int, block: int, value, seconds: float, who: list[int], *_) -> None:
        log.info(
            "round %d/%d: block %d aggregated from client(s) %s in %.3fs",
            round + 1,
            len(server.plan),
            block,
            who,
            seconds,
        )

    server.aggregate_listeners.append(announce)
    service.start_wait_s = where.join_timeout_s + 5.0
    metrics = None
    try:
        if where.metrics_address:
            collector = FederationCollector(server, service.stats)
            metrics = MetricsEndpoint(collector, where.metrics_address)
        _await_joins(server, where.join_timeout_s, stop)
        service.started.set()  # the clients waiting in Join start round 0 together
        if metrics is not None:
            metrics.started()
        _await_end(server, stop)
        if not server.wait_finished(FINISH_GRACE_S):
            log.warning("not every client sent its final report within %gs", FINISH_GRACE_S)
    finally:
        service.started.set()  # releases any join still held
        server.stop()  # wakes any call still waiting
        grpc_server.stop(grace=2.0).wait()
        if metrics is not None:
            metrics.close()
    service.stop()
    if service.stats.refused:
        log.warning("%d call(s) refused (bad or missing token)", len(service.stats.refused))
    if service.stats.ended:
        kinds = ", ".join(f"{k}: {n}" for k, n in sorted(service.stats.ended.by_kind.items()))
        log.warning(
            "%d call(s) refused or ended for what they did (%s)", len(service.stats.ended), kinds
        )
    return [server.reports.get(c, ClientLog(c)) for c in range(server.clients)]


def _await_joins(server: Server, timeout: float, stop: threading.Event) -> None:
    deadline = time.monotonic() + timeout
    while True:
        joined = {c for c, _ in server.stats.joins}
        if len(joined) == server.clients:
            log.info("all %d clients joined", server.clients)
            return
        if stop.is_set():
            raise RunStopped("stopped while waiting for clients")
        if time.monotonic() >= deadline:
            if len(joined) >= server.min_clients:
                for c in sorted(set(range(server.clients)) - joined):
                    server.drop_client(c, f"did not join within {timeout:g}s")
                return
            raise RoundFailedError(
                f"only {len(joined)} of {server.clients} clients joined within "
                f"server.join_timeout_s={timeout:g}s; federation.min_clients needs "
                f"{server.min_clients}"
            )
        time.sleep(0.2)


def _await_end(server: Server, stop: threading.Event) -> None:
    """Until the last round is aggregated, closing rounds whose deadline passed (a failed round
    raises RoundFailedError)."""
    while not stop.is_set():
        if server.wait_done(timeout=0.5):
            return
        server.check_deadline()
