"""Backends decide where clients run; the algorithm and the server never know which one is used.

A backend is called as ``backend(placements, server, *, threads, on_barrier, address,
compute_slots, share_blocks)``: one ``Placement`` per client (``backends/assembly.py``: everything a
client is given besides the settings it gets at join, picklable), the server (a
``ServerEndpoint``), torch threads per client, a progress callback ``on_barrier(client,
round)``, a cluster address (only the Ray backend uses one), and how many clients step at once
and whether they share blocks (only the local backend, whose clients share a process, uses
these). Every client is built by the one assembly (``backends.assembly.assemble``) and joins the
server like any other. A backend runs every client to the end, leaves the final global model in
``server.model``, and returns each client's ``ClientLog``.
"""

from __future__ import annotations

from collections.abc import Callable

from parablock.core.metrics import ClientLog
from parablock.errors import ConfigError
from parablock.registry import Registry

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
