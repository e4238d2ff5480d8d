"""Put a study's results into the README: figures copied, a Markdown block rewritten.

``chexlib publish-results outputs/demo/summary`` reads what the summary
notebook wrote (``metrics.json`` with the conclusions and the figure names,
``training.csv``), copies the figures to ``docs/results/``, writes the study's
executed notebooks to ``docs/walkthrough/`` (:mod:`chexlib.report.notebooks`: the
book and GitHub show them) and replaces the block between :data:`BEGIN` and
:data:`END` in ``README.md``. Nothing in the
block is typed by hand, so the README always shows the last study that ran.

Safe to interrupt and to rerun: the README is replaced in one rename (never
left cut in half), and of the files in ``docs/results/`` only those an earlier
publish wrote (listed in :data:`PUBLISHED`) are ever deleted.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from chexlib.core.files import (
    RecordError,
    read_json,
    write_bytes_atomic,
    write_json,
    write_text_atomic,
)
from chexlib.core.flags import add_flags, config_from_args, option
from chexlib.core.runs import RecordWarning
from chexlib.report.figures import SUMMARY_FIGURES
from chexlib.report.notebooks import PUBLISHED, publish_notebooks, published_files
from chexlib.report.summary import throughput_rows
from chexlib.report.summary_plots import config_label
from chexlib.report.verdicts import conclusions

BEGIN = "<!-- results:begin -->"
END = "<!-- results:end -->"


class PublishError(RuntimeError):
    """The summary folder lacks what the README block is made of."""


def throughput_table(training: pd.DataFrame) -> str:
    """Markdown: one row per training configuration (a learning run of the same
    configuration gives way to its throughput run), with its resources, images/s
    and the share of its synthetic ceiling."""

    cols = ["model", "input", "pipeline", "ranks", "images_per_sec"]
    if training.empty or not set(cols) <= set(training.columns):
        return "_no training runs in this study_"
    rows = throughput_rows(training) if "evaluated" in training else training

    def cell(value, spec):
        return format(value, spec) if pd.notna(value) else ""

    header = ["model", "input", "pipeline", "ranks and cores", "images/s (1.96 std)",
              "real / synthetic", "bound"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for _, r in rows.iterrows():
        ci = r.get("images_per_sec_ci95")
        rate = cell(r["images_per_sec"], ".1f") + (f" ± {ci:.1f}" if pd.notna(ci) else "")
        values = [r["model"], r["input"], r["pipeline"], config_label(r), rate,
                  cell(r.get("fraction_of_synthetic"), ".2f"),
                  r["bound"] if isinstance(r.get("bound"), str) else ""]  # fmt: skip
        lines.append("| " + " | ".join(map(str, values)) + " |")
    return "\n".join(lines)


def study_durations(study_dir: str | Path) -> str | None:
    """One line: how long the study's complete runs took, in all and per stage.

    From the ``seconds`` that ``chexlib study`` writes in each run's ``run.json``:
    the runs' own times, so the work lost in an interrupted run is not counted.
    Stages are listed in the order they first finished.
    """
    stages: dict[str, list[float]] = {}
    markers = [*Path(study_dir).glob("*/run.json"), *Path(study_dir).glob("*/*/run.json")]
    for marker in sorted(markers, key=lambda m: m.stat().st_mtime):
        try:
            record = read_json(marker, expect=dict)
        except RecordError as err:  # the other runs' times are still worth stating
            warnings.warn(f"left out of the study's time: {err}", RecordWarning, stacklevel=2)
            continue
        if record.get("status") == "complete" and record.get("seconds") is not None:
            stages.setdefault(record.get("stage", "?"), []).append(float(record["seconds"]))
    if not stages:
        return None
    total = sum(map(sum, stages.values())) / 60
    parts = [
        f"{name} {sum(times) / 60:.1f}" + (f" for {len(times)} runs" if len(times) > 1 else "")
        for name, times in stages.items()
    ]
    return (
        f"- Time of the study's runs on this machine: {total:.1f} min in all "
        f"({', '.join(parts)}; minutes, each run as timed by `chexlib study`)."
    )


def verdict_lines(metrics: dict) -> str:
    """The block's verdicts: written from the verdicts the summary recorded (every state
    and threshold source in this chexlib's words), else its stored conclusions."""
    result = metrics.get("verdicts")
    try:
        return conclusions(result)
    except (KeyError, TypeError, ValueError, AttributeError):  # none, or not the verdicts' shape
        return metrics.get("conclusions", "_no conclusions recorded_")


