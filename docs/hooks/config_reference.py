"""MkDocs hook: the configuration reference, generated from the config tree at build time.

Every section is a dataclass field of ``parablock.config.Config`` and every key a field of that
section, made by ``opt()`` with its help text and constraints in the field's metadata (``help``,
``choices``, ``ge``, ``gt``, ``le``, ``per_client``). This hook walks ``Config`` and writes one
table per section into the virtual page ``reference/configuration.md``, so a new key or section
appears in the docs by itself and a removed one disappears; nothing here names a section or key.

Only ``parablock.config``'s public names and those metadata keys are used, so the module may
become a package. The checkout's own ``src/`` goes first on ``sys.path``: the docs describe the
tree they are built from, not whatever copy of the package the environment has installed.
"""

from __future__ import annotations

import dataclasses
import html
import importlib
import logging
import sys
import typing
from pathlib import Path

from mkdocs.structure.files import File

log = logging.getLogger("mkdocs.hooks.config_reference")

PAGE = "reference/configuration.md"

INTRO = """\
# Configuration reference

Every key of every section, generated from the config tree (`parablock.config`) when the site is
built, so it matches the code it is built from. A key is written `section.key`: on the command
line `--set section.key=value`, in a TOML file `key = value` under `[section]`; see
[Configuration](../configuration.md) for how files, `--set` and presets combine. Allowed values
are checked when the config is built; a value outside them is a one-line error naming the key.
`parablock run --help` prints the same keys.
"""


def on_files(files, config):
    """Add the generated page to the site's files (it exists in the build only)."""
    files.append(File.generated(config, PAGE, content=render(_load_config(config))))
    return files


def _load_config(config):
    src = Path(config["config_file_path"]).parent / "src"
    if src.is_dir() and str(src) not in sys.path:
        sys.path.insert(0, str(src))
    return importlib.import_module("parablock.config").Config


def render(config_cls: type) -> str:
    """The whole page: the intro, then one heading and one table per section."""
    parts = [INTRO]
    for name, section in sections(config_cls):
        parts.append(f"## `[{name}]`\n")
        doc = _own_doc(section)
        if doc:
            parts.append(_text(doc) + "\n")
        parts.append("| key | type | default | allowed | meaning |\n|---|---|---|---|---|")
        hints = _hints(section)
        for f in dataclasses.fields(section):
            parts.append(_row(name, f, hints.get(f.name, f.type)))
        parts.append("")
    return "\n".join(parts)


def sections(config_cls: type) -> list[tuple[str, type]]:
    """(name, dataclass) for every field of ``Config`` that holds a section, in field order."""
    hints = _hints(config_cls)
    out = []
    for f in dataclasses.fields(config_cls):
        cls = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            cls = hints.get(f.name)
        if isinstance(cls, type) and dataclasses.is_dataclass(cls):
            out.append((f.name, cls))
    return out


def _hints(cls: type) -> dict[str, typing.Any]:
    """The class's resolved annotations, or {} where one cannot be resolved (each field's own
    ``type`` and default then stand in)."""
    try:
        return typing.get_type_hints(cls)
    except Exception:
        return {}


def _row(section: str, f: dataclasses.Field, hint: typing.Any) -> str:
    meta = f.metadata
    key = f"{section}.{f.name}"
    value = f.default
    if value is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    if meta.get("per_client"):
        kind = "float per client"
        default = ",".join(f"{v:g}" for v in value)
    else:
        if isinstance(hint, str) and value is not dataclasses.MISSING:
            hint = type(value)  # an annotation that could not be resolved
        kind = getattr(hint, "__name__", str(hint))
        if typing.get_origin(hint) is tuple:
            kind = "list of str"  # a TOML array, or a comma list with --set
        default = _value(value)
    cells = [
        f'<a id="{key}"></a>`{key}`',
        kind,
        f"`{default}`" if default != "" else '`""`',
        "`true`, `false`" if hint is bool else _allowed(key, meta),
        _text(meta.get("help", "")),
    ]
    return "| " + " | ".join(cells) + " |"


def _value(v: typing.Any) -> str:
    """A default as it is written in TOML or after ``--set``."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return v
    if isinstance(v, tuple):  # a list of strings, as TOML writes it
        return "[" + ", ".join(f'"{x}"' for x in v) + "]"
    return repr(v)


def _allowed(key: str, meta: typing.Mapping[str, typing.Any]) -> str:
    parts = []
    choices = meta.get("choices")
    if callable(choices):  # a registry's names
        try:
            choices = choices()
        except Exception as e:  # a registry whose optional package is missing: say so loudly
            log.warning(f"{key}: could not list its choices ({type(e).__name__}: {e})")
            choices = None
    if choices:
        parts.append(", ".join(f"`{c}`" for c in choices))
    for bound, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤")):
        b = meta.get(bound)
        if b is not None:
            parts.append(f"{sign} {b if isinstance(b, int) else f'{b:g}'}")
    if meta.get("allow_inf"):
        parts.append("`inf`")
    if meta.get("per_client"):
        parts.append("one value, or one per client")
    return "; ".join(parts)


def _own_doc(cls: type) -> str:
    """The section's docstring, unless it is the signature dataclasses writes for none."""
    doc = cls.__doc__ or ""
    return "" if doc.startswith(f"{cls.__name__}(") else " ".join(doc.split())


def _text(s: str) -> str:
    """Help text for a table cell: HTML and Markdown in it are shown as written, except
    backquoted spans, which stay code."""
    out = []
    for i, piece in enumerate(s.split("`")):
        if i % 2:
            out.append(f"`{piece}`")
        else:
            piece = html.escape(piece, quote=False)
            for ch in "\\*_[]":
                piece = piece.replace(ch, "\\" + ch)
            out.append(piece)
    return " ".join("".join(out).split()).replace("|", "\\|")
