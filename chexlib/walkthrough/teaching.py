"""Pictures and small helpers for the teaching walkthrough (notebooks 01-05).

Each function draws one picture a student looks at, or computes one fact the
prose would otherwise write down, so a notebook cell calls one function:

* :func:`machine_facts`, :func:`machine_note`: the cores and GPUs of the
  machine the notebook runs on, computed, never written in prose;
* :func:`plot_records_beside_source`: a TFRecord beside the PNG it came from (02);
* :func:`plot_augmented_batch`: a training batch beside its source images,
  flips marked (03);
* :func:`prefetch_schedule`, :func:`plot_prefetch_timeline`,
  :func:`prefetch_timings`: what ``prefetch`` overlaps (03);
* :func:`plot_learning_curves`, :func:`plot_auroc_bars`,
  :func:`plot_run_throughput`, :func:`ceiling_runs`, :func:`ceiling_run`:
  notebook 04's run report;
* :func:`predict_sample`, :func:`plot_predictions`: a trained model's
  probabilities beside the true labels of a few images (04).

Plotting is matplotlib only. TensorFlow is imported inside the functions that
read records, run a model or launch ranks, so the figures of finished runs
stay light.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from chexlib.core.machine import cpu_model, gpu_names, usable_cores
from chexlib.data.metadata import LABELS, load_metadata
from chexlib.data.png import read_grayscale
from chexlib.explain.gradcam import ExplainError, load_images, load_run_model
from chexlib.launch.launcher import launch
from chexlib.records.read import list_shards, parse_example
from chexlib.report.training import paired_ceiling, summary_text

PRODUCER_COLOR = "#7570b3"  # the input pipeline
CONSUMER_COLOR = "#1b9e77"  # the accelerator
TRUE_COLOR = "#d95f02"  # a finding the image has


# --- the machine -----------------------------------------------------------------


def machine_facts(gpus: bool = True) -> dict:
    """Cores this process may use, the CPU model and the GPUs TensorFlow sees.

    Args:
        gpus: look for GPUs (imports TensorFlow); False reports ``gpus=None``.
    """
    if gpus:
        import tensorflow  # noqa: F401 (gpu_names asks the TensorFlow of this process)
    return {"cores": usable_cores(), "cpu": cpu_model(), "gpus": gpu_names() if gpus else None}


def machine_note(facts: dict | None = None) -> str:
    """One Markdown sentence on the machine this notebook runs on, from :func:`machine_facts`."""
    facts = facts or machine_facts()
    cores = facts["cores"]
    text = f"This kernel may use **{cores} CPU core{'s' if cores != 1 else ''}** ({facts['cpu']})"
    gpus = facts.get("gpus")
    if gpus is None:
        return text + "."
    if not gpus:
        return text + " and TensorFlow sees **no GPU**: everything below runs on the CPU."
    return (
        text
        + f" and TensorFlow sees **{len(gpus)} GPU{'s' if len(gpus) > 1 else ''}**: "
        + (", ".join(gpus) + ".")
    )


# --- notebook 02: a record beside its source ---------------------------------------


def _read_record(shard: str, name: str | None = None) -> dict | None:
    """The first record of ``shard`` (or the one for image ``name``) as numpy values."""
    import tensorflow as tf

    for serialized in tf.data.TFRecordDataset(shard):
        ex = {k: v.numpy() for k, v in parse_example(serialized).items()}
        if name is None or ex["image/filename"].decode() == name:
            return ex
    return None


def _find_record(records_dir, split: str, name: str | None) -> dict | None:

    for shard in list_shards(records_dir, split):
        ex = _read_record(shard, name)
        if ex is not None:
            return ex
    return None


def _decoded(ex: dict) -> np.ndarray:
    # here: it loads TensorFlow; importing this module does not
    from chexlib.pipeline.builders import decode_gray

    fmt = ex["image/format"].decode()
    gray = decode_gray(ex["image/encoded"], fmt, ex["image/height"], ex["image/width"])
    return gray.numpy()[..., 0]


def _findings(labels) -> str:
    found = [label for label, v in zip(LABELS, labels, strict=True) if v]
    return ", ".join(found) if found else "No Finding"


def plot_records_beside_source(records: dict, metadata, split: str = "train"):
    """One image as the source PNG and as it is stored in each records variant.

    Args:
        records: variant name -> records folder (``chexlib convert`` output).
        metadata: the dataset table (``data.load_metadata``) or its folder:
            finds the source file.
        split: split whose first record is shown.

    Returns:
        A figure with one panel for the source and one per variant, each titled
        with what is stored (format, size, bytes) and the record's labels.
    """
    import matplotlib.pyplot as plt

    if isinstance(metadata, str | Path):
        metadata = load_metadata(metadata)
    names = list(records)
    first = _find_record(records[names[0]], split, None)
    if first is None:
        raise ValueError(f"{records[names[0]]}: no {split} record")
    name = first["image/filename"].decode()
    found = {names[0]: first, **{v: _find_record(records[v], split, name) for v in names[1:]}}
    row = metadata.set_index("image").loc[name]
    fig, axes = plt.subplots(1, 1 + len(names), figsize=(3.6 * (1 + len(names)), 4.2))
    source = read_grayscale(row["path"])
    axes[0].imshow(source, cmap="gray", vmin=0, vmax=255)
    axes[0].set_title(
        f"source PNG file\n{source.shape[1]}x{source.shape[0]}, "
        f"{Path(row['path']).stat().st_size / 1024:.0f} KB on disk\n"
        f"{_findings([row[label] for label in LABELS])}",
        fontsize=8,
    )
    for ax, variant in zip(axes[1:], names, strict=True):
        ex = found[variant]
        if ex is None:
            ax.text(0.5, 0.5, f"{name}\nnot in this variant", ha="center", va="center")
            continue
        image = _decoded(ex)
        ax.imshow(image, cmap="gray", vmin=0, vmax=255)
        ax.set_title(
            f"{variant} record: image/format={ex['image/format'].decode()}\n"
            f"{image.shape[1]}x{image.shape[0]}, {len(ex['image/encoded']) / 1024:.0f} KB stored\n"
            f"image/label: {_findings(ex['image/label'])}",
            fontsize=8,
        )
    for ax in axes:
        ax.axis("off")
    fig.suptitle(f"{name} (patient {int(first['image/patient_id'])}), {split} split", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    return fig


# --- notebook 03: an augmented batch, and what prefetch overlaps -------------------


def _unit(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float32)
    span = float(a.max() - a.min())
    return (a - a.min()) / span if span > 0 else np.zeros_like(a)


def _is_flipped(source: np.ndarray, seen: np.ndarray) -> bool:
    """Whether ``seen`` (the model input's grey) is ``source`` mirrored left-right."""
    from PIL import Image

    small = np.asarray(
        Image.fromarray(source).resize(seen.shape[::-1], Image.BILINEAR), dtype=np.float32
    )
    small, seen = _unit(small), _unit(seen)
    return float(np.abs(small[:, ::-1] - seen).mean()) < float(np.abs(small - seen).mean())


def plot_augmented_batch(images, labels, names=None, metadata=None, n: int = 8):
    """The first ``n`` images of a training batch as the model gets them.

    With ``names`` and ``metadata`` a top row shows each source PNG, and each
    model input says whether the random flip mirrored it (found by comparing
    it with its source, not assumed).

    Args:
        images: ``uint8 [B, S, S, 1]`` batch (``pipeline.build_dataset``; the model
            normalises it), or a ``[B, S, S, 3]`` normalised one.
        labels: ``[B, 14]`` 0/1 labels.
        names: ``[B]`` file names (``return_names=True``), optional.
        metadata: the dataset table, to find the source files.
        n: images shown.
    """
    import matplotlib.pyplot as plt

    images, labels = np.asarray(images), np.asarray(labels)
    n = min(n, len(images))
    sources = None
    if names is not None and metadata is not None:
        paths = metadata.set_index("image")["path"]
        sources = [read_grayscale(paths[_text(v)]) for v in np.asarray(names)[:n]]
    rows = 2 if sources else 1
    fig, axes = plt.subplots(rows, n, figsize=(2.0 * n, 2.3 * rows), squeeze=False)
    for i in range(n):
        seen = images[i, ..., 0]  # the grey channel (the model replicates it to three)
        ax = axes[-1, i]
        ax.imshow(_unit(seen), cmap="gray", vmin=0, vmax=1)
        title = f"{seen.shape[1]}x{seen.shape[0]} input\n{_findings(labels[i])}"
        if sources:
            axes[0, i].imshow(sources[i], cmap="gray", vmin=0, vmax=255)
            axes[0, i].set_title(f"source {sources[i].shape[1]}x{sources[i].shape[0]}", fontsize=7)
            title = ("FLIPPED, " if _is_flipped(sources[i], seen) else "not flipped, ") + title
        ax.set_title(title, fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    low, high = images.min(), images.max()
    kind = (
        f"{images.dtype} values {low} .. {high}"
        if images.dtype == np.uint8
        else (f"normalised values {float(low):.2f} .. {float(high):.2f}")
    )
    fig.suptitle(
        f"A training batch (first {n} of {len(images)}): {kind}, drawn rescaled to grey",
        fontsize=9,
    )
    fig.tight_layout(h_pad=1.2)
    return fig


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def prefetch_schedule(
    produce_sec: float, consume_sec: float, n_batches: int = 6, buffer: int = 0
) -> dict:
    """When a producer (input pipeline) and a consumer (accelerator) work on each batch.

    ``buffer = 0``: no prefetch, the consumer asks for a batch and waits while
    it is made. ``buffer = b``: the producer works ahead in a thread of its own
    until ``b`` finished batches wait (``prefetch(b)``).

    Returns:
        ``{"produce": [(start, end)], "consume": [(start, end)], "total": seconds,
        "consumer_busy": busy / total}``.
    """
    produce, consume = [], []
    for i in range(n_batches):
        if buffer == 0:
            start = consume[-1][1] if consume else 0.0  # asked for once the last step ended
        else:
            start = produce[-1][1] if produce else 0.0
            if i >= buffer:  # buffer full until the consumer takes batch i - buffer
                start = max(start, consume[i - buffer][0])
        produce.append((start, start + produce_sec))
        begin = max(produce[i][1], consume[-1][1] if consume else 0.0)
        consume.append((begin, begin + consume_sec))
    total = consume[-1][1] if consume else 0.0
    busy = n_batches * consume_sec
    return {"produce": produce, "consume": consume, "total": total,
            "consumer_busy": busy / total if total else 0.0}  # fmt: skip


def plot_prefetch_timeline(
    produce_sec: float,
    consume_sec: float,
    timing: str = "illustrative timings",
    n_batches: int = 6,
    buffer: int = 2,
):
    """Two timelines of the same work: without prefetch, and with ``prefetch(buffer)``.

    Args:
        produce_sec: seconds the input pipeline takes per batch.
        consume_sec: seconds the accelerator takes per batch.
        timing: where the two durations came from (shown in the title):
            say "illustrative" or "measured" (:func:`prefetch_timings` does).
        n_batches: batches drawn.
        buffer: prefetch buffer of the second timeline.
    """
    import matplotlib.pyplot as plt

    plans = {
        "without prefetch": prefetch_schedule(produce_sec, consume_sec, n_batches, 0),
        f"with prefetch({buffer})": prefetch_schedule(produce_sec, consume_sec, n_batches, buffer),
    }
    end = max(p["total"] for p in plans.values())
    fig, axes = plt.subplots(2, 1, figsize=(10, 3.8), sharex=True)
    for ax, (name, plan) in zip(axes, plans.items(), strict=True):
        for lane, (key, color) in enumerate(
            (("consume", CONSUMER_COLOR), ("produce", PRODUCER_COLOR))
        ):
            spans = plan[key]
            ax.broken_barh([(s, e - s) for s, e in spans], (lane - 0.35, 0.7), color=color)
            for i, (s, e) in enumerate(spans):
                ax.text(
                    (s + e) / 2, lane, str(i), ha="center", va="center", color="white", fontsize=8
                )
        ax.set_yticks([0, 1], ["accelerator\n(consumer)", "input pipeline\n(producer)"], fontsize=8)
        ax.set_xlim(0, end * 1.02)
        ax.set_title(
            f"{name}: {plan['total']:.3g} s for {n_batches} batches, "
            f"accelerator busy {plan['consumer_busy']:.0%}",
            fontsize=9,
        )
    axes[-1].set_xlabel("seconds (numbers: batch index; gaps: waiting)")
    fig.suptitle(
        f"What prefetch overlaps: {produce_sec * 1000:.3g} ms to make a batch, "
        f"{consume_sec * 1000:.3g} ms to train on it ({timing})",
        fontsize=10,
    )
    fig.tight_layout()
    return fig


def prefetch_timings(
    throughput, batch_size: int, source: str = "raw", device_fraction: float = 0.7
) -> tuple[float, float, str]:
    """Producer and consumer seconds per batch for :func:`plot_prefetch_timeline`, from a sweep.

    Producer: the naive pipeline on ``source`` (one image at a time), as
    measured in ``throughput`` (``bench.throughput_sweep``). Consumer: a
    SIMULATED device at ``device_fraction`` x that source's CPU limit, like
    the utilization section. Without a naive measurement, illustrative values.

    Returns:
        ``(produce_sec, consume_sec, timing)``, ``timing`` saying which is which.
    """
    rows = throughput[(throughput["source_name"] == source) & (throughput["pipeline"] == "naive")]
    if rows.empty or not rows["limit_images_per_sec"].notna().any():
        return 0.08, 0.06, "illustrative timings"
    row = rows.iloc[0]
    produce = batch_size / float(row["images_per_sec"])
    consume = batch_size / (device_fraction * float(row["limit_images_per_sec"]))
    timing = (
        f"producer measured: naive pipeline on {source}; consumer simulated at "
        f"{device_fraction:g} x the CPU limit"
    )
    return produce, consume, timing


# --- notebook 04: the run report ----------------------------------------------------


def plot_learning_curves(history):
    """Training and validation loss per epoch; validation AUROC per class (grey) and mean.

    Args:
        history: ``run_report.history_frame(metrics)``.
    """
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (loss_ax, auroc_ax) = plt.subplots(1, 2, figsize=(12, 4))
    for curve in ("loss", "val_loss"):
        if curve in history and history[curve].notna().any():
            loss_ax.plot(history["epoch"], history[curve], "o-", label=curve)
    loss_ax.legend()
    if "val_mean_auroc" in history:
        for label in LABELS:
            column = f"val_auroc/{label}"
            if column in history:
                auroc_ax.plot(history["epoch"], history[column], color="0.75", lw=1)
        auroc_ax.plot(history["epoch"], history["val_mean_auroc"], "o-", color="C3", label="mean")
        auroc_ax.axhline(0.5, color="0.4", ls="--", lw=1)
        auroc_ax.legend()
    else:
        auroc_ax.text(0.5, 0.5, "not evaluated (EVALUATE = False)", ha="center", va="center",
                      transform=auroc_ax.transAxes)  # fmt: skip
    loss_ax.set_title("binary cross-entropy")
    auroc_ax.set_title("validation AUROC per class (grey) and mean")
    for ax in (loss_ax, auroc_ax):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return fig


def plot_auroc_bars(table, title: str = "per-class AUROC"):
    """Grouped bars of ``run_report.auroc_table``: ours beside CheXNet's and the poster's."""
    import matplotlib.pyplot as plt

    data = table.drop(index="mean", errors="ignore").drop(columns="note", errors="ignore")
    fig, ax = plt.subplots(figsize=(12, 4))
    width = 0.8 / max(1, len(data.columns))
    x = np.arange(len(data))
    for k, column in enumerate(data.columns):
        ax.bar(x + (k - (len(data.columns) - 1) / 2) * width, data[column].astype(float), width,
               label=column)  # fmt: skip
    ax.axhline(0.5, color="0.4", ls="--", lw=1)
    ax.set_xticks(x, list(data.index), rotation=60, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("AUROC")
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1, 1))
    fig.tight_layout()
    return fig


def ceiling_runs(record, synthetic=None) -> dict:
    """Named runs for ``run_report.throughput_frame``: the real one and its ceiling, if any.

    ``record`` is the run's :class:`~chexlib.core.run_record.RunRecord`; the ceiling is
    ``synthetic``, the record of a separate synthetic run, when there was one,
    else the run's own paired synthetic windows (``--paired-synthetic``).
    """

    if synthetic:
        return {"real": record, "synthetic": synthetic}
    paired = paired_ceiling(record)
    return {"real": record, **({"synthetic (paired)": paired} if paired else {})}


def plot_run_throughput(throughput, title: str = ""):
    """Images/s per rank of each run in ``throughput`` (``run_report.throughput_frame``)."""
    import matplotlib.pyplot as plt

    labels = throughput["input"] + "\nrank " + throughput["rank"].astype(str)
    colors = ["C0" if name == "real" else "C1" for name in throughput["input"]]
    errors = throughput["ci95"].astype(float).fillna(0)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(labels, throughput["images_per_sec"].astype(float), yerr=errors, color=colors, capsize=4)
    ax.set_ylabel("images/s per rank (median, 1.96 std)")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def ceiling_run(config, launch_config, out_dir, steps: int, paired: bool):
    """Notebook 04's synthetic-data ceiling: a separate run of ``config`` on one random batch.

    No run when ``paired`` (the training run measured its ceiling itself) or
    ``steps`` is 0.

    Returns:
        ``(synthetic_config, its RunRecord or None, message)``.
    """
    import dataclasses

    synthetic_config = dataclasses.replace(
        config, out=str(Path(out_dir) / "synthetic"), synthetic=True, paired_synthetic=False,
        evaluate=False, checkpoint=False, resume=False, epochs=1, steps_per_epoch=max(steps, 1),
        tensorboard=None, profile_steps=None, horovod_timeline=None,
    )  # fmt: skip
    if paired:
        return (
            synthetic_config,
            None,
            (
                "no separate synthetic run: the ceiling comes from the paired windows of the run above"
            ),
        )
    if not steps:
        return synthetic_config, None, "synthetic run skipped (SYNTHETIC_STEPS = 0)"
    synthetic = launch(synthetic_config, launch_config)
    return synthetic_config, synthetic, summary_text(synthetic)


def predict_sample(run_dir, metadata, n: int = 4, split: str = "test", seed: int = 0) -> dict:
    """A trained run's probabilities for ``n`` images of ``split`` (with findings where possible).

    Images are preprocessed as evaluation does (``explain.load_images``).

    Returns:
        ``{"images": uint8 [n, S, S], "names", "labels": [n, 14], "probabilities": [n, 14],
        "model", "split"}``.

    Raises:
        chexlib.explain.gradcam.ExplainError: no trained run (no checkpoint) at ``run_dir``.
    """

    net, params = load_run_model(run_dir)
    rows = metadata[metadata["split"] == split]
    sick = rows[rows[list(LABELS)].sum(axis=1) > 0]
    pool = sick if len(sick) >= n else rows
    picks = pool.sample(n=min(n, len(pool)), random_state=seed)
    gray, inputs, _ = load_images(picks["path"].astype(str).tolist(), int(params["image_size"]),
                                  params["model"])  # fmt: skip
    probabilities = np.asarray(net.predict(inputs, verbose=0), dtype=np.float32)
    return {
        "images": gray,
        "names": picks["image"].astype(str).tolist(),
        "labels": picks[list(LABELS)].to_numpy(dtype=np.float32),
        "probabilities": probabilities,
        "model": params["model"],
        "split": split,
    }


def plot_predictions(sample: dict):
    """Each image above its 14 predicted probabilities; true findings in orange.

    Args:
        sample: :func:`predict_sample`'s result.
    """
    import matplotlib.pyplot as plt

    n = len(sample["names"])
    fig, axes = plt.subplots(2, n, figsize=(3.2 * n, 7.2), squeeze=False,
                             gridspec_kw={"height_ratios": [1, 1.4]})  # fmt: skip
    y = np.arange(len(LABELS))
    for i in range(n):
        image_ax, bar_ax = axes[0, i], axes[1, i]
        image_ax.imshow(sample["images"][i], cmap="gray", vmin=0, vmax=255)
        image_ax.axis("off")
        image_ax.set_title(
            f"{sample['names'][i]}\ntrue: {_findings(sample['labels'][i])}", fontsize=8
        )
        truth = sample["labels"][i] > 0
        bar_ax.barh(y, sample["probabilities"][i], color=np.where(truth, TRUE_COLOR, "0.6"))
        bar_ax.set_xlim(0, 1)
        bar_ax.invert_yaxis()
        bar_ax.set_yticks(y, list(LABELS) if i == 0 else [""] * len(LABELS), fontsize=7)
        bar_ax.set_xlabel("predicted probability", fontsize=8)
    fig.suptitle(
        f"{sample['model']} on {n} {sample['split']} images: orange bars are the findings the "
        "image has, grey the ones it has not",
        fontsize=10,
    )
    fig.tight_layout()
    return fig


def plot_run_predictions(run_dir, data_dir, n: int = 4, split: str = "test", seed: int = 0):
    """:func:`plot_predictions` of a run folder, or a figure saying why there is none."""
    import matplotlib.pyplot as plt

    why = None
    if not data_dir:
        why = "no DATA_DIR: the images to predict on are read from the dataset folder"
    else:
        try:
            return plot_predictions(
                predict_sample(run_dir, load_metadata(data_dir), n, split, seed)
            )
        except ExplainError as err:
            why = f"no trained model to predict with: {err}"
    fig, ax = plt.subplots(figsize=(8, 1.5))
    ax.axis("off")
    ax.text(0.5, 0.5, why, ha="center", va="center", wrap=True, fontsize=9)
    return fig
