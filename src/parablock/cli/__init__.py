"""The ``parablock`` command: ``main`` dispatches to the subcommands (``main.py``: run, compare,
report, estimate, generate; ``net.py``: server, client, certs; ``flower.py``: flower-worker,
flower new)."""

from parablock.cli.main import main

__all__ = ["main"]
