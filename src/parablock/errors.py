"""Every exception ParaBlock raises on purpose, in one leaf module (it imports nothing of ours).

Two families matter to the command line: ``UserError`` subclasses are mistakes the user can fix
(bad config, data, paths, credentials): one line, exit code 2. ``RunFailed`` subclasses end a
run that was set up correctly (too few clients, a server that went away): one line, exit code 1.
"""

from __future__ import annotations


class UserError(ValueError):
    """Something the user can fix; the message says what and where."""


class RunFailed(RuntimeError):
    """A correctly configured run that could not finish; the message says why."""


# -- configuration and inputs (exit code 2) ----------------------------------------------------
class ConfigError(UserError):
    """A bad configuration value, file or key; the message names the field and what is allowed."""


class ModelError(UserError):
    """A model that cannot be found or loaded; the message says what was tried."""


class DataError(UserError):
    """Bad or unusable data: the message names the source (file and line) and what was wrong."""


class BlockError(UserError):
    """A block selection that is malformed, matches nothing, or an unsupported architecture."""


class UnknownNameError(UserError, KeyError):
    """An unknown registry name; the message lists the names that exist."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class RunDirError(UserError):
    """The run directory cannot be used (it already holds a finished run, or nothing to resume)."""


class ReportError(UserError):
    """A run directory whose files are missing or unreadable; names the file (and line)."""


class EstimateError(UserError):
    """Estimate inputs that do not determine a timing (e.g. no compute time)."""


class CheckpointError(UserError):
    """No usable checkpoint (the message says what was found)."""


class CredentialsError(UserError):
    """A certificate, key, token or clients file that is missing, unreadable or malformed."""


# -- the network (exit code 2: the user must fix an address, a certificate or a token) ---------
class ConnectError(UserError):
    """The server cannot be reached, or refuses this client (address, TLS, token, model, version)."""


class Unreachable(ConnectError):
    """No answer from the server's address (down, wrong address or port, TLS mismatch)."""


# -- messages and the protocol ------------------------------------------------------------------
class MessageError(ValueError):
    """A malformed, corrupt or inconsistent message; it is rejected, never applied."""


class Refused(MessageError):
    """A message refused for a reason of kind ``kind``, one short word (the server counts
    rejected updates by kind: ``ServerStats.rejected.by_kind``, the metrics endpoint); any other
    ``MessageError`` about an update is of kind ``malformed``."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class UpdateRejected(RuntimeError):
    """The server refused this client's update (the reason is in the message)."""


class AggregationError(RuntimeError):
    """Updates that cannot be aggregated together, or an aggregate that fails its check."""


class SharedBlockError(RuntimeError):
    """Clients of one process disagree on a block's global value at one version, or a shared
    block's tensors changed: a broken invariant, never a user's mistake."""


# -- runs (exit code 1, or 130 for a requested stop) --------------------------------------------
class RoundFailedError(RunFailed):
    """A round that could not aggregate (too few updates before its deadline)."""


class ServerGone(RunFailed):
    """The server stopped answering or closed the connection mid-run."""


class RunStopped(RuntimeError):
    """The run is being stopped (Ctrl-C / SIGTERM); clients leave at their next wait."""


class RunInterrupted(RuntimeError):
    """Ctrl-C or SIGTERM stopped the run after saving its state; the message says how to resume."""


class ClientRestart(RuntimeError):
    """The client restarts from its last checkpoint and rejoins (the server says where)."""


class ClientCrash(ClientRestart):
    """An injected crash (``run.faults``), ridden out as a real process that died would be."""


class ClientBehind(ClientRestart):
    """The client's round closed without it (it stalled past the deadline): rejoining skips it
    to the open round instead of replaying every round it missed."""


class BudgetSpent(RunStopped):
    """A site's privacy budget (``privacy.max_epsilon``) would be exceeded by its next round: it
    stops cleanly, its checkpoint kept."""


class ClientVanished(RunStopped):
    """A client left for good without a word (the ``vanish`` faults): its thread or process ends
    quietly and the server finds out at the round's deadline."""
