"""The book and what feeds it: the README's size and links, the book's contents, the
executed notebooks `make publish` writes, and `make docs` on what is committed.

The pages themselves are opened in a browser by tests/test_browser.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from chexlib.report import notebooks
from chexlib.report.notebooks import NotebookTooLarge, executed_notebooks, publish_notebooks
from chexlib.report.publish import BEGIN, END

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
MAX_README_LINES = 250
LINK = re.compile(r"\]\(([^)\s]+)\)")


# --- the README and the pages -----------------------------------------------------------


def test_readme_is_short_and_keeps_publish_markers():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    lines = text.count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines: move detail into docs/"
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    assert text.index(BEGIN) < text.index(END)


def _local_links(page: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
    return [t for t in LINK.findall(text) if not re.match(r"^[a-z]+:", t) and not t.startswith("#")]


@pytest.mark.parametrize(
    "page", [REPO / "README.md", *sorted(DOCS.glob("*.md")), DOCS / "walkthrough" / "README.md"],
    ids=lambda p: str(p.relative_to(REPO)),
)  # fmt: skip
def test_links_of_the_readme_and_the_pages_name_files_that_exist(page):
    """What GitHub follows: each relative link names a file of the repository."""
    missing = []
    for target in _local_links(page):
        path = target.split("#", 1)[0]
        if path and not (page.parent / path).exists():
            missing.append(target)
    # the walkthrough's notebooks exist once a study is published; until then, the sources
    if page.parent.name == "walkthrough":
        missing = [m for m in missing if not (REPO / "notebooks" / m.split("#")[0]).is_file()]
    assert not missing, f"{page.relative_to(REPO)}: {missing}"


def _nav_files(nav) -> list[str]:
    found = []
    for item in nav:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        found += _nav_files(value) if isinstance(value, list) else [value]
    return found


def test_the_book_contents_list_every_page_and_every_notebook():
    config = yaml.load((REPO / "mkdocs.yml").read_text(), Loader=yaml.BaseLoader)
    listed = _nav_files(config["nav"])
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.glob("*.md")}
    generated = {"results.md"}  # tools/mkdocs_hooks.py writes it from the README's block
    assert pages | generated == {p for p in listed if "/" not in p}
    sources = {f"walkthrough/{p.name}" for p in (REPO / "notebooks").glob("*.ipynb")}
    assert sources == {p for p in listed if p.endswith(".ipynb")}
    for name in ("mkdocs", "mkdocs-material", "mkdocs-jupyter", "playwright"):  # pinned
        assert re.search(rf"^{name}==", (REPO / "requirements/constraints.txt").read_text(), re.M)


# --- the executed notebooks make publish writes -------------------------------------------


def _notebook(title: str, outputs: list[dict], links: str = "") -> dict:
    return {
        "nbformat": 4, "nbformat_minor": 5,
        "metadata": {"kernelspec": {"name": "chexlib"}, "widgets": {"state": {"x": "y" * 1000}}},
        "cells": [
            {"cell_type": "markdown", "id": "t", "metadata": {}, "source": f"# {title}\n{links}"},
            {"cell_type": "code", "id": "c", "metadata": {}, "source": "run()",
             "execution_count": 1, "outputs": outputs},
        ],
    }  # fmt: skip


def _run(study: Path, stage: str, run: str, name: str, nb: dict, status="complete") -> Path:
    folder = study / stage / run
    folder.mkdir(parents=True)
    marker = {"stage": stage, "notebook": name, "status": status, "parameters": {}}
    (folder / "run.json").write_text(json.dumps(marker))
    (folder / f"{name}.ipynb").write_text(json.dumps(nb))
    return folder


WIDGET = {
    "output_type": "display_data", "metadata": {},
    "data": {"application/vnd.jupyter.widget-view+json": {"model_id": "m"}, "text/plain": "50%"},
}  # fmt: skip
LONG = {"output_type": "stream", "name": "stdout", "text": "line\n" * 10_000}
FIGURE = {"output_type": "display_data", "metadata": {}, "data": {"image/png": "iVBOR" * 100}}


def test_publish_writes_trimmed_linked_notebooks(tmp_path):
    study, folder, sources = tmp_path / "study", tmp_path / "docs" / "walkthrough", tmp_path / "nb"
    sources.mkdir()
    (sources / "04b_interactive_horovod.ipynb").write_text("{}")
    _run(study, "data", "a1", "01_data_prep", _notebook("01 · Data", [WIDGET, LONG, FIGURE]))
    # notebook 04 run in two stages: the stage that ran it once is shown
    _run(study, "train", "r1", "04_distributed_training", _notebook("04 · Train", []))
    _run(study, "train", "r2", "04_distributed_training", _notebook("04 · Train", []))
    learn = _run(study, "learning", "l1", "04_distributed_training", _notebook("04 · L", [FIGURE]))
    _run(study, "explain", "x1", "06_explain", _notebook("06 · Explain", []), status="failed")
    links = "[04b](04b_interactive_horovod.ipynb) [01](01_data_prep.ipynb) [05](05_summary.ipynb)"
    summary = _notebook("05 · Summary", [FIGURE], links)
    _run(study, "summary", "", "05_summary", summary)  # output_dir: summary/05_summary.ipynb
    assert executed_notebooks(study)["04_distributed_training"] == learn / (
        "04_distributed_training.ipynb"
    )

    written = publish_notebooks(study, folder, Path("outputs/demo"), sources)
    assert [p.name for p in written] == [
        "01_data_prep.ipynb", "04_distributed_training.ipynb", "05_summary.ipynb"
    ]  # the failed explain run is not published  # fmt: skip
    nb01 = json.loads((folder / "01_data_prep.ipynb").read_text())
    assert "widgets" not in nb01["metadata"]
    outputs = nb01["cells"][1]["outputs"]
    assert outputs[0]["data"] == {"text/plain": "50%"}  # the widget's text stays
    assert len(outputs[1]["text"]) < 5_000 and "characters cut" in outputs[1]["text"]
    assert outputs[2] == FIGURE  # figures kept as they are
    nav = nb01["cells"][-1]
    assert nav["metadata"]["tags"] == [notebooks.NAV_TAG]
    assert "Next: [04 · L](04_distributed_training.ipynb)" in nav["source"]
    assert "[All notebooks](README.md)" in nav["source"] and "Previous" not in nav["source"]
    assert "`outputs/demo/data/a1`" in nav["source"]
    nb05 = json.loads((folder / "05_summary.ipynb").read_text())
    # 04b is not published: its link goes to the source; 01 and 05 are
    assert "[04b](../../nb/04b_interactive_horovod.ipynb)" in nb05["cells"][0]["source"]
    assert "[01](01_data_prep.ipynb) [05](05_summary.ipynb)" in nb05["cells"][0]["source"]
    assert "Previous: [04 · L](04_distributed_training.ipynb)" in nb05["cells"][-1]["source"]

    # republished from a study without notebook 04: its copy goes, no second nav cell
    (learn / "run.json").unlink()
    for run in ("r1", "r2"):
        (study / "train" / run / "run.json").unlink()
    (folder / "keep.txt").write_text("not publish's")
    publish_notebooks(study, folder, Path("outputs/demo"), sources)
    assert sorted(p.name for p in folder.iterdir()) == [
        ".published.json", "01_data_prep.ipynb", "05_summary.ipynb", "keep.txt"
    ]  # fmt: skip
    nb01 = json.loads((folder / "01_data_prep.ipynb").read_text())
    tagged = [c for c in nb01["cells"] if notebooks.NAV_TAG in c["metadata"].get("tags", [])]
    assert len(tagged) == 1 and "Next: [05 · Summary]" in tagged[0]["source"]


def test_publish_refuses_a_notebook_too_large_and_writes_nothing(tmp_path, monkeypatch):
    study, folder = tmp_path / "study", tmp_path / "walkthrough"
    _run(study, "data", "a", "01_data_prep", _notebook("01", [FIGURE]))
    _run(study, "summary", "", "05_summary", _notebook("05", [FIGURE] * 30))
    monkeypatch.setattr(notebooks, "MAX_BYTES", 10_000)
    monkeypatch.setattr(notebooks, "WARN_BYTES", 2_000)
    with pytest.raises(NotebookTooLarge, match="05_summary.ipynb: .* MB once trimmed"):
        publish_notebooks(study, folder, Path("s"))
    assert not folder.exists()
    monkeypatch.setattr(notebooks, "MAX_BYTES", 100_000)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        publish_notebooks(study, folder, Path("s"))
    assert any("05_summary.ipynb" in str(w.message) for w in caught)


def test_publish_results_writes_the_walkthrough_beside_the_figures(tmp_path):
    """`chexlib publish-results` (what `make publish` runs) writes the notebooks too."""
    study = tmp_path / "outputs" / "demo"
    _run(study, "data", "a", "01_data_prep", _notebook("01", [FIGURE]))
    summary = _run(study, "summary", "", "05_summary", _notebook("05", [FIGURE]))
    (summary / "metrics.json").write_text(json.dumps({"conclusions": "- ok"}))
    readme = tmp_path / "README.md"
    readme.write_text(f"# r\n{BEGIN}\nold\n{END}\n")
    res = subprocess.run(
        [sys.executable, "-m", "chexlib.cli.main", "publish-results", str(summary),
         "--readme", str(readme), "--docs", str(tmp_path / "docs" / "results")],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in (tmp_path / "docs" / "walkthrough").glob("*.ipynb")) == [
        "01_data_prep.ipynb", "05_summary.ipynb"
    ]  # fmt: skip
    nav = json.loads((tmp_path / "docs/walkthrough/01_data_prep.ipynb").read_text())["cells"][-1]
    assert "`outputs/demo/data/a`" in nav["source"]  # named relative to the README


# --- make docs on what is committed ---------------------------------------------------------


def test_make_docs_builds_the_book_from_what_is_committed(tmp_path):
    """The book builds with no study (notebooks not published are shown from notebooks/,
    under a note), its results page is the README's block, and no page loads a script or
    stylesheet from the network."""
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    mkdocs = Path(sys.executable).parent / "mkdocs"
    res = subprocess.run([mkdocs, "build", "--strict", "-d", site], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    published = {p.stem for p in (DOCS / "walkthrough").glob("*.ipynb")}
    for source in (REPO / "notebooks").glob("*.ipynb"):
        page = (site / "walkthrough" / f"{source.stem}.html").read_text(encoding="utf-8")
        assert ("Not executed" in page) == (source.stem not in published), source.stem
        assert 'href="' + source.name not in page  # links between notebooks open pages
        assert "mathjax" not in page.lower()  # no loader (an empty or a CDN address)
    results = (site / "results.html").read_text(encoding="utf-8")
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for figure in re.findall(r"\]\(docs/(results/[^)]+\.png)\)", readme.split(BEGIN)[1]):
        assert f'src="{figure}"' in results and (site / figure).is_file()
    for page in site.rglob("*.html"):
        loads = re.findall(
            r"<(?:script|link)[^>]+(?:src|href)=\"(https?:[^\"]+)\"", page.read_text()
        )
        assert not loads, f"{page.relative_to(site)} loads {loads}"
