"""The ServerApp: ParaBlock's server (per-block aggregation, versions, ``min_clients``, the
drain, checkpoints, evaluation, the run directory) with Flower's ``Grid`` as its transport.

``server_app(config_path)`` makes the app a Flower app directory exposes
(``parablock flower new DIR`` writes one): it reads the ParaBlock config (a TOML file that
travels in the app, plus the run config's ``parablock-set`` overrides, ``key=value`` separated
by ``;``) and runs it as ``parablock server`` would, the clients being the SuperNodes' workers.
The run directory is the same as ``parablock run`` writes (``run.out``).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from parablock.core.metrics import ClientLog
from parablock.core.server import Server
from parablock.flower.frames import from_record, to_record
from parablock.flower.relay import relay
from parablock.flower.template import refuse_secure_aggregation
from parablock.wire.compress import CODECS

log = logging.getLogger(__name__)

MESSAGE_TYPE = "query"  # the ClientApp's handler (@app.query)
SET_KEY = "parablock-set"  # run config: extra --set overrides, "a.b=1; c.d=x"


class FlowerWire:
    """The relay's ``Wire`` over a Flower ``Grid``."""

    def __init__(self, grid: Grid, ttl: float) -> None:
        self.grid = grid
        self.ttl = ttl

    def nodes(self) -> list[int]:
        return sorted(self.grid.get_node_ids())

    def send(self, node: int, frames: list[bytes], round: int) -> str:
        msg = self.grid.create_message(to_record(frames), MESSAGE_TYPE, node, str(round), self.ttl)
        (mid,) = list(self.grid.push_messages([msg]))
        return mid

    def replies(self, ids: list[str]) -> list[tuple[str, list[bytes] | None, str]]:
        out = []
        for m in self.grid.pull_messages(ids):
            mid = m.metadata.reply_to_message_id
            if m.has_error():
                out.append((mid, None, f"Flower error {m.error.code}: {m.error.reason}"))
                continue
            try:
                out.append((mid, from_record(m.content), ""))
            except ValueError as e:
                out.append((mid, None, f"malformed reply: {e}"))
        return out


class FlowerServing:
    """``runner.run``'s ``serve_with``: the relay over the grid, then the clients' reports."""

    name = "flower"

    def __init__(self, grid: Grid, cfg) -> None:
        self.grid = grid
        self.cfg = cfg

    def __call__(self, server: Server, stop: threading.Event) -> list[ClientLog]:
        fed = self.cfg.federation
        ttl = max(3600.0, 4 * fed.round_timeout_s)
        try:
            sessions = relay(
                server,
                FlowerWire(self.grid, ttl),
                lossy=CODECS.get(self.cfg.link.compression).lossy,
                join_timeout_s=self.cfg.server.join_timeout_s,
                stop=stop,
            )
        finally:
            server.stop()
        n = sum(s.messages for s in sessions.values())
        log.info("%d Flower message(s) to %d node(s)", n, len(sessions))
        return [server.reports.get(c, ClientLog(c)) for c in range(server.clients)]


def overrides(context: Context) -> list[str]:
    text = context.run_config.get(SET_KEY, "")
    return [x.strip() for x in str(text).split(";") if x.strip()]


def server_app(config_path: str | Path) -> ServerApp:
    """The ServerApp for the ParaBlock config at ``config_path``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        from parablock.config import load
        from parablock.run.runner import run

        cfg = load(str(config_path), overrides(context))
        refuse_secure_aggregation(cfg)
        logging.getLogger("parablock").setLevel(logging.INFO)
        summary = run(cfg, serve_with=FlowerServing(grid, cfg))
        log.info(
            "done: wall %.1fs, %d updates accepted; run directory %s",
            summary["wall_time_s"],
            summary["updates_accepted"],
            summary["run_dir"],
        )

    return app


__all__ = ["FlowerServing", "FlowerWire", "Message", "server_app"]
