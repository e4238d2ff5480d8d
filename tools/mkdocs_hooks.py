"""mkdocs hooks of the book (mkdocs.yml `hooks:`): what mkdocs and mkdocs-jupyter lack.

- The walkthrough pages come from ``docs/walkthrough/*.ipynb``, the executed notebooks
  ``make publish`` writes. A notebook not published yet (a fresh clone before any study
  was published, or 04b and 04c, which no study runs) is rendered from ``notebooks/`` instead,
  without outputs, under a note that says so: ``make docs`` always builds.
- ``results.md`` is generated from README.md's results block (what ``make publish``
  writes between its markers), with the figure paths made relative to the book, so
  the book and the README never differ and no number is typed twice.
- Notebook pages link to each other by ``NN_name.ipynb`` (what GitHub follows);
  in the book those links are pointed at the rendered pages.
- mkdocs-jupyter's template writes nbconvert's MathJax loader (a ``<script>`` with an
  empty address, as no ``custom_mathjax_url`` is set; nbconvert's default is a CDN)
  and its configuration script; the walkthrough has no formulas and the book loads
  nothing from the network, so both are dropped.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ROOT / "notebooks"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
UNPUBLISHED = (
    "> **Not executed.** No study has been published into the book yet, so this page "
    "shows the notebook from `notebooks/` without outputs. `make study` executes it and "
    "`make publish` writes the executed copy (outputs and figures) to `docs/walkthrough/`."
)
NOT_IN_STUDY = (
    "> **Not executed by a study.** This notebook is run by hand (what it needs is in "
    "its header; JupyterLab: `make lab`), so it is shown without outputs."
)
_MATHJAX = re.compile(
    r"<!-- Load mathjax -->\s*<script[^>]*src=\"[^\"]*\"[^>]*>\s*</script>"
    r"|<!-- (?:MathJax configuration|End of mathjax configuration) -->"
    r"|<script type=\"text/x-mathjax-config\">.*?</script>",
    re.S | re.I,
)
_NOTEBOOK_LINK = re.compile(r"href=\"(?![a-z]+:)(?:[^\"#]*/)?(\d\d\w*?)\.ipynb(#[^\"]*)?\"")
_SOURCE_LINK = re.compile(r"\]\((?:\.\./)+notebooks/(\w+\.ipynb)\)")
_tmp: Path | None = None


def _studied(name: str) -> bool:
    """Whether a study spec runs this notebook (04b is run by hand)."""
    specs = (ROOT / "papermill_runs").glob("*.yaml")
    return any(f"notebook: {name}" in spec.read_text(encoding="utf-8") for spec in specs)


def _unpublished_copy(source: Path) -> Path:
    """The source notebook with the note under its title, as ``walkthrough/NAME`` in a
    folder deleted after the build."""
    global _tmp
    _tmp = _tmp or Path(tempfile.mkdtemp(prefix="chexlib-book-"))
    nb = json.loads(source.read_text(encoding="utf-8"))
    note = UNPUBLISHED if _studied(source.stem) else NOT_IN_STUDY
    cells = nb.get("cells", [])
    at = 1 if cells and cells[0].get("cell_type") == "markdown" else 0  # under the title
    cell = {"cell_type": "markdown", "id": "chexlib-not-executed", "metadata": {}, "source": note}
    cells.insert(at, cell)
    target = _tmp / "walkthrough" / source.name
    target.parent.mkdir(exist_ok=True)
    target.write_text(json.dumps(nb), encoding="utf-8")
    return target


def results_page(readme: str) -> str:
    """README.md's results block as a page, figure paths relative to docs/."""
    if readme.count(BEGIN) != 1 or readme.count(END) != 1:
        raise ValueError(f"README.md: needs exactly one {BEGIN} ... {END} block")
    block = readme.split(BEGIN, 1)[1].split(END, 1)[0]
    block = re.sub(r"\]\(docs/", "](", block)
    return (
        "# Results of the last study\n\n"
        "The block `make publish` writes into README.md, shown here as it is there. "
        "The walkthrough's executed notebooks show how each number was measured.\n"
        f"{block}"
    )


# Before mkdocs-jupyter's own on_files (priority 0), so the added notebooks are rendered.
@event_priority(50)
def on_files(files, config):
    docs = Path(config["docs_dir"])
    for source in sorted(SOURCES.glob("*.ipynb")):
        uri = f"walkthrough/{source.name}"
        if not (docs / uri).is_file():
            # a plain File (not File.generated): mkdocs-jupyter's wrapper reads its src_dir
            folder = _unpublished_copy(source).parent.parent
            site, flat = config["site_dir"], config["use_directory_urls"]
            files.append(File(uri, str(folder), site, flat))
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    files.append(File.generated(config, "results.md", content=results_page(readme)))
    return files


def on_page_markdown(markdown, page, config, files):
    """A link to a source notebook (``../../notebooks/04b_....ipynb``, what GitHub can
    follow where no executed copy is published) points at its walkthrough page."""
    prefix = "" if page.file.src_uri.startswith("walkthrough/") else "walkthrough/"
    return _SOURCE_LINK.sub(lambda m: f"]({prefix}{m.group(1)})", markdown)


def on_page_content(html, page, config, files):
    if not page.file.src_uri.endswith(".ipynb"):
        return html
    html = _MATHJAX.sub("", html)
    html = html.replace('href="README.md"', 'href="index.html"')  # the walkthrough's contents
    return _NOTEBOOK_LINK.sub(lambda m: f'href="{m.group(1)}.html{m.group(2) or ""}"', html)


def on_post_build(config):
    global _tmp
    if _tmp is not None:
        shutil.rmtree(_tmp, ignore_errors=True)
        _tmp = None
