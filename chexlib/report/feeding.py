"""A projection: how many CPU cores does one GPU need to be fed, per input format?

The poster's question, carried to today's GPUs. Feeding a GPU that trains at
``R`` images/s from an input that costs ``c`` CPU milliseconds per image needs
``R x c / 1000`` cores busy on input alone. ``c`` is **measured** here (the
profiling stage's CPU time per image of the optimized pipeline, for each input
at the model's size); ``R`` is **theirs** (published per-GPU training rates,
:data:`chexlib.core.reference.GPU_RATES`). The product is a projection, labelled so
everywhere: it assumes the CPU cost per image on the cluster's cores is the
one measured here, and that nothing else (augmentation on the GPU, DALI, other
decoders) changes it.

Reporting layer: pandas and matplotlib only, no TensorFlow.
"""

from __future__ import annotations

import pandas as pd

from chexlib.core.reference import (
    BIG_NODE,
    DENSENET_PER_RESNET,
    GPU_RATES,
    MISSING_RATES,
    POSTER_NODE,
)
from chexlib.report.style import (
    INPUT_COLORS,
    THEIRS_COLOR,
    finish,
    new_figure,
    readable_log_axis,
)

INPUTS = ["raw PNG", "png-records", "compact-records"]
_VARIANT_NAMES = {"raw": "raw PNG", "png": "png-records", "compact": "compact-records"}


def input_costs(throughput: pd.DataFrame) -> pd.DataFrame:
    """CPU ms per image of the optimized pipeline for each input, from the profiling table.

    One row per input (median over measurements): ``input``, ``cpu_ms_per_image``,
    ``image_size``-independent beyond what the profiling stage used.
    """
    if throughput.empty or "cpu_ms_per_image" not in throughput:
        return pd.DataFrame(columns=["input", "cpu_ms_per_image", "measurements"])
    opt = throughput[throughput["pipeline"] == "optimized"].dropna(subset=["cpu_ms_per_image"])
    opt = opt.assign(input=opt["source_variant"].map(_VARIANT_NAMES))
    table = (
        opt.dropna(subset=["input"])
        .groupby("input")["cpu_ms_per_image"]
        .agg(cpu_ms_per_image="median", measurements="size")
        .reset_index()
    )
    table["order"] = table["input"].map(INPUTS.index)
    return table.sort_values("order").drop(columns="order").reset_index(drop=True)


def gpu_rates() -> pd.DataFrame:
    """Published per-GPU training rates for DenseNet121 and ResNet50 (theirs).

    Where only ResNet-50 is published, DenseNet121 is derived with timm's
    DenseNet121/ResNet-50 training-speed ratio (the source says so). GPUs with no
    published rate are listed with ``images_per_sec`` None and the reason.
    """
    rows = []
    published = {(g, p, m) for g, p, m, _, _ in GPU_RATES}
    for gpu, precision, model, rate, source in GPU_RATES:
        rows.append(
            dict(gpu=gpu, precision=precision, model=model, images_per_sec=rate, source=source)
        )
        if model == "resnet50" and (gpu, precision, "densenet121") not in published:
            rows.append(
                dict(
                    gpu=gpu,
                    precision=precision,
                    model="densenet121",
                    images_per_sec=rate * DENSENET_PER_RESNET,
                    source=f"{source} x {DENSENET_PER_RESNET:.2f} (timm DenseNet121/ResNet-50)",
                )
            )
    for gpu, reason in MISSING_RATES.items():
        for model in ("densenet121", "resnet50"):
            rows.append(
                dict(gpu=gpu, precision="AMP", model=model, images_per_sec=None, source=reason)
            )
    return pd.DataFrame(rows)


def projection(costs: pd.DataFrame) -> pd.DataFrame:
    """Cores one GPU needs for each (GPU rate, input), and whether the two nodes can feed it.

    A node "feeds" a combination when its cores, shared equally by its GPUs,
    cover what each GPU needs for input alone (the training process itself and
    the OS get nothing: an optimistic bound, so a "cannot feed" is firm).
    """
    rates = gpu_rates()
    rows = []
    for _, rate in rates.iterrows():
        for _, cost in costs.iterrows():
            need = (
                rate["images_per_sec"] * cost["cpu_ms_per_image"] / 1000.0
                if pd.notna(rate["images_per_sec"])
                else None
            )
            rows.append(
                {
                    **rate.to_dict(),
                    "input": cost["input"],
                    "cpu_ms_per_image": cost["cpu_ms_per_image"],
                    "cores_per_gpu": need,
                    "poster_node_feeds": _feeds(need, POSTER_NODE),
                    "big_node_feeds": _feeds(need, BIG_NODE),
                }
            )
    return pd.DataFrame(rows)


def _feeds(need: float | None, node: dict) -> bool | None:
    return None if need is None else need <= node["cores"] / node["gpus"]


def plot_projection(table: pd.DataFrame, hardware: str):
    """Bars: cores per GPU for each GPU/precision/model and input; node budgets as lines.

    The axis is logarithmic, a stated exception (``style.LOG_AXES``): compact records
    need a tenth of a core where raw PNG needs more than a node has.
    """
    data = table.dropna(subset=["cores_per_gpu"]).copy()
    data["gpu_label"] = data["gpu"] + " " + data["precision"] + "\n" + data["model"]
    labels = list(dict.fromkeys(data["gpu_label"]))
    inputs = [i for i in INPUTS if i in set(data["input"])]
    fig, (ax,) = new_figure(max(8, 1.0 * len(labels)) + 2.8, 4.8)
    width = 0.8 / max(1, len(inputs))
    for k, name in enumerate(inputs):
        part = data[data["input"] == name].set_index("gpu_label").reindex(labels)
        xs = [i + (k - (len(inputs) - 1) / 2) * width for i in range(len(labels))]
        ax.bar(xs, part["cores_per_gpu"], width, label=name, color=INPUT_COLORS[name])
    for node, style in ((POSTER_NODE, "--"), (BIG_NODE, ":")):
        budget = node["cores"] / node["gpus"]
        ax.axhline(budget, color=THEIRS_COLOR, ls=style, lw=1.2,
                   label=f"{node['name']}: {budget:.0f} cores/GPU (theirs)")  # fmt: skip
    ax.set_yscale("log")
    readable_log_axis(ax.yaxis)
    ax.set_xticks(range(len(labels)), labels, fontsize=7, rotation=30, ha="right",
                  rotation_mode="anchor")  # fmt: skip
    ax.set_ylabel("CPU cores per GPU for input alone (log)")
    return finish(fig, [ax], "PROJECTION: cores one GPU needs to be fed, per input "
                  f"(CPU ms/image measured on {hardware}; GPU images/s published, theirs)")  # fmt: skip
