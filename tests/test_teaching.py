"""The walkthrough's pictures (chexlib.walkthrough.teaching) drawn from real small inputs: the suite's
generated dataset, records converted from it, a pipeline batch, a trained tiny run."""

from __future__ import annotations

import matplotlib
import numpy as np
import pandas as pd
import pytest
from test_run_record import train_metrics

from chexlib.core.run_record import RunRecord
from chexlib.data.metadata import LABELS
from chexlib.walkthrough import teaching

matplotlib.use("Agg")


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


def test_machine_note_is_computed_not_written():
    facts = teaching.machine_facts()
    assert facts["cores"] >= 1 and isinstance(facts["gpus"], list)
    note = teaching.machine_note(facts)
    assert f"**{facts['cores']} CPU core" in note
    assert "no GPU" in note if not facts["gpus"] else "GPU" in note
    two = teaching.machine_note({"cores": 40, "cpu": "Xeon", "gpus": ["V100", "V100"]})
    assert "**40 CPU cores**" in two and "**2 GPUs**: V100, V100" in two
    assert teaching.machine_note({"cores": 1, "cpu": "x", "gpus": None}).endswith("(x).")


def test_records_beside_their_source(synth_dir, synth_metadata, tmp_path):
    from chexlib.records import convert

    dirs = {}
    for variant in ("png", "compact"):
        dirs[variant] = tmp_path / variant
        convert.convert(synth_dir, dirs[variant], variant=variant, size=32, images_per_shard=40,
                        workers=1, progress=False)  # fmt: skip
    fig = teaching.plot_records_beside_source(dirs, synth_metadata, split="train")
    axes = fig.get_axes()
    assert len(axes) == 3
    titles = [ax.get_title() for ax in axes]
    assert titles[0].startswith("source PNG file\n128x128")
    assert "image/format=png" in titles[1] and "128x128" in titles[1]
    assert "image/format=raw" in titles[2] and "32x32" in titles[2] and "1 KB stored" in titles[2]
    # both variants show the same image, with the labels the metadata has
    name = fig._suptitle.get_text().split()[0]
    row = synth_metadata.set_index("image").loc[name]
    assert row["split"] == "train"
    assert titles[0].splitlines()[-1] == titles[2].split("image/label: ")[1]
    assert axes[2].get_images()[0].get_array().shape == (32, 32)


def test_augmented_batch_marks_the_flips_it_finds(synth_metadata):
    from chexlib.pipeline import builders

    images, labels, names = next(
        iter(
            builders.build_dataset(
                "raw",
                "train",
                metadata=synth_metadata,
                batch_size=8,
                image_size=48,
                return_names=True,
                seed=3,
            )  # fmt: skip
        )
    )
    fig = teaching.plot_augmented_batch(images, labels, names, synth_metadata, n=6)
    axes = fig.get_axes()
    assert len(axes) == 12  # a source row and a model-input row
    bottom = [ax.get_title() for ax in axes[6:]]
    assert all(t.startswith(("FLIPPED", "not flipped")) and "48x48 input" in t for t in bottom)
    assert any(t.startswith("FLIPPED") for t in bottom) and any(
        t.startswith("not flipped") for t in bottom
    )
    # the flips found are the flips made: un-flipped evaluation images are never "FLIPPED"
    images, labels, names = next(
        iter(
            builders.build_dataset(
                "raw",
                "val",
                metadata=synth_metadata,
                batch_size=6,
                image_size=48,
                return_names=True,
            )  # fmt: skip
        )
    )
    fig = teaching.plot_augmented_batch(images, labels, names, synth_metadata, n=6)
    assert all(ax.get_title().startswith("not flipped") for ax in fig.get_axes()[6:])
    assert len(teaching.plot_augmented_batch(images, labels, n=4).get_axes()) == 4


def test_prefetch_overlaps_making_and_training():
    serial = teaching.prefetch_schedule(0.08, 0.06, n_batches=5, buffer=0)
    assert serial["total"] == pytest.approx(5 * 0.14)
    ahead = teaching.prefetch_schedule(0.08, 0.06, n_batches=5, buffer=2)
    assert ahead["total"] == pytest.approx(5 * 0.08 + 0.06)  # the slower side sets the pace
    assert ahead["consumer_busy"] > serial["consumer_busy"]
    fast = teaching.prefetch_schedule(0.01, 0.06, n_batches=6, buffer=2)
    # never more than 2 finished batches waiting: batch i starts after batch i-2 is taken
    for i in range(2, 6):
        assert fast["produce"][i][0] >= fast["consume"][i - 2][0] - 1e-12
    fig = teaching.plot_prefetch_timeline(0.08, 0.06, n_batches=5, timing="illustrative timings")
    axes = fig.get_axes()
    assert len(axes) == 2
    assert axes[0].get_title().startswith("without prefetch") and "busy 43%" in axes[0].get_title()
    assert axes[1].get_title().startswith("with prefetch(2)")
    assert "illustrative" in fig._suptitle.get_text()


