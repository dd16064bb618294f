"""Reading a user's text file (a config, a data file) with one-line errors that name the file,
and for bad bytes the line and byte offset: one reader for every kind of file."""

from __future__ import annotations

from pathlib import Path

from parablock.errors import UserError


def read_utf8(path: Path, what: str, error: type[UserError]) -> str:
    """``path``'s text. Missing, unreadable or not UTF-8: ``error`` naming ``what`` (e.g.
    "config file"), the path and, for a bad byte, its line and offset. A UTF-8 BOM is skipped."""
    if not path.is_file():
        raise error(f"{what} {path} does not exist")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise error(f"{what} {path} cannot be read: {e.strerror or e}") from None
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise error(
            f"{what} {path}:{line}: not UTF-8 text: byte 0x{raw[e.start]:02x} at byte offset "
            f"{e.start}; save it as UTF-8"
        ) from None
