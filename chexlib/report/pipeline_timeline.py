"""What each thread of the naive and the optimized pipeline does per batch: a timeline
computed from measured stage times (``chexlib.bench.stages.stage_times``, recorded by
notebook 03 as ``stage_times``), drawn on one time axis.

The schedules follow the two pipelines' structure (:mod:`chexlib.pipeline.builders`):

- naive: one thread reads, decodes and resizes the batch's images one after
  another, then batches them; with no prefetch it starts the next batch only when
  the accelerator asks for it, so the two take turns.
- optimized: the parallel map runs one image per thread on ``threads`` threads
  (AUTOTUNE uses the cores), the batch is assembled when its last image is done,
  and the prefetch buffer lets the map work ``prefetch`` batches ahead while the
  accelerator trains.

Stage times are measured one image at a time on one thread; threads working
together may each run slower than that (they share caches and memory), so the
optimized timeline is the schedule, not a trace. Reporting layer: matplotlib
only, never TensorFlow.
"""

from __future__ import annotations

from dataclasses import dataclass

from chexlib.report.style import ACCELERATOR_COLOR, STAGE_COLORS, finish, new_figure

ACCELERATOR = "accelerator (SIMULATED)"


@dataclass(frozen=True)
class Span:
    """One block of work: on ``lane``, from ``start`` to ``end`` ms, ``stage`` of ``batch``."""

    lane: str
    start: float
    end: float
    stage: str
    batch: int


def _image_spans(lane: str, start: float, per_image: dict, batch: int) -> list[Span]:
    spans, t = [], start
    for stage, ms in per_image.items():
        spans.append(Span(lane, t, t + ms, stage, batch))
        t += ms
    return spans


def naive_schedule(stages: dict, consume_ms: float, batches: int = 3) -> list[Span]:
    """One thread, one image after another; the accelerator and the thread take turns."""
    per_image, (batch_stage, batch_ms) = stages["ms_per_image"], _batch_stage(stages)
    spans, t = [], 0.0
    for b in range(batches):
        for _ in range(stages["batch_size"]):
            spans += _image_spans("pipeline thread", t, per_image, b)
            t = spans[-1].end
        spans.append(Span("pipeline thread", t, t + batch_ms, batch_stage, b))
        t += batch_ms
        spans.append(Span(ACCELERATOR, t, t + consume_ms, "train step", b))
        t += consume_ms  # no prefetch: the next batch is asked for now
    return spans


def optimized_schedule(
    stages: dict, consume_ms: float, batches: int = 3, threads: int | None = None,
    prefetch: int = 2,
) -> list[Span]:  # fmt: skip
    """Images of a batch spread over ``threads`` map threads; batch assembly after the
    last one; the map runs up to ``prefetch`` batches ahead of the accelerator."""
    threads = max(1, int(threads or stages["cores"]))
    per_image, (batch_stage, batch_ms) = stages["ms_per_image"], _batch_stage(stages)
    free = [0.0] * threads  # when each map thread is free
    spans, train_start, train_end = [], [], 0.0
    for b in range(batches):
        # the prefetch buffer is full until the accelerator takes batch b - prefetch
        earliest = train_start[b - prefetch] if b >= prefetch else 0.0
        done = 0.0
        for _ in range(stages["batch_size"]):
            k = min(range(threads), key=free.__getitem__)
            image = _image_spans(f"map thread {k + 1}", max(free[k], earliest), per_image, b)
            spans += image
            free[k] = done_k = image[-1].end
            done = max(done, done_k)
        spans.append(Span("batch thread", done, done + batch_ms, batch_stage, b))
        start = max(done + batch_ms, train_end)
        spans.append(Span(ACCELERATOR, start, start + consume_ms, "train step", b))
        train_start.append(start)
        train_end = start + consume_ms
    return spans


def _batch_stage(stages: dict) -> tuple[str, float]:
    ((name, ms),) = stages["ms_per_batch"].items()
    return name, ms


def busy_share(spans: list[Span]) -> float:
    """Share of the timeline's length the accelerator trains."""
    end = max(s.end for s in spans)
    return sum(s.end - s.start for s in spans if s.lane == ACCELERATOR) / end if end else 0.0


def _draw(ax, spans: list[Span]) -> list[str]:
    lanes = list(dict.fromkeys(s.lane for s in spans if s.lane != ACCELERATOR))
    lanes.append(ACCELERATOR)
    for s in spans:
        y = lanes.index(s.lane)
        color = ACCELERATOR_COLOR if s.stage == "train step" else STAGE_COLORS[s.stage]
        label = f"{s.stage} (accelerator)" if s.stage == "train step" else s.stage
        ax.broken_barh([(s.start, s.end - s.start)], (y - 0.35, 0.7), facecolors=color,
                       edgecolor="white", linewidth=0.3, label=label)  # fmt: skip
    ax.set_yticks(range(len(lanes)), lanes, fontsize=8)
    ax.invert_yaxis()
    return lanes


def plot_timelines(
    stages: dict, consume_ms: float, consume_note: str, batches: int = 3, prefetch: int = 2
):
    """Naive (top) and optimized (bottom) per-thread timelines of ``batches`` batches.

    Args:
        stages: a ``stage_times`` record.
        consume_ms: the accelerator's milliseconds per batch.
        consume_note: where ``consume_ms`` comes from (shown under the figure).
    """
    plans = {
        "naive": naive_schedule(stages, consume_ms, batches),
        "optimized": optimized_schedule(stages, consume_ms, batches, prefetch=prefetch),
    }
    lanes = sum(len({s.lane for s in spans}) for spans in plans.values())
    heights = [len({s.lane for s in spans}) for spans in plans.values()]
    fig, axes = new_figure(12, 2.8 + 0.42 * lanes, 1, rows=2, sharex=True, height_ratios=heights)
    end = max(s.end for spans in plans.values() for s in spans)
    for ax, (name, spans) in zip(axes, plans.items(), strict=True):
        _draw(ax, spans)
        ax.set_xlim(0, end * 1.02)
        ax.set_title(
            f"{name}: {batches} batches of {stages['batch_size']} in {max(s.end for s in spans):.0f} ms, "
            f"accelerator busy {busy_share(spans):.0%}",
            fontsize=9,
        )
    axes[-1].set_xlabel("milliseconds from the first request")
    stage_note = "; ".join(f"{k} {v:.1f} ms/image" for k, v in stages["ms_per_image"].items())
    batch_stage, batch_ms = _batch_stage(stages)
    note = (
        f"Stage times measured one image at a time on one thread ({stage_note}; "
        f"{batch_stage} {batch_ms:.1f} ms/batch; {stages['image_size']} px, "
        f"{stages['png_decoder']} decoder); optimized: {stages['cores']} map threads, "
        f"prefetch {prefetch}. {consume_note}"
    )
    return finish(fig, list(axes), "What each thread does per batch: naive vs optimized tf.data",
                  note)  # fmt: skip
