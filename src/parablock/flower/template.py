"""``parablock flower new DIR``: a Flower app directory that runs ParaBlock.

It holds ``pyproject.toml`` (the app's components and run config), ``parablock_app/`` (the
ServerApp and ClientApp, one import each) and ``parablock_app/parablock.toml``, the ParaBlock
config the ServerApp runs (edit it, or override keys per run with
``flwr run DIR CONN --run-config 'parablock-set="federation.rounds=8; run.out=/abs/dir"'``).
The app depends on ParaBlock installed where Flower runs it (``pip install 'parablock[flower]'``
on the SuperLink's and SuperNodes' machines); run the SuperLink and SuperNodes with
``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1`` so Flower does not re-install it per run.
"""

from __future__ import annotations

import json
from pathlib import Path

from parablock.errors import ConfigError

PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{name}"
version = "1.0.0"
description = "ParaBlock federated block fine-tuning of an LLM, on Flower"
license = "Apache-2.0"
dependencies = ["parablock[flower]"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "parablock"

[tool.flwr.app.components]
serverapp = "parablock_app.server_app:app"
clientapp = "parablock_app.client_app:app"

[tool.flwr.app.config]
# extra ParaBlock --set overrides for this run, separated by ";"
parablock-set = ""
# how long a ClientApp waits for its worker to finish a round (seconds)
handover-timeout-s = 3600
# the Simulation Engine only: the workers the ClientApps start themselves (one per simulated
# node): each node's data source (";"-separated, by partition-id), the model, where they write
parablock-sources = {sources}
parablock-model = {model}
parablock-sites = ""
"""

SERVER = '''"""The ServerApp: runs parablock.toml (beside this file) with the SuperNodes as clients."""

from pathlib import Path

from parablock.flower.server_app import server_app

app = server_app(Path(__file__).parent / "parablock.toml")
'''

CLIENT = '''"""The ClientApp: hands each message to this SuperNode's `parablock flower-worker`."""

from parablock.flower.client_app import app

__all__ = ["app"]
'''


def new_app(
    target: str | Path,
    config_toml: str,
    name: str = "parablock-app",
    sources: str = "",
    model: str = "smollm2-135m-instruct",
) -> Path:
    """Write the app into ``target`` (which must not exist or be empty); returns its path."""
    root = Path(target)
    if root.exists() and any(root.iterdir()):
        raise ConfigError(f"{root} exists and is not empty; pick a new directory")
    pkg = root / "parablock_app"
    pkg.mkdir(parents=True, exist_ok=True)
    (root / "pyproject.toml").write_text(
        PYPROJECT.format(name=name, sources=json.dumps(sources), model=json.dumps(model))
    )
    (pkg / "__init__.py").write_text('"""ParaBlock on Flower."""\n')
    (pkg / "server_app.py").write_text(SERVER)
    (pkg / "client_app.py").write_text(CLIENT)
    (pkg / "parablock.toml").write_text(config_toml)
    return root


def refuse_secure_aggregation(cfg) -> None:
    """Secure aggregation is not offered under Flower (docs/flower.md says why)."""
    if cfg.privacy.secure_aggregation:
        raise ConfigError(
            "privacy.secure_aggregation=true is not supported under Flower: Flower's SecAgg+ "
            "masks its own messages, not ParaBlock's relayed ones; run it with parablock "
            "server/client, run.backend=local or ray (or set privacy.secure_aggregation=false)"
        )
