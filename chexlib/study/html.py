"""The HTML page of an executed notebook, for reviewers: readable from disk, offline.

nbconvert's page loads require.js and MathJax from a CDN and keeps the
notebook's relative links (``NN_name.ipynb``), which do not resolve beside the
page in a run folder. A reader opening it from disk without a network would
see console errors and broken links, so the page drops those scripts (only
widget views need require.js; no notebook here has formulas) and points each
link at the notebook's source in ``notebooks/``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from chexlib.core.files import write_text_atomic
from chexlib.study.notebook import REPO

_CDN_SCRIPT = re.compile(
    r'<script src="https://cdnjs[^"]*/(?:require|mathjax)[^"]*">\s*</script>', re.I
)
_NOTEBOOK_LINK = re.compile(r'href="(\d\d\w*\.ipynb)(#[^"]*)?"')


def render_html(notebook: Path, target: Path | None = None) -> Path:
    """An HTML rendering of an executed notebook (beside it by default)."""
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(notebook, as_version=4)
    body, _ = HTMLExporter().from_notebook_node(nb)
    target = target or notebook.with_suffix(".html")
    write_text_atomic(target, offline_html(body, "widgets" in nb.metadata, target.parent))
    return target


def offline_html(body: str, widgets: bool, folder: Path) -> str:
    """``body`` without the CDN scripts (kept for widget views) and with its notebook links
    pointed at their sources, relative to ``folder`` (where the page is written)."""
    if not widgets:
        body = _CDN_SCRIPT.sub("", body)

    def source(m: re.Match) -> str:
        path = REPO / "notebooks" / m.group(1)
        if not path.is_file():
            return m.group(0)
        return f'href="{Path(os.path.relpath(path, folder)).as_posix()}{m.group(2) or ""}"'

    return _NOTEBOOK_LINK.sub(source, body)