def results_block(summary_dir: str | Path, docs_dir: str | Path, readme_dir: str | Path) -> str:
    """The Markdown between the markers, with figure links relative to the README."""
    summary_dir = Path(summary_dir)
    metrics_file = summary_dir / "metrics.json"
    if not metrics_file.is_file():
        raise PublishError(f"{metrics_file} not found: run the study's summary stage first")
    metrics = read_json(metrics_file, expect=dict)
    params_file = summary_dir / "params.json"
    params = read_json(params_file, expect=dict) if params_file.is_file() else {}
    training_csv = summary_dir / "training.csv"
    training = pd.read_csv(training_csv) if training_csv.is_file() else pd.DataFrame()
    written = datetime.fromtimestamp(metrics_file.stat().st_mtime, tz=UTC)
    env = metrics.get("environment") or {}
    study = Path(params.get("study_dir", summary_dir.parent))
    # a relative study_dir was relative to where the summary ran, not to here
    durations = study_durations(study if study.is_absolute() else summary_dir.parent)
    try:  # a path a reader of the README can follow, not this machine's
        study = study.resolve().relative_to(Path(readme_dir).resolve())
    except ValueError:
        pass
    try:
        rel_docs = Path(docs_dir).resolve().relative_to(Path(readme_dir).resolve())
    except ValueError:
        raise PublishError(f"{docs_dir} must be inside the README's folder {readme_dir}") from None
    parts = [
        f"Generated by `chexlib publish-results {summary_dir}` from the study in `{study}` "
        f"(summary written {written:%Y-%m-%d %H:%M} UTC; {metrics.get('runs', '?')} runs, "
        f"{metrics.get('training_runs', '?')} of them training; "
        f"hardware: {metrics.get('hardware') or env.get('hardware', 'unknown')}). "
        "Do not edit by hand.",
        "",
        verdict_lines(metrics),
        *([durations] if durations else []),
        "",
        throughput_table(training),
        "",
    ]
    for figure in SUMMARY_FIGURES:  # in reading order; publish() copies exactly these
        if (summary_dir / figure.file).is_file():
            image = (rel_docs / figure.file).as_posix()
            parts += [f"**{figure.caption}**", "", f"![{figure.caption}]({image})", ""]
    return "\n".join(parts).rstrip() + "\n"


def escape_markers(text: str) -> str:
    """``text`` with :data:`BEGIN` and :data:`END` made inert (and still readable).

    A marker inside the block (quoted in a conclusion, say) would end the block
    early and break this and every later publish; escaped, it shows as text.
    """
    for marker in (BEGIN, END):
        text = text.replace(marker, marker.replace("<!--", "&lt;!--").replace("-->", "--&gt;"))
    return text


def split_readme(text: str, readme: Path) -> tuple[str, str]:
    """The README's text before :data:`BEGIN` and from :data:`END` on."""
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise PublishError(f"{readme}: needs exactly one {BEGIN} ... {END} block")
    head, rest = text.split(BEGIN, 1)
    return head, rest.split(END, 1)[1]


def publish(
    summary_dir, readme="README.md", docs_dir="docs/results", walkthrough=None
) -> list[Path]:
    """Copy the summary's figures to ``docs_dir``, the study's executed notebooks to
    ``walkthrough`` (default: ``walkthrough/`` beside ``docs_dir``) and rewrite the README block.

    Returns the files written. The README must already hold the two markers
    (:data:`BEGIN`, :data:`END`), so the block's place is chosen by a person.
    Figures of an earlier publish that this one does not write are deleted;
    other files in ``docs_dir`` are never touched (the same for notebooks).
    """
    summary_dir, readme, docs_dir = Path(summary_dir), Path(readme), Path(docs_dir)
    walkthrough = Path(walkthrough) if walkthrough else docs_dir.parent / "walkthrough"
    try:
        text = readme.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise PublishError(f"{readme}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    head, tail = split_readme(text, readme)
    block = escape_markers(results_block(summary_dir, docs_dir, readme.parent))
    names = [f.file for f in SUMMARY_FIGURES if (summary_dir / f.file).is_file()]
    docs_dir.mkdir(parents=True, exist_ok=True)
    study, shown_as = _study_folders(summary_dir, readme.parent)
    notebooks = publish_notebooks(study, walkthrough, shown_as, readme.parent / "notebooks")
    earlier = published_files(docs_dir, "figure")
    # Listed before copying, so files of an interrupted publish are known as ours.
    write_json(docs_dir / PUBLISHED, {"files": sorted({*earlier, *names})})
    written = [
        write_bytes_atomic(docs_dir / name, (summary_dir / name).read_bytes()) for name in names
    ]
    write_text_atomic(readme, f"{head}{BEGIN}\n{block}{END}{tail}")
    for name in sorted(set(earlier) - set(names)):  # figures of an earlier study must not linger
        with contextlib.suppress(FileNotFoundError):
            (docs_dir / name).unlink()
    write_json(docs_dir / PUBLISHED, {"files": names})
    return [*written, *notebooks, readme]


def _study_folders(summary_dir: Path, readme_dir: Path) -> tuple[Path, Path]:
    """The study folder (as :func:`results_block` finds it) and its name for a reader."""
    params_file = summary_dir / "params.json"
    params = read_json(params_file, expect=dict) if params_file.is_file() else {}
    study = Path(params.get("study_dir", summary_dir.parent))
    study = study if study.is_absolute() else summary_dir.parent  # relative to where it ran
    try:
        return study, study.resolve().relative_to(Path(readme_dir).resolve())
    except ValueError:
        return study, study


@dataclass(frozen=True)
class PublishCommand:
    """One ``chexlib publish-results`` call: ``summary_dir`` is its positional argument."""

    summary_dir: str = option(
        "summary folder of a study, e.g. outputs/demo/summary", positional=True
    )
    readme: str = option("README with the results markers", default="README.md")
    docs: str = option("folder the figures are copied to", default="docs/results")
    walkthrough: str = option(
        "folder the executed notebooks are written to (default: walkthrough/ beside --docs)",
        default="",
    )


def add_arguments(parser) -> None:
    """``SUMMARY_DIR`` positional, then one flag per other :class:`PublishCommand` field."""
    add_flags(parser, PublishCommand)


def run(args) -> int:
    """``chexlib publish-results SUMMARY_DIR``; errors are reported by the dispatcher."""
    config = config_from_args(PublishCommand, args)
    files = publish(config.summary_dir, config.readme, config.docs, config.walkthrough)
    for f in files:
        print(f"written: {f}")
    return 0
