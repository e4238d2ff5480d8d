"""What each notebook reads and writes, and the order that follows from it.

Each notebook's folder parameters are declared here once: those it reads (with
the notebooks whose outputs they hold) and those it writes. From them:

* :data:`WALKTHROUGH`, the reading order (every notebook after those it reads);
  the notebooks' headers link previous / next and the notebooks they read by it;
* :func:`order_problems`: in a study, a run that reads a folder some other
  run writes must come in a later stage (a stage's runs may run at once).
  ``tests/test_notebook_order.py`` checks every spec in ``papermill_runs/``.
"""

from __future__ import annotations

import ast
import fnmatch
import os
from dataclasses import dataclass
from pathlib import Path

from chexlib.study.notebook import notebook_path


@dataclass(frozen=True)
class NotebookIO:
    """A notebook's folder parameters.

    Attributes:
        reads: parameter -> the notebooks whose outputs it names (none: outside data).
        writes: parameter -> the boolean parameter that must be true for the
            write (None: always).
    """

    reads: dict[str, tuple[str, ...]]
    writes: dict[str, str | None]


_DATA = "01_data_prep"
_TRAIN = "04_distributed_training"
NOTEBOOKS: dict[str, NotebookIO] = {
    # GENERATE writes the dataset (or finishes a generated one cut short)
    _DATA: NotebookIO({"DATA_DIR": ()}, {"DATA_DIR": "GENERATE", "OUTPUT_DIR": None}),
    "02_tfrecord_conversion": NotebookIO(
        {"DATA_DIR": (_DATA,)}, {"RECORDS_DIR": None, "OUTPUT_DIR": None}
    ),
    # GENERATE writes only into a folder holding no dataset: never over another stage's
    "03_pipeline_profiling": NotebookIO({"DATA_DIR": (_DATA,)}, {"OUTPUT_DIR": None}),
    _TRAIN: NotebookIO(
        {"DATA_DIR": (_DATA,), "RECORDS_DIR": ("02_tfrecord_conversion",)}, {"OUTPUT_DIR": None}
    ),
    "04b_interactive_horovod": NotebookIO({"DATA_DIR": (_DATA,)}, {"OUTPUT_DIR": None}),
    # its training runs go under OUTPUT_DIR/runs (on the local cluster's nodes)
    "04c_cluster_scaling": NotebookIO(
        {"DATA_DIR": (_DATA,), "RECORDS_DIR": ("02_tfrecord_conversion",)}, {"OUTPUT_DIR": None}
    ),
    "06_explain": NotebookIO({"RUN_DIR": (_TRAIN,), "DATA_DIR": (_DATA,)}, {"OUTPUT_DIR": None}),
    # every run record of the study (RUN_DIRS: runs made by hand with 04 or 04b)
    "05_summary": NotebookIO(
        {
            "STUDY_DIR": (
                _DATA,
                "02_tfrecord_conversion",
                "03_pipeline_profiling",
                _TRAIN,
                "04c_cluster_scaling",
                "06_explain",
            ),
            "RUN_DIRS": (_TRAIN, "04b_interactive_horovod"),
        },  # fmt: skip
        {"OUTPUT_DIR": None},
    ),
}
# The reading order: the numbering, except that the summary (05) reads Grad-CAM's (06).
WALKTHROUGH = (
    _DATA, "02_tfrecord_conversion", "03_pipeline_profiling", _TRAIN,
    "04b_interactive_horovod", "04c_cluster_scaling", "06_explain", "05_summary",
)  # fmt: skip


def read_from(notebook: str) -> list[str]:
    """The notebooks whose outputs ``notebook`` reads, in walkthrough order."""
    producers = {p for names in NOTEBOOKS[notebook].reads.values() for p in names}
    return [name for name in WALKTHROUGH if name in producers]


def parameter_defaults(notebook: str | Path) -> dict:
    """The values the notebook's ``parameters`` cell assigns (plain literals)."""
    import nbformat  # here: only the order check reads notebooks

    path = Path(notebook) if Path(notebook).is_file() else notebook_path(str(notebook))
    nb = nbformat.read(path, as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    found = {}
    for node in ast.parse("\n".join(c.source for c in cells)).body:
        if isinstance(node, ast.AnnAssign | ast.Assign) and node.value is not None:
            targets = [node.target] if isinstance(node, ast.AnnAssign) else node.targets
            for target in targets:
                found[target.id] = ast.literal_eval(node.value)
    return found


def _paths(value, run_dir: Path) -> list[str]:
    """A parameter's folder(s), absolute (relative ones from the run's folder)."""
    values = value if isinstance(value, list | tuple) else [value]
    return [
        os.path.normpath(run_dir / str(v)) if not os.path.isabs(str(v)) else os.path.normpath(v)
        for v in values
        if isinstance(v, str) and v
    ]


def overlap(a: str, b: str) -> bool:
    """One path is the other or inside it; each part of either may be a glob pattern."""
    parts_a, parts_b = Path(a).parts, Path(b).parts
    return all(
        fnmatch.fnmatchcase(x, y) or fnmatch.fnmatchcase(y, x)
        for x, y in zip(parts_a, parts_b, strict=False)
    )


def run_io(notebook: str, parameters: dict, run_dir: Path) -> tuple[list[str], list[str]]:
    """The folders a run reads and writes; ``([], [])`` for a notebook not declared here."""
    name = Path(notebook).stem
    if name not in NOTEBOOKS:
        return [], []
    io, values = NOTEBOOKS[name], {**parameter_defaults(notebook), **parameters}
    reads = [p for key in io.reads for p in _paths(values.get(key), run_dir)]
    writes = [
        p
        for key, condition in io.writes.items()
        if condition is None or values.get(condition)
        for p in _paths(values.get(key), run_dir)
    ]
    return reads, writes


def order_problems(runs) -> list[str]:
    """Each run (:class:`chexlib.study.runner.Run`, in spec order) that reads a folder
    another run writes without that run being in an earlier stage."""
    stages = list(dict.fromkeys(run.stage for run in runs))
    io = {run.run_dir: run_io(run.notebook, run.parameters, run.run_dir) for run in runs}
    problems = []
    for reader in runs:
        for writer in runs:
            if writer is reader or stages.index(writer.stage) < stages.index(reader.stage):
                continue
            shared = [
                r for r in io[reader.run_dir][0] for w in io[writer.run_dir][1] if overlap(r, w)
            ]
            if shared:
                problems.append(
                    f"stage {reader.stage} ({Path(reader.notebook).stem}) reads {shared[0]}, "
                    f"which stage {writer.stage} ({Path(writer.notebook).stem}) writes "
                    f"{'in the same stage' if writer.stage == reader.stage else 'after it'}"
                )
    return problems


def _link(name: str) -> str:
    return f"[{name.replace('_', ' ')}]({name}.ipynb)"


def header_links(notebook: str) -> str:
    """The header's Markdown line of links: the notebooks it reads, those that read
    it, and previous / next in :data:`WALKTHROUGH`."""
    i = WALKTHROUGH.index(notebook)
    readers = [name for name in WALKTHROUGH if notebook in read_from(name)]
    previous = _link(WALKTHROUGH[i - 1]) if i > 0 else "none (the first)"
    following = _link(WALKTHROUGH[i + 1]) if i + 1 < len(WALKTHROUGH) else "none (the last)"
    return (
        f"**Reads:** {', '.join(map(_link, read_from(notebook))) or 'no other notebook'}"
        f" · **Read by:** {', '.join(map(_link, readers)) or 'no other notebook'}"
        f" · **Previous:** {previous} · **Next:** {following}"
    )
