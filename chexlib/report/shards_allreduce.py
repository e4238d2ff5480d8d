"""Shards and allreduce, drawn from a training run's record (notebook 04).

Left: the training split dealt to the ranks, each rank's share as the pipeline
counts it (``chexlib.pipeline.sources.count_examples`` per rank: raw images
dealt one by one, record files whole), and the split's first images (or record
files) coloured by the rank that reads them. Right: one training step of the run:
each rank trains on its own batch at its measured speed, the gradients go
round the ring of ranks (allreduce), every rank applies the same mean, and the
record's weight hashes say whether the ranks ended equal.

Everything placed comes from the record (ranks, batch sizes, steps, cores,
per-rank images/s, weight hashes) and the shard sizes. Reporting layer:
matplotlib only, never TensorFlow.
"""

from __future__ import annotations

import math

import numpy as np

from chexlib.report.style import RANK_COLORS, THEIRS_COLOR, finish, new_figure


def rank_color(rank: int) -> str:
    return RANK_COLORS[rank % len(RANK_COLORS)]


def dealt(ranks: int, items: int) -> list[int]:
    """The rank that reads each of the split's first ``items`` images (raw) or record
    files (records, when there are at least as many files as ranks): dealt round-robin,
    as ``Dataset.shard(ranks, rank)`` does before any shuffle."""
    return [i % ranks for i in range(items)]


def _shards(ax, record: dict, shard_sizes: list[int]) -> None:
    ranks = len(shard_sizes)
    for r, size in enumerate(shard_sizes):
        ax.barh(r, size, color=rank_color(r), label=f"rank {r}: its shard and its step")
        ax.text(size, r, f" {size} images", va="center", fontsize=8)
    strip = dealt(ranks, 6 * ranks)
    unit = "images" if record["source"] == "raw" else "record files"
    y = ranks + 0.3
    width = max(shard_sizes) / len(strip)
    for i, r in enumerate(strip):
        ax.add_patch(_square(i * width, y, width, rank_color(r)))
    ax.text(0, y + 1.0, f"the split's first {len(strip)} {unit}, by the rank that reads them",
            fontsize=8)  # fmt: skip
    ax.set_yticks(range(ranks), [f"rank {r}" for r in range(ranks)], fontsize=8)
    ax.set_ylim(-0.6, ranks + 1.8)
    ax.set_xlim(0, max(shard_sizes) * 1.35)
    ax.invert_yaxis()
    ax.set_xlabel("training images per epoch (each rank's shard)")
    ax.set_title(f"{record['source']} input: {sum(shard_sizes)} training images, {ranks} shards",
                 fontsize=9)  # fmt: skip


def _square(x: float, y: float, width: float, color: str):
    from matplotlib.patches import Rectangle

    return Rectangle((x, y), width * 0.9, 0.6, color=color)


def _rank_rates(record: dict) -> list[float | None]:
    per_rank = (record.get("throughput") or {}).get("per_rank") or []
    return [p.get("median") for p in per_rank] + [None] * (record["ranks"] - len(per_rank))


def _ring(ax, record: dict) -> None:
    ranks = record["ranks"]
    angles = [math.pi / 2 - 2 * math.pi * r / ranks for r in range(ranks)]
    spots = [(math.cos(a), math.sin(a)) for a in angles]
    if ranks > 1:
        for r in range(ranks):
            (x0, y0), (x1, y1) = spots[r], spots[(r + 1) % ranks]
            ax.annotate("", (x1 * 0.8, y1 * 0.8), (x0 * 0.8, y0 * 0.8),
                        arrowprops=dict(arrowstyle="->", color=THEIRS_COLOR, lw=1.2,
                                        connectionstyle="arc3,rad=-0.3"))  # fmt: skip
        ax.plot([], [], "->", color=THEIRS_COLOR, label="gradients round the ring (allreduce)")
    cores = record.get("cores_per_rank") or [None] * ranks
    for r, ((x, y), rate) in enumerate(zip(spots, _rank_rates(record), strict=True)):
        ax.scatter([x], [y], s=500, color=rank_color(r), zorder=3)
        step = f"{1000 * record['batch_size_per_rank'] / rate:.0f} ms/step" if rate else ""
        where = f"cores {cores[r]}" if r < len(cores) and cores[r] else "shared cores"
        # outside the ring, away from its centre: never over a node or an arrow
        ha = "left" if x > 0.3 else "right" if x < -0.3 else "center"
        va = "bottom" if y > 0.3 else "top" if y < -0.3 else "center"
        ax.text(x * 1.25, y * 1.25, f"rank {r}\n{where}\n{step}", ha=ha, va=va, fontsize=8)
    ax.set_xlim(-2.6, 2.6)
    ax.set_ylim(-2.3, 2.3)
    ax.set_aspect("equal")
    ax.axis("off")


def _step_text(record: dict) -> str:
    hashes = record.get("weights_sha256_per_rank") or []
    same = "identical" if record.get("weights_in_sync") else "NOT identical"
    return (
        f"Each step: every rank trains on its own batch of {record['batch_size_per_rank']} "
        f"(global batch {record['global_batch_size']}), the {record['ranks']} ranks average "
        "their gradients round the ring, and every rank applies the same mean. "
        f"{record['steps_per_epoch']} steps per epoch, {record['epochs']} epochs; "
        f"weights at the end {same} on every rank"
        + (f" (sha256 {hashes[0][:12]}...)." if hashes else ".")
    )


def plot_shards_allreduce(record: dict, shard_sizes: list[int], title: str = ""):
    """The figure; ``record``: a training run's ``metrics.json`` (``RunRecord.to_dict()``),
    ``shard_sizes``: training images per rank, rank 0 first."""
    if len(shard_sizes) != record["ranks"]:
        raise ValueError(f"{len(shard_sizes)} shard sizes for a run of {record['ranks']} ranks")
    fig, (left, right) = new_figure(12, 4.8, 2, width_ratios=[1.2, 1])
    _shards(left, record, list(np.asarray(shard_sizes, dtype=int)))
    _ring(right, record)
    right.set_title("one training step", fontsize=9)
    name = title or f"{record['model']}, {record['ranks']} Horovod ranks"
    return finish(fig, [left, right], f"Shards and allreduce: {name}", _step_text(record))
