"""chexlib publish-results: figures copied, the README block rewritten, nothing else touched."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pandas as pd
import pytest
from conftest import require

from chexlib.core.files import write_json
from chexlib.core.runs import write_run_record
from chexlib.report import publish

NOBODY = 65534  # as root, the read-only README test runs publish as this user

README = f"""# project

intro stays

{publish.BEGIN}
old results
{publish.END}

## after stays
"""


@pytest.fixture()
def summary_dir(tmp_path):
    out = tmp_path / "outputs" / "demo" / "summary"
    out.mkdir(parents=True)
    (out / "fig1_2_naive_vs_optimized.png").write_bytes(b"\x89PNG fake figure")
    pd.DataFrame(
        [
            {
                "model": "resnet50",
                "input": "raw PNG",
                "pipeline": p,
                "ranks": r,
                "images_per_sec": v,
            }
            for p, r, v in [("naive", 1, 10.0), ("optimized", 1, 20.0), ("optimized", 2, 30.5)]
        ]
    ).to_csv(out / "training.csv", index=False)
    conclusions = "- Training, optimized over naive pipeline: 2.00x."
    write_run_record(
        out,
        {"study_dir": "outputs/demo"},
        {
            "runs": 3,
            "training_runs": 3,
            "conclusions": conclusions,
            "environment": {"hardware": "CPU only: 2x test"},
        },
    )
    return out


def test_block_is_rewritten_and_figures_copied(tmp_path, summary_dir):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    docs = tmp_path / "docs" / "results"
    docs.mkdir(parents=True)
    (docs / "unrelated.png").write_bytes(b"not written by publish")
    files = publish.publish(summary_dir, readme, docs)

    text = readme.read_text()
    assert "old results" not in text and "intro stays" in text and "## after stays" in text
    assert "optimized over naive pipeline: 2.00x" in text
    assert "| resnet50 | raw PNG | optimized | 1 rank, all cores | 20.0 |  |  |" in text
    assert "| resnet50 | raw PNG | optimized | 2 ranks, all cores | 30.5 |  |  |" in text
    assert "![Poster figures 1-2" in text and "(docs/results/fig1_2_naive_vs_optimized.png)" in text
    assert "CPU only: 2x test" in text
    assert (docs / "fig1_2_naive_vs_optimized.png").read_bytes() == b"\x89PNG fake figure"
    assert (docs / "unrelated.png").read_bytes() == b"not written by publish"
    assert readme in files

    publish.publish(summary_dir, readme, docs)  # idempotent: same block, once
    assert readme.read_text() == text


def test_block_states_how_long_the_runs_took(tmp_path, summary_dir):
    study = summary_dir.parent
    runs = [("train/a", "complete", 120), ("train/b", "complete", 60), ("train/c", "failed", 9)]
    for i, (name, status, seconds) in enumerate([*runs, ("summary", "complete", 18)]):
        marker = study / name / "run.json"
        marker.parent.mkdir(parents=True, exist_ok=True)
        write_json(marker, {"stage": name.split("/")[0], "status": status, "seconds": seconds})
        os.utime(marker, (1000 + i, 1000 + i))  # the order runs finished in
    block = publish.results_block(summary_dir, tmp_path / "docs", tmp_path)
    assert (
        "- Time of the study's runs on this machine: 3.3 min in all "
        "(train 3.0 for 2 runs, summary 0.3; minutes" in block
    )


def test_missing_markers_or_summary_is_a_clear_error(tmp_path, summary_dir):
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    with pytest.raises(publish.PublishError, match="needs exactly one"):
        publish.publish(summary_dir, readme, tmp_path / "docs")
    readme.write_text(README)
    with pytest.raises(publish.PublishError, match="run the study's summary stage first"):
        publish.publish(tmp_path / "nowhere", readme, tmp_path / "docs")
    assert "old results" in readme.read_text()  # untouched after an error


def test_publish_deletes_only_the_figures_it_wrote(tmp_path, summary_dir):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    docs = tmp_path / "docs" / "results"
    docs.mkdir(parents=True)
    (docs / "mine.png").write_bytes(b"a person's figure")
    (tmp_path / "docs" / "outside.png").write_bytes(b"outside the docs folder")
    (summary_dir / "scaling_efficiency.png").write_bytes(b"\x89PNG scaling")
    publish.publish(summary_dir, readme, docs)
    assert (docs / "scaling_efficiency.png").is_file()
    listed = json.loads((docs / publish.PUBLISHED).read_text())["files"]
    assert sorted(listed) == ["fig1_2_naive_vs_optimized.png", "scaling_efficiency.png"]

    # The next study has no scaling figure: the old one goes, nothing else does.
    (summary_dir / "scaling_efficiency.png").unlink()
    publish.publish(summary_dir, readme, docs)
    assert not (docs / "scaling_efficiency.png").exists()
    assert (docs / "mine.png").read_bytes() == b"a person's figure"
    assert "scaling_efficiency.png" not in readme.read_text()

    # An edited list cannot make publish delete outside its folder, nor a hidden file.
    (docs / publish.PUBLISHED).write_text(
        json.dumps({"files": ["../outside.png", "/etc/hostname", ".published.json", "mine.png"]})
    )
    (summary_dir / "fig1_2_naive_vs_optimized.png").unlink()
    (summary_dir / "real_vs_synthetic.png").write_bytes(b"\x89PNG real")
    publish.publish(summary_dir, readme, docs)
    assert (tmp_path / "docs" / "outside.png").is_file()
    assert not (docs / "mine.png").exists()  # listed as ours, so it was ours to delete
    assert sorted(p.name for p in docs.iterdir()) == [
        publish.PUBLISHED,
        "fig1_2_naive_vs_optimized.png",  # listed before the edit dropped it: kept
        "real_vs_synthetic.png",
    ]


def test_markers_in_the_summary_text_publish_twice(tmp_path, summary_dir):
    metrics = json.loads((summary_dir / "metrics.json").read_text())
    metrics["conclusions"] = (
        f"- a note quoting {publish.END} and {publish.BEGIN} in the text\n- second line"
    )
    write_json(summary_dir / "metrics.json", metrics)
    readme = tmp_path / "README.md"
    readme.write_text(README)
    docs = tmp_path / "docs" / "results"
    publish.publish(summary_dir, readme, docs)
    first = readme.read_text()
    assert first.count(publish.BEGIN) == 1 and first.count(publish.END) == 1
    assert "a note quoting &lt;!-- results:end --&gt; and" in first
    assert "- second line" in first and first.endswith("\n## after stays\n")

    publish.publish(summary_dir, readme, docs)  # the next publish still finds its block
    assert readme.read_text() == first


def test_docs_folder_under_a_file_leaves_the_readme_intact(tmp_path, summary_dir):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    (tmp_path / "docs").write_text("a file where the docs folder should be")
    with pytest.raises(NotADirectoryError):
        publish.publish(summary_dir, readme, tmp_path / "docs" / "results")
    assert readme.read_text() == README


def _limit_file_size(limit):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_readme_write_cut_off_halfway_leaves_it_intact(tmp_path, summary_dir):
    """The disk fills while the README is written (a real RLIMIT_FSIZE, so also as root)."""
    readme = tmp_path / "README.md"
    readme.write_text(README)
    metrics = json.loads((summary_dir / "metrics.json").read_text())
    write_json(summary_dir / "metrics.json", {**metrics, "conclusions": "- long\n" * 5000})
    script = textwrap.dedent(
        f"""
        from chexlib.report.publish import publish
        try:
            publish({str(summary_dir)!r}, {str(readme)!r}, {str(tmp_path / "docs")!r})
        except OSError as err:
            raise SystemExit(f"failed: {{err.errno}}")
        """
    )
    res = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        preexec_fn=_limit_file_size(16384),
    )
    assert "failed: 27" in res.stderr, res.stderr  # EFBIG: the README write was cut off
    assert readme.read_text() == README
    assert not list(tmp_path.rglob("*.tmp")) and not list(tmp_path.rglob(".README.md.*"))


def test_read_only_readme_is_refused_and_intact(summary_dir):
    """A README its owner may not write is refused (``PermissionError``) and left as it was.

    publish runs in a child; as root (who may write any file) that child runs as
    ``nobody`` via util-linux ``setpriv``, as in tests/test_system_errors.py, in a
    folder ``nobody`` owns: only the README's own mode stops the write."""
    prefix = []
    if os.geteuid() == 0:
        require(shutil.which("setpriv"), "runs as root and setpriv (util-linux) is missing")
        prefix = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    folder = Path(tempfile.mkdtemp(prefix="chexlib-readonly-"))  # pytest's tmp_path: root only
    try:
        summary, readme, docs = folder / "summary", folder / "README.md", folder / "docs"
        shutil.copytree(summary_dir, summary)
        readme.write_text(README)
        if prefix:
            for path in [folder, *folder.rglob("*")]:
                os.chown(path, NOBODY, NOBODY)
        readme.chmod(0o444)
        script = textwrap.dedent(
            f"""
            from chexlib.report.publish import publish
            try:
                publish({str(summary)!r}, {str(readme)!r}, {str(docs)!r})
            except PermissionError as err:
                raise SystemExit(f"refused: {{err.filename}}")
            """
        )
        res = subprocess.run(
            [*prefix, sys.executable, "-c", script], capture_output=True, text=True, timeout=120
        )
        assert res.returncode == 1 and f"refused: {readme}" in res.stderr, (
            res.returncode,
            res.stderr,
        )
        assert readme.read_text() == README
        assert (docs / "fig1_2_naive_vs_optimized.png").is_file()  # the folder was writable
    finally:
        shutil.rmtree(folder)
