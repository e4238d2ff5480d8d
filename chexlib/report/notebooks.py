"""A study's executed notebooks, made fit to keep in the repository (docs/walkthrough/).

``make publish`` writes one executed copy of each walkthrough notebook the study ran,
outputs and figures kept, so GitHub shows the walkthrough rendered and ``make docs``
builds the book from what is committed. What only a live kernel can use is removed
(widget state: GitHub and the offline book cannot run it, and it is most of a
notebook's size when tqdm drew progress bars), long text outputs are cut to their head
and tail, and a notebook still too large after that is refused: a repository is no
place for a notebook GitHub will not render.

Which run of a notebook the study ran many times is shown: the run of a stage that
ran it once (the demo's learning run of notebook 04, which trains and evaluates), else
the first run, by name, of the first stage that ran it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import warnings
from pathlib import Path

from chexlib.core.files import RecordError, read_json, write_json, write_text_atomic
from chexlib.core.runs import RecordWarning

# GitHub stops rendering notebooks somewhere above a few MB; the demo's are under 1 MB.
WARN_BYTES = 2_000_000
MAX_BYTES = 5_000_000
MAX_TEXT_CHARS = 4_000  # per text output; head and tail kept
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
NAV_TAG = "chexlib-walkthrough-nav"
# in each folder publish writes (docs/results, docs/walkthrough): the files it wrote there
PUBLISHED = ".published.json"
_LINK = re.compile(r"\]\((\d\d\w*)\.ipynb(#[^)]*)?\)")  # ](04b_interactive_horovod.ipynb#part)


class NotebookTooLarge(RuntimeError):
    """An executed notebook stays above :data:`MAX_BYTES` once trimmed."""


def executed_notebooks(study_dir: str | Path) -> dict[str, Path]:
    """Notebook name (``01_data_prep``) -> the executed copy to show, from the study's
    ``run.json`` markers of complete runs (``stage/run/run.json`` or ``stage/run.json``)."""
    study_dir = Path(study_dir)
    stages: dict[str, dict[str, list[Path]]] = {}  # notebook -> stage -> run folders
    markers = [*study_dir.glob("*/run.json"), *study_dir.glob("*/*/run.json")]
    for marker in sorted(markers, key=lambda m: m.stat().st_mtime):  # stages in run order
        try:
            run = read_json(marker, expect=dict)
        except RecordError as err:  # the other runs are still worth showing
            warnings.warn(f"not published: {err}", RecordWarning, stacklevel=2)
            continue
        name = run.get("notebook")
        if run.get("status") != "complete" or not isinstance(name, str):
            continue
        if (marker.parent / f"{name}.ipynb").is_file():
            stage = stages.setdefault(name, {}).setdefault(str(run.get("stage")), [])
            stage.append(marker.parent)
    chosen = {}
    for name, by_stage in stages.items():
        runs = next((r for r in by_stage.values() if len(r) == 1), None)
        runs = runs or next(iter(by_stage.values()))
        chosen[name] = sorted(runs)[0] / f"{name}.ipynb"
    return dict(sorted(chosen.items()))


def _cut(text: str, limit: int = MAX_TEXT_CHARS) -> str:
    if len(text) <= limit:
        return text
    head, tail = text[: limit // 2], text[-limit // 2 :]
    cut = len(text) - len(head) - len(tail)
    return f"{head}\n[... {cut:,} characters cut by chexlib publish-results ...]\n{tail}"


def _joined(value) -> str:
    return "".join(value) if isinstance(value, list) else str(value)


def trim(nb: dict) -> dict:
    """A copy of a notebook (nbformat 4 JSON) without widget state and with long text
    outputs cut; images, tables and every cell's source are kept."""
    nb = copy.deepcopy(nb)
    nb.get("metadata", {}).pop("widgets", None)
    for cell in nb.get("cells", []):
        outputs = []
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                out["text"] = _cut(_joined(out.get("text", "")))
            data = out.get("data")
            if isinstance(data, dict):
                data.pop(WIDGET_VIEW, None)  # its text/plain fallback stays
                if "text/plain" in data:
                    data["text/plain"] = _cut(_joined(data["text/plain"]))
                if not data:
                    continue  # a widget with no fallback shows nothing without a kernel
            outputs.append(out)
        if "outputs" in cell:
            cell["outputs"] = outputs
    return nb


def _title(nb: dict, name: str) -> str:
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "markdown":
            for line in _joined(cell.get("source", "")).splitlines():
                if line.startswith("# "):
                    return line[2:].strip()
    return name


