"""MkDocs hook: the site's landing page is the repository's README.md.

The README is the guide on GitHub; the site shows the same text as ``index.md``, with its links
into ``docs/`` made relative to the site (``docs/ray.md#x`` becomes ``ray.md#x``). Any other
relative link in the README is left as it is, so ``mkdocs build --strict`` fails on it.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File

LINK_INTO_DOCS = re.compile(r"\]\(docs/")


def on_files(files, config):
    readme = Path(config["config_file_path"]).parent / "README.md"
    text = LINK_INTO_DOCS.sub("](", readme.read_text(encoding="utf-8"))
    files.append(File.generated(config, "index.md", content=text))
    return files