def test_prefetch_timings_come_from_the_sweep_or_say_illustrative():
    sweep = pd.DataFrame(
        {"source_name": ["raw", "raw"], "pipeline": ["naive", "optimized"],
         "images_per_sec": [40.0, 90.0], "limit_images_per_sec": [100.0, 100.0]}
    )  # fmt: skip
    produce, consume, timing = teaching.prefetch_timings(sweep, 32, "raw", device_fraction=0.5)
    assert produce == pytest.approx(0.8) and consume == pytest.approx(0.64)
    assert "measured" in timing and "simulated" in timing
    assert "illustrative" in teaching.prefetch_timings(sweep, 32, "records-compact")[2]


def _record(evaluated: bool) -> RunRecord:
    history = [
        {"epoch": e, "loss": 0.5 / e, "lr": 1e-3,
         **({"val_loss": 0.6 / e, "val_mean_auroc": 0.5 + 0.1 * e,
             "val_auroc": {label: 0.5 + 0.05 * e for label in LABELS}} if evaluated else {})}
        for e in (1, 2, 3)
    ]  # fmt: skip
    per_rank = [
        {"median": 10.0, "ci95": 1.0, "windows": 3},
        {"median": 11.0, "ci95": 2.0, "windows": 3},
    ]
    return RunRecord.from_dict({
        **train_metrics(),
        "history": history, "auroc": {label: 0.7 for label in LABELS}, "auroc_split": "test",
        "mean_auroc": 0.7, "images_per_sec": 21.0, "throughput": {"per_rank": per_rank},
        "paired_synthetic": [
            {"pairs": 2, "synthetic_median": 20.0}, {"pairs": 2, "synthetic_median": 22.0}
        ],
    })  # fmt: skip


def test_run_report_figures():
    from chexlib.report.training import auroc_table, history_frame, throughput_frame

    for evaluated in (True, False):
        fig = teaching.plot_learning_curves(history_frame(_record(evaluated)))
        loss_ax, auroc_ax = fig.get_axes()
        assert len(loss_ax.get_lines()) == (2 if evaluated else 1)
        assert len(auroc_ax.get_lines()) == (len(LABELS) + 2 if evaluated else 0)
    fig = teaching.plot_auroc_bars(auroc_table(_record(True)), "title")
    (ax,) = fig.get_axes()
    assert len(ax.patches) == 3 * len(LABELS) and ax.get_title() == "title"

    runs = teaching.ceiling_runs(_record(True))
    assert list(runs) == ["real", "synthetic (paired)"]
    assert runs["synthetic (paired)"].images_per_sec == pytest.approx(42.0)
    separate = teaching.ceiling_runs(_record(True), synthetic=_record(False))
    assert list(separate) == ["real", "synthetic"]
    fig = teaching.plot_run_throughput(throughput_frame(runs), "t")
    assert len(fig.get_axes()[0].patches) == 4


@pytest.fixture(scope="module")
def tiny_run(synth_dir, tmp_path_factory):
    """The tiny test CNN trained a few steps at 32 px: a run folder with a checkpoint."""
    from chexlib.train.config import TrainConfig
    from chexlib.train.recipe import train

    out = tmp_path_factory.mktemp("teaching") / "run"
    train(TrainConfig(data=str(synth_dir), out=str(out), model="tiny", image_size=32, batch_size=8,
                      epochs=1, steps_per_epoch=3, warmup_epochs=0, evaluate=False, verbose=0,
                      throughput_warmup_steps=1, throughput_window_steps=1))  # fmt: skip
    return out


def test_predictions_beside_true_labels(tiny_run, synth_dir, synth_metadata):
    sample = teaching.predict_sample(tiny_run, synth_metadata, n=3, split="test")
    assert sample["images"].shape == (3, 32, 32) and sample["probabilities"].shape == (3, 14)
    assert ((sample["probabilities"] >= 0) & (sample["probabilities"] <= 1)).all()
    truth = synth_metadata.set_index("image").loc[sample["names"], list(LABELS)].to_numpy()
    assert np.array_equal(sample["labels"], truth)
    fig = teaching.plot_predictions(sample)
    axes = fig.get_axes()
    assert len(axes) == 6
    bars = axes[3].patches  # the first image's 14 probabilities, true findings in orange
    assert len(bars) == 14
    orange = [
        b.get_width() for b in bars if matplotlib.colors.to_hex(b.get_facecolor()) == "#d95f02"
    ]
    assert len(orange) == int(sample["labels"][0].sum())
    # a folder without a trained model says so instead of failing
    fig = teaching.plot_run_predictions(tiny_run.parent / "nothing", synth_dir)
    assert "no trained model" in fig.get_axes()[0].texts[0].get_text()
    assert len(teaching.plot_run_predictions(tiny_run, synth_dir, n=2).get_axes()) == 4