def add_navigation(nb: dict, before: tuple[str, str] | None, after: tuple[str, str] | None,
                   source: str) -> dict:  # fmt: skip
    """The notebook with a last cell linking the notebooks before and after it (name,
    title) and the walkthrough's contents, and saying where the copy was executed.
    A navigation cell of an earlier publish is replaced, never stacked."""
    nb = copy.deepcopy(nb)
    cells = [c for c in nb.get("cells", []) if NAV_TAG not in c.get("metadata", {}).get("tags", [])]
    links = []
    if before:
        links.append(f"Previous: [{before[1]}]({before[0]}.ipynb)")
    links.append("[All notebooks](README.md)")
    if after:
        links.append(f"Next: [{after[1]}]({after[0]}.ipynb)")
    text = (
        "---\n\n" + " · ".join(links) + "\n\n"
        f"*Executed by `chexlib study` in `{source}`; outputs as that run wrote them, "
        "copied here by `make publish`.*"
    )
    cells.append({"cell_type": "markdown", "id": NAV_TAG, "metadata": {"tags": [NAV_TAG]},
                  "source": text})  # fmt: skip
    nb["cells"] = cells
    return nb


def point_links(nb: dict, published: set[str], sources: Path, relative: str) -> dict:
    """The notebook with its links to a notebook not published beside it (04b, which no
    study runs) pointed at its source in ``sources``, by the path ``relative`` to it."""
    nb = copy.deepcopy(nb)

    def target(m: re.Match) -> str:
        if m.group(1) in published or not (sources / f"{m.group(1)}.ipynb").is_file():
            return m.group(0)
        return f"]({relative}/{m.group(1)}.ipynb{m.group(2) or ''})"

    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "markdown":
            cell["source"] = _LINK.sub(target, _joined(cell.get("source", "")))
    return nb


def published_files(folder: Path, what: str = "file") -> list[str]:
    """Names of the files an earlier publish wrote into ``folder`` (from :data:`PUBLISHED`).

    Only plain file names are trusted (no folders, no ``..``, no hidden files), so a
    damaged or edited list can never make publish delete anything outside ``folder``.
    An unreadable list is reported and treated as empty: no earlier ``what`` is deleted.
    """
    listing = folder / PUBLISHED
    if not listing.is_file():
        return []
    try:
        files = read_json(listing, expect=dict).get("files", [])
    except RecordError as err:
        warnings.warn(f"{err}; no earlier {what} is deleted", RecordWarning, stacklevel=3)
        return []
    files = files if isinstance(files, list) else []
    return [
        f
        for f in files
        if isinstance(f, str) and f == Path(f).name and not f.startswith(".") and f != PUBLISHED
    ]


def _encoded(nb: dict, name: str) -> str:
    text = json.dumps(nb, indent=1, ensure_ascii=False) + "\n"
    size = len(text.encode("utf-8"))
    if size > MAX_BYTES:
        raise NotebookTooLarge(
            f"{name}: {size / 1e6:.1f} MB once trimmed, above the {MAX_BYTES / 1e6:.0f} MB "
            "a published notebook may have (GitHub does not render larger ones): "
            "fewer or smaller figures in the notebook, or a smaller run to publish"
        )
    if size > WARN_BYTES:
        warnings.warn(f"{name}: {size / 1e6:.1f} MB once trimmed", RecordWarning, stacklevel=2)
    return text


def publish_notebooks(
    study_dir: str | Path, folder: str | Path, shown_as: Path, sources: Path | None = None
) -> list[Path]:
    """Write the study's executed walkthrough notebooks, trimmed and linked, to ``folder``.

    ``shown_as`` is the study folder as the navigation cells name it (relative to the
    repository); links to a notebook not published point at ``sources`` (the repository's
    ``notebooks/``) when it holds that notebook. Every notebook is checked before any is written, so a refused one
    leaves the folder as it was. Notebooks of an earlier publish that this one does not
    write are deleted; other files in ``folder`` are never touched. Returns the files
    written (none, and the folder untouched, when the study executed no notebook).
    """
    folder, study_dir = Path(folder), Path(study_dir)
    found = executed_notebooks(study_dir)
    if not found:
        return []
    notebooks = {name: json.loads(path.read_text(encoding="utf-8")) for name, path in found.items()}
    titles = [(name, _title(nb, name)) for name, nb in notebooks.items()]
    texts = {}
    if sources is not None and Path(sources).is_dir():
        relative = Path(os.path.relpath(Path(sources).resolve(), folder.resolve())).as_posix()
        notebooks = {
            k: point_links(nb, set(found), Path(sources), relative) for k, nb in notebooks.items()
        }
    for i, (name, nb) in enumerate(notebooks.items()):
        before = titles[i - 1] if i else None
        after = titles[i + 1] if i + 1 < len(titles) else None
        source = shown_as / found[name].parent.relative_to(study_dir)
        nb = add_navigation(trim(nb), before, after, source.as_posix())
        texts[f"{name}.ipynb"] = _encoded(nb, f"{found[name]}")
    folder.mkdir(parents=True, exist_ok=True)
    earlier = [f for f in published_files(folder, "notebook") if f.endswith(".ipynb")]
    # Listed before writing, so the files of an interrupted publish are known as ours.
    write_json(folder / PUBLISHED, {"files": sorted({*earlier, *texts})})
    written = [write_text_atomic(folder / name, text) for name, text in texts.items()]
    for name in sorted(set(earlier) - set(texts)):
        with contextlib.suppress(FileNotFoundError):
            (folder / name).unlink()
    write_json(folder / PUBLISHED, {"files": sorted(texts)})
    return written
