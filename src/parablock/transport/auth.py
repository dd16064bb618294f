"""Per-client bearer tokens for the networked federation, and the server's list of who may join.

Each client holds one random token (a file, ``client-<id>.token``); the server holds only the
SHA-256 hashes of those tokens, in a TOML clients file::

    # ParaBlock server: who may join (token hashes only, never tokens)
    [[client]]
    id = 0
    token_hash = "sha256:<64 lowercase hex digits>"
    name = "site0"      # optional
    revoked = false     # optional

A client is identified by hashing the token it presents and comparing, in constant time, with
every entry. Tokens are never echoed in messages: a wrong one is reported as "unknown token".
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from parablock.errors import CredentialsError

HASH_PREFIX = "sha256:"
_HASH_RE = re.compile(r"sha256:[0-9a-f]{64}")
_ENTRY_KEYS = ("id", "token_hash", "name", "revoked")
_HEADER = "# ParaBlock server: who may join (token hashes only, never tokens)"


def new_token() -> str:
    """A fresh client token: 32 random bytes (256 bits) from ``secrets``, as URL-safe text."""
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """``"sha256:" + hexdigest`` of the UTF-8 token, the form stored in the clients file.

    A plain (unsalted, fast) SHA-256 is enough here: tokens are 256-bit random values, not
    passwords, so there is nothing to guess and no dictionary for a slow or salted hash to resist.
    The same hash is what ``printf %s "$TOKEN" | sha256sum`` prints.
    """
    return HASH_PREFIX + hashlib.sha256(token.encode("utf-8")).hexdigest()


def read_token(path: str | Path) -> str:
    """The token in file ``path``, stripped of surrounding whitespace."""
    path = Path(path)
    text = _read_text(
        path,
        "token file",
        "the server operator hands out one client-<id>.token per client",
        "a text file this user may read",
    )
    token = text.strip()
    if not token:
        raise CredentialsError(
            f"token file {path} is empty; it must hold this client's token on one line"
        )
    return token


@dataclass(frozen=True)
class ClientEntry:
    """One client the server admits: its id, the hash of its token, and whether it was revoked."""

    id: int
    token_hash: str
    revoked: bool = False
    name: str = ""


class ClientsFile:
    """The server's list of clients (token hashes only). Build with ``load`` or from entries."""

    def __init__(self, entries: Iterable[ClientEntry], source: str = "<clients>") -> None:
        self.source = source
        self.entries: tuple[ClientEntry, ...] = tuple(entries)
        _check_entries(self.entries, source)

    # -- reading and writing ------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> ClientsFile:
        """Parse and strictly validate the clients file at ``path``."""
        path = Path(path)
        text = _read_text(
            path,
            "clients file",
            "it lists the token hashes of the clients that may join",
            "a UTF-8 text file this user may read",
        )
        return cls.parse(text, source=str(path))

    @classmethod
    def parse(cls, text: str, source: str = "<clients>") -> ClientsFile:
        """Parse and strictly validate clients-file TOML ``text``; ``source`` names it in errors."""
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise CredentialsError(f"clients file {source} is not valid TOML: {e}") from None
        extra = sorted(set(doc) - {"client"})
        if extra:
            raise CredentialsError(
                f"clients file {source}: unknown top-level key {extra[0]!r}; only [[client]] "
                "tables are allowed"
            )
        tables = doc.get("client")
        if not tables:
            raise CredentialsError(
                f"clients file {source} has no [[client]] entries; add one per client "
                "(id and token_hash)"
            )
        if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
            raise CredentialsError(
                f"clients file {source}: 'client' must be [[client]] tables (an array of tables)"
            )
        return cls([_entry(t, i, source) for i, t in enumerate(tables)], source=source)

    @staticmethod
    def dump(entries: Iterable[ClientEntry]) -> str:
        """TOML text for ``entries`` in the clients-file form; ``load`` reads it back equal."""
        entries = tuple(entries)
        _check_entries(entries, "<dump>")
        lines = [_HEADER]
        for e in entries:
            lines += ["", "[[client]]", f"id = {e.id}", f'token_hash = "{e.token_hash}"']
            if e.name:
                lines.append(f"name = {json.dumps(e.name)}")  # JSON escapes are valid TOML
            if e.revoked:
                lines.append("revoked = true")
        return "\n".join(lines) + "\n"

    # -- queries --------------------------------------------------------------------------------
    @property
    def ids(self) -> list[int]:
        """Every client id in the file (revoked ones included), sorted."""
        return sorted(e.id for e in self.entries)

    def identify(self, token: str | None) -> tuple[int | None, str]:
        """``(client id, "")`` for a valid, non-revoked token, else ``(None, reason)``.

        The reason is "no token", "unknown token" or "revoked token"; it never contains the
        token. The token's hash is compared in constant time with every entry (no early exit).
        """
        if not token:
            return None, "no token"
        try:
            presented = hash_token(token)
        except UnicodeEncodeError:
            return None, "unknown token"
        found: ClientEntry | None = None
        for entry in self.entries:
            if hmac.compare_digest(presented, entry.token_hash) and found is None:
                found = entry
        if found is None:
            return None, "unknown token"
        if found.revoked:
            return None, "revoked token"
        return found.id, ""

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ClientsFile):
            return NotImplemented
        return self.entries == other.entries

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"ClientsFile({self.source!r}, ids={self.ids})"


