"""No measured figure typed in a notebook's Markdown; every notebook opens with the
same header (answers, in, out, time computed, links); the prose helpers compute.

What counts as a typed figure (:func:`typed_figures`), in a Markdown cell outside
fenced code blocks:

* a number with a unit a run measures: ``s``, ``ms``, ``sec``/``seconds``,
  ``min``/``minutes``, ``h``/``hours``, ``core-minutes``, ``%``, ``x`` (a ratio:
  ``1.39x``, ``0.88 x the``; not ``1024 x 1024``, a size), ``images/s``,
  ``KB``/``MB``/``GB``/``TB``, ``points``; a range (``8-15 %``, ``17-96 s``) counts once;
* a ratio in words or digits: ``a tenth``, ``a fifth``, ``a quarter``, ``a third``,
  ``a half``, ``ten times longer``, ``twice as``, ``1/4``;
* the hardware typed: ``N cores``, ``N CPU cores``, ``N GPUs``, ``N V100s``,
  ``N-core``, and the word ``laptop`` (the machine is named by ``chexlib.core.machine``).

Not counted: inline code (a parameter, a formula: ``images/s(2) / (2 x images/s(1))``)
unless the code span is nothing but a figure (```68 s``` counts), and the phrases of
:data:`ALLOWED`, each for one notebook with its reason. Everything measured is
printed by a generated cell (``chexlib.walkthrough.prose``).
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from chexlib.study.dataflow import NOTEBOOKS, WALKTHROUGH, header_links
from chexlib.study.notebook import NOTEBOOK_DIR
from chexlib.walkthrough import prose

_NUM = r"[+-]?\d[\d,]*(?:\.\d+)?"
_UNIT = (
    r"(?:%|x(?!\s*\d)|×(?!\s*\d)|ms|sec|seconds?|s|min|minutes?|h|hours?|core-minutes"
    r"|core-hours|images/s|img/s|KB|kB|MB|GB|TB|points?)"
)
FIGURE = re.compile(rf"(?<![\w.]){_NUM}(?:\s*(?:-|–|to)\s*{_NUM})?\s*{_UNIT}(?![\w/])")
RATIO = re.compile(
    r"\b(?:a|one)\s+(?:half|third|quarter|fifth|tenth|hundredth)\b"
    r"|\b(?:twice|thrice|\w+\s+times)\s+(?:as|faster|slower|longer|shorter|more|less|larger|smaller)\b"
    r"|(?<![\w./])\d+(?:\.\d+)?/\d+(?![\w/])",
    re.I,
)
HARDWARE = re.compile(
    r"\b\d[\d,]*\s+(?:CPU\s+)?(?:cores?|GPUs?|V100s?|A100s?|H100s?)(?![-\w])|\b\d+-core\b|\blaptop\b",
    re.I,
)
# (notebook, exact phrase): why it is not a measurement. Keep it short.
ALLOWED = {
    ("04_distributed_training", "16 V100s"): "the poster's setup (reference.POSTER_HARDWARE)",
}
_FENCED = re.compile(r"```.*?```", re.S)
_CODE_SPAN = re.compile(r"`([^`\n]+)`")


def _strip_code(text: str) -> str:
    """Fenced blocks and inline code removed, except a code span that is only a figure."""
    text = _FENCED.sub(" ", text)
    return _CODE_SPAN.sub(
        lambda m: m.group(0) if FIGURE.fullmatch(m.group(1).strip()) else " ", text
    )


def typed_figures(markdown: str, notebook: str = "") -> list[str]:
    """The measured figures typed in one Markdown text, minus :data:`ALLOWED`."""
    text = _strip_code(markdown)
    found = [m.group(0) for pattern in (FIGURE, RATIO, HARDWARE) for m in pattern.finditer(text)]
    return [f for f in found if (notebook, f) not in ALLOWED]


def notebook_figures(path: Path) -> list[str]:
    """``<notebook> cell <id>: <figure> in '...'`` for every typed figure of a notebook."""
    nb = nbformat.read(path, as_version=4)
    problems = []
    for cell in nb.cells:
        if cell.cell_type != "markdown":
            continue
        for figure in typed_figures(cell.source, path.stem):
            problems.append(f"{path.stem} cell {cell.get('id')}: {figure!r}")
    return problems


def notebook_paths() -> list[Path]:
    return sorted(NOTEBOOK_DIR.glob("*.ipynb"))


def test_no_notebook_types_a_measured_figure_in_markdown():
    problems = [p for path in notebook_paths() for p in notebook_figures(path)]
    assert not problems, (
        "measured figures typed in Markdown (print them from a generated cell, "
        "chexlib.walkthrough.prose):\n" + "\n".join(problems)
    )


@pytest.mark.parametrize(
    "text",
    [
        "measured: 68 s in the demo study",
        "about 3 minutes with the demo's settings",
        "9 minutes in all",
        "the table shows 1.39x",
        "png-records is 0.88 x raw",
        "costs only 8-15 % against TFRecords",
        "reports **+8 % to +13 %** training throughput",
        "the stand-in costs about a tenth of the input",
        "is ten times longer than its rate gives",
        "its own figures give 1/4",
        "about 18 images/s at 128 px",
        "writing about 45 GB of records",
        "Time on a laptop CPU",
        "on a machine with 2 CPU cores",
        "under a minute on a 40-core node",
        "typed in code: `68 s`",
    ],
)
def test_a_typed_figure_is_found(text):
    assert typed_figures(text), text


@pytest.mark.parametrize(
    "text",
    [
        "a 1024 x 1024 PNG resized to 224 x 224",
        "so `images/s(2) / (2 x images/s(1))` measures what Horovod's allreduce costs",
        "`MIN_WINDOW_SEC = 1.0` keeps a floor",
        "## 3 · Train on every rank",
        "Each finding becomes a column of 0 and 1",
        "```python\nlr = 0.1 * 5 %\n```",
        "half a cell below and right",
    ],
)
def test_what_is_not_a_measured_figure_passes(text):
    assert not typed_figures(text), text


def test_a_figure_planted_in_a_real_notebook_is_found(tmp_path):
    path = NOTEBOOK_DIR / "03_pipeline_profiling.ipynb"
    nb = nbformat.read(path, as_version=4)
    cell = next(c for c in nb.cells[2:] if c.cell_type == "markdown")
    cell.source += "\n\nThe optimized pipeline is 2.4x faster here."
    planted = tmp_path / path.name
    nbformat.write(nb, planted)
    assert notebook_figures(planted) == [f"03_pipeline_profiling cell {cell.id}: '2.4x'"]


def test_every_notebook_is_declared_and_in_the_walkthrough():
    names = {path.stem for path in notebook_paths()}
    assert names == set(NOTEBOOKS) == set(WALKTHROUGH)


@pytest.mark.parametrize("name", WALKTHROUGH)
def test_every_notebook_opens_with_the_header_and_closes_with_its_time(name):
    nb = nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)
    head, generated, last = nb.cells[0], nb.cells[1], nb.cells[-1]
    assert head.cell_type == "markdown" and head.source.startswith(f"# {name[:3].rstrip('_')} · ")
    for part in ("**Answers:**", "**In:**", "**Out:**", "**Time:** measured, never typed"):
        assert f"> - {part}" in head.source, (name, part)
    assert f"> - {header_links(name)}" in head.source, (name, "links")
    assert generated.metadata.get("tags") == ["generated-header"]
    assert generated.source == f'from chexlib.walkthrough import prose\n\nprose.header("{name}")'
    assert last.metadata.get("tags") == ["generated-time"]
    assert last.source == f'prose.run_time("{name}")'
    assert not generated.outputs and not last.outputs
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1


def _run(
    outputs: Path, study: str, stage: str, notebook: str, seconds, status="complete", env=None
):
    run_dir = outputs / study / stage / f"r{len(list(outputs.rglob('run.json')))}"
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(
        f'{{"stage": "{stage}", "notebook": "{notebook}", "status": "{status}", '
        f'"seconds": {seconds}}}'
    )
    if env:
        (run_dir / "metrics.json").write_text(
            f'{{"environment": {{"cpu": "{env[1]}", "cpu_count": {env[0]}}}}}'
        )


def test_header_time_comes_from_the_records_or_says_not_measured(tmp_path):
    assert prose.NOT_MEASURED in prose.time_text("01_data_prep", tmp_path)
    _run(tmp_path, "demo", "train", "04_distributed_training", 17.2, env=(2, "Test CPU"))
    _run(tmp_path, "demo", "models", "/abs/notebooks/04_distributed_training.ipynb", 96.0)
    _run(tmp_path, "demo", "train", "04_distributed_training", 400.0, status="failed")
    _run(tmp_path, "demo", "data", "01_data_prep", 81.0, env=(2, "Test CPU"))
    text = prose.time_text("04_distributed_training", tmp_path)
    assert "study `demo`: 2 runs, 17 s to 96 s each, 1.9 min in all" in text
    assert "2 CPU cores of Test CPU" in text and "hardware not recorded" in text
    assert "81 s" not in text and "400" not in text and prose.NOT_MEASURED not in text


def test_a_study_run_also_reads_its_own_studys_records(tmp_path, monkeypatch):
    _run(tmp_path, "smoke", "train", "04_distributed_training", 30.0)
    here = tmp_path / "smoke" / "train" / "r1"  # a run of the same stage, now running
    here.mkdir()
    (here / "run.json").write_text('{"stage": "train", "status": "running"}')
    monkeypatch.chdir(here)
    assert prose.study_roots()[1:] == [tmp_path]
    assert f"study `{tmp_path / 'smoke'}`: 1 run, 30 s;" in prose.time_text(
        "04_distributed_training"
    )
    summary = tmp_path / "smoke" / "summary"  # a collecting run: <root>/<study>/<folder>
    summary.mkdir()
    (summary / "run.json").write_text('{"stage": "summary", "status": "running"}')
    monkeypatch.chdir(summary)
    assert prose.study_roots()[1:] == [tmp_path]


def test_header_and_closing_cells_compute_this_run(tmp_path):
    shown = prose.header("06_explain", tmp_path).data
    assert prose.NOT_MEASURED in shown and prose.this_machine() in shown
    assert "This run took **" in prose.run_time("06_explain").data
    assert prose.NOT_MEASURED in prose.run_time("no_such_notebook").data


def test_prose_formats_numbers_it_is_given():
    assert [prose.seconds_text(s) for s in (68, 188, 654, 9000)] == [
        "68 s", "3.1 min", "10.9 min", "2.5 h",
    ]  # fmt: skip
    gain = prose.poster_records_gain_text()
    assert "+8.39 %" in gain and "+13.1 %" in gain and "POSTER_RECORDS_GAIN" in gain
    train = pd.DataFrame({
        "model": ["densenet121", "densenet121", "standin", "standin"],
        "pipeline": ["naive", "optimized", "naive", "optimized"],
        "input": ["raw PNG"] * 4, "ranks": [1] * 4, "pin_cores": [0] * 4,
        "images_per_sec": [10.0, 13.9, 50.0, 120.0],
        "bound": ["compute-bound", "compute-bound", "input-bound", "input-bound"],
    })  # fmt: skip
    text = prose.naive_vs_optimized_text(train)
    assert "**densenet121**: optimized / naive = **1.39x**" in text
    assert "the naive run is compute-bound" in text and "**2.40x**" in text