# -- validation -------------------------------------------------------------------------------
def _where(source: str, index: int) -> str:
    return f"clients file {source}, [[client]] entry {index}"


def _entry(table: dict[str, Any], index: int, source: str) -> ClientEntry:
    """One [[client]] table (0-based ``index`` in the file) as a ClientEntry, or an error."""
    where = _where(source, index)
    unknown = sorted(set(table) - set(_ENTRY_KEYS))
    if unknown:
        raise CredentialsError(
            f"{where}: unknown key {unknown[0]!r}; allowed keys are {', '.join(_ENTRY_KEYS)}"
        )
    for key in ("id", "token_hash"):
        if key not in table:
            raise CredentialsError(f"{where}: missing required field '{key}'")
    entry = ClientEntry(
        id=table["id"],
        token_hash=table["token_hash"],
        revoked=table.get("revoked", False),
        name=table.get("name", ""),
    )
    _check_entry(entry, where)
    return entry


def _check_entry(entry: ClientEntry, where: str) -> None:
    if type(entry.id) is not int or entry.id < 0:  # bool is an int subclass: not allowed
        raise CredentialsError(
            f"{where}: field 'id' must be a non-negative integer, got {entry.id!r}"
        )
    if not isinstance(entry.token_hash, str) or not _HASH_RE.fullmatch(entry.token_hash):
        # the value is not echoed: it may be a token pasted by mistake
        raise CredentialsError(
            f"{where}: field 'token_hash' must be 'sha256:' followed by 64 lowercase hex digits "
            "(the hash of the token, never the token itself)"
        )
    if type(entry.revoked) is not bool:
        raise CredentialsError(
            f"{where}: field 'revoked' must be true or false, got {entry.revoked!r}"
        )
    if not isinstance(entry.name, str) or not _encodable(entry.name):
        raise CredentialsError(f"{where}: field 'name' must be a text string, got {entry.name!r}")


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates cannot be written as TOML
        return False
    return True


def _check_entries(entries: tuple[ClientEntry, ...], source: str) -> None:
    """Every entry valid, ids and hashes unique, at least one entry."""
    if not entries:
        raise CredentialsError(
            f"clients file {source} has no [[client]] entries; add one per client "
            "(id and token_hash)"
        )
    seen_ids: dict[int, int] = {}
    seen_hashes: dict[str, int] = {}
    for index, entry in enumerate(entries):
        where = _where(source, index)
        if not isinstance(entry, ClientEntry):
            raise CredentialsError(f"{where}: expected a ClientEntry, got {type(entry).__name__}")
        _check_entry(entry, where)
        if entry.id in seen_ids:
            raise CredentialsError(
                f"{where}: field 'id' = {entry.id} repeats entry {seen_ids[entry.id]}; "
                "ids must be unique"
            )
        if entry.token_hash in seen_hashes:
            raise CredentialsError(
                f"{where}: field 'token_hash' repeats entry {seen_hashes[entry.token_hash]}; "
                "each client needs its own token"
            )
        seen_ids[entry.id] = index
        seen_hashes[entry.token_hash] = index


def _read_text(path: Path, what: str, about: str, readable: str) -> str:
    """A credentials file's text, or a one-line CredentialsError naming it and what to check."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CredentialsError(f"{what} {path} does not exist; check the path ({about})") from None
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
        raise CredentialsError(
            f"cannot read {what} {path} ({why}); check that it is {readable}"
        ) from None
