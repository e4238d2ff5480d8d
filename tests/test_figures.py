"""Every figure of the study rendered from fixture records, checked as a set: one legend
holding every labelled mark, throughput axes from zero (or a stated log exception with
readable ticks), no text box overlapping another or cut by the figure's edge, axes that
fill their canvas, one colour per name, and one CPU limit across figures."""

from __future__ import annotations

import itertools

import matplotlib
import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_hex, to_rgba_array
from matplotlib.container import BarContainer
from PIL import Image
from test_cluster_scaling import _rows as cluster_rows
from test_summary import record

from chexlib.data.metadata import LABELS, prevalence_table
from chexlib.report import (
    allreduce_model,
    bench_plots,
    cluster_scaling,
    dataset_plots,
    feeding,
    gradcam_plots,
    pipeline_timeline,
    shards_allreduce,
    summary,
)
from chexlib.report.figures import SUMMARY_FIGURES
from chexlib.report.publish import throughput_table
from chexlib.report.style import INPUT_COLORS, LOG_AXES, PIPELINE_COLORS
from chexlib.report.summary import throughput_rows
from chexlib.report.summary_plots import gain_error_points

matplotlib.use("Agg")


def _throughput_table() -> pd.DataFrame:
    rows = []
    for name, variant, limit, rates in (
        ("raw", "raw", 350.0, {"naive": 150.0, "optimized": 310.0, "keras-sequence": 170.0}),
        ("records-png", "png", 300.0, {"naive": 140.0, "optimized": 270.0}),
        ("records-compact", "compact", 4500.0, {"naive": 2000.0, "optimized": 3400.0}),
    ):
        for pipeline, rate in rates.items():
            rows.append(
                {"source_name": name, "source_variant": variant, "pipeline": pipeline,
                 "images_per_sec": rate, "windows": [rate * f for f in (0.95, 1.0, 1.04)],
                 "limit_images_per_sec": None if pipeline == "keras-sequence" else limit,
                 "cpu_ms_per_image": 2000.0 / limit}
            )  # fmt: skip
    return pd.DataFrame(rows)


def _utilization_table() -> pd.DataFrame:
    # the sweep measured its own, different, single-core rate: 230, not 350
    return pd.DataFrame(
        [
            {"pipeline": p, "source_name": "raw", "source_variant": "raw", "device_rate": r,
             "utilization": u, "limit_images_per_sec": 230.0}
            for p, us in (("naive", (0.53, 0.44, 0.35)), ("optimized", (0.97, 0.95, 0.95)))
            for r, u in zip((115.0, 207.0, 276.0), us, strict=True)
        ]
    )  # fmt: skip


_NAMES = {("raw", ""): "raw PNG", ("records", "png"): "png-records",
          ("records", "compact"): "compact-records"}  # fmt: skip


def study_tables() -> dict:
    """A small study: two models, both pipelines, three inputs, 1 and 2 ranks."""
    runs = [
        record("sn", "naive", 1, 128.0, synthetic=1020.0, model="standin", paired=True, ci=8.0),
        record("so", "optimized", 1, 320.0, synthetic=600.0, model="standin", paired=True,
               ci=55.0),
        record("sp", "optimized", 1, 335.0, synthetic=545.0, model="standin", ci=60.0,
               source="records", records="png"),
        record("sc", "optimized", 1, 975.0, synthetic=1085.0, model="standin", ci=180.0,
               source="records", records="compact"),
        record("s1", "optimized", 1, 105.0, model="standin", pin=1, ci=25.0),
        record("s2", "optimized", 2, 185.0, model="standin", pin=1, ci=30.0),
        record("dn", "naive", 1, 12.5, synthetic=14.6, model="densenet121", ci=1.4),
        record("do", "optimized", 1, 17.5, synthetic=18.5, model="densenet121", ci=1.3),
    ]  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:  # the variant, without records on disk
        patch.setattr(
            summary,
            "_input_name",
            lambda params, source: _NAMES[source, params["train"]["records"]],
        )
        train = summary.training_table(runs)
    throughput = _throughput_table()
    costs = feeding.input_costs(throughput)
    return {
        "train": train,
        "gain": summary.records_gain(train),
        "hardware": "2 CPU cores, no GPU (test CPU)",
        "throughput": throughput,
        "utilization": _utilization_table(),
        "ablation": pd.DataFrame(
            {
                "variant": ["optimized (all steps)", "minus prefetch", "naive (no steps)"] * 2,
                "relative": [1.0, 0.8, 0.45, 1.0, 0.9, 0.6],
                "source_name": ["raw"] * 3 + ["records-compact"] * 3,
            }
        ),  # fmt: skip
        "input_costs": costs,
        "feeding": feeding.projection(costs),
        "scaling_projection": allreduce_model.projection(),
        "cluster_scaling": cluster_scaling.scaling_table(
            cluster_rows(None) + cluster_rows("1gbit") + cluster_rows("10gbit")
        ),
    }


def _samples(tmp_path) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(path)
        rows.append({"image": path.name, "path": str(path), **{lab: i % 2 for lab in LABELS}})
    return pd.DataFrame(rows)


def explain_run(folder) -> list[dict]:
    """An explain run's folder as notebook 06 leaves it: heatmaps.csv and overlay PNGs."""
    (folder / "overlays").mkdir(parents=True)
    rows = []
    for i, (finding, boxed) in enumerate((("Mass", True), ("Nodule", False), ("Effusion", True))):
        overlay = f"overlays/img{i}__{finding}.png"
        Image.new("RGB", (64, 64), (40 * i, 80, 120)).save(folder / overlay)
        rows.append({"image": f"img{i}.png", "finding": finding, "probability": 0.3 + 0.2 * i,
                     "rank": 1, "boxed": boxed, "overlay": overlay})  # fmt: skip
    pd.DataFrame(rows).to_csv(folder / "heatmaps.csv", index=False)
    metrics = {"hit_rate": 0.5, "model": "densenet121"}
    return [{"run_id": "explain", "run_dir": str(folder), "stage": "explain", "metrics": metrics}]


def stage_record() -> dict:
    """A ``chexlib.bench.stages.stage_times`` record."""
    return {"ms_per_image": {"read file": 0.4, "decode + box-reduce": 6.0, "resize + draw flip": 0.5},
            "ms_per_batch": {"batch + flips": 1.5}, "batch_size": 8, "image_size": 224,
            "png_decoder": "tensorflow", "cores": 2, "images": 16}  # fmt: skip


def all_figures(tmp_path) -> dict:
    """Every figure the study, notebook 01, 03 and 04 draw, by name."""
    tables = {**study_tables(), "records": explain_run(tmp_path / "explain")}
    tables["localization"] = [r["metrics"] for r in tables["records"]]
    figs = {f.file: f.draw(tables) for f in SUMMARY_FIGURES if len(tables[f.table])}
    figs["ablation"] = bench_plots.plot_ablation(tables["ablation"], steps=("prefetch",))
    samples = _samples(tmp_path)
    figs["prevalence"] = dataset_plots.plot_prevalence(prevalence_table(samples))
    figs["samples"] = dataset_plots.plot_samples(samples, n=4)
    figs["timeline"] = pipeline_timeline.plot_timelines(stage_record(), 60.0, "SIMULATED.")
    run = record("r2", "optimized", 2, 20.0, pin=1)["metrics"]
    figs["shards"] = shards_allreduce.plot_shards_allreduce(run, [140, 139])
    return figs


@pytest.fixture(scope="module")
def figures(tmp_path_factory):
    figs = all_figures(tmp_path_factory.mktemp("figures"))
    for fig in figs.values():
        fig.canvas.draw()
    yield figs
    import matplotlib.pyplot as plt

    plt.close("all")


def _labelled(ax) -> set[str]:
    """Labels of the marks drawn in ``ax`` that a reader needs explained."""
    artists = [*ax.lines, *ax.patches, *ax.collections, *ax.containers]
    return {
        str(a.get_label())
        for a in artists
        if a.get_label() and not str(a.get_label()).startswith("_")
    }


def check_one_legend(fig) -> list[str]:
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend())]
    marks = set().union(*(_labelled(ax) for ax in fig.axes)) if fig.axes else set()
    if not marks:
        return [] if len(legends) <= 1 else [f"{len(legends)} legends"]
    if len(legends) != 1:
        return [f"{len(legends)} legends, expected one"]
    shown = {t.get_text().replace("\n", " ") for t in legends[0].get_texts()}
    problems = [f"{m!r} is not in the legend" for m in marks if m.replace("\n", " ") not in shown]
    box = legends[0].get_window_extent()
    covered = [ax for ax in fig.axes if ax.get_window_extent().overlaps(box)]
    return problems + [f"the legend covers a panel ({ax.get_title()[:30]!r})" for ax in covered]


def check_axes(fig) -> list[str]:
    """Throughput axes linear from zero, or a stated log exception with readable ticks."""
    problems = []
    for ax in fig.axes:
        label = ax.get_ylabel()
        if ax.get_yscale() == "log":
            low, high = ax.get_ylim()
            ticks = [
                t
                for t in ax.get_yticklabels()
                if t.get_text() and low <= t.get_position()[1] <= high
            ]
            if label not in LOG_AXES:
                problems.append(f"{label!r} is logarithmic without a stated reason")
            elif len(ticks) < 3 or min(t.get_position()[1] for t in ticks) > low * 3:
                problems.append(f"{label!r}: too few labelled ticks near its bottom")
        elif "images/s" in label and "%" not in label and ax.get_ylim()[0] != 0:
            problems.append(f"{label!r} starts at {ax.get_ylim()[0]:.3g}, not 0")
    return problems


def _texts(fig):
    """Every visible, non-empty text box of the figure, with what it is."""
    boxes = [(t, "figure text") for t in fig.texts]
    for legend in fig.legends:
        boxes.append((legend, "legend"))
    for ax in fig.axes:
        boxes += [(ax.title, "title"), (ax._left_title, "title"), (ax._right_title, "title")]
        boxes += [(ax.xaxis.label, "xlabel"), (ax.yaxis.label, "ylabel")]
        boxes += [(t, "annotation") for t in ax.texts]
        if ax.get_legend():
            boxes.append((ax.get_legend(), "legend"))
        if not ax.axison:
            continue
        for axis in (ax.xaxis, ax.yaxis):
            low, high = sorted(axis.get_view_interval())
            span = (high - low) * 1e-6
            boxes += [
                (tick.label1, "tick label")
                for tick in axis.get_major_ticks()
                if low - span <= tick.get_loc() <= high + span
            ]
    shown = []
    for artist, kind in boxes:
        text = artist.get_text() if hasattr(artist, "get_text") else "legend"
        if artist.get_visible() and text and artist.get_window_extent().width > 0:
            shown.append((artist, kind, text))
    return shown


def check_text(fig) -> list[str]:
    renderer = fig.canvas.get_renderer()
    edge = fig.bbox
    boxes = [(a.get_window_extent(renderer), kind, text) for a, kind, text in _texts(fig)]
    problems = [
        f"{kind} {text[:40]!r} cut by the figure's edge"
        for box, kind, text in boxes
        if box.x0 < edge.x0 - 1
        or box.y0 < edge.y0 - 1
        or box.x1 > edge.x1 + 1
        or box.y1 > edge.y1 + 1
    ]
    for (a, ka, ta), (b, kb, tb) in itertools.combinations(boxes, 2):
        overlap = a.intersection(a, b)
        if overlap is not None and overlap.width > 1 and overlap.height > 1:
            problems.append(f"{ka} {ta[:30]!r} overlaps {kb} {tb[:30]!r}")
    return problems


def check_fills_canvas(fig, share: float = 0.3) -> list[str]:
    """The panels fill ``share`` of the picture written (``savefig(bbox_inches="tight")``
    keeps everything drawn, also outside the figure, so that is the canvas)."""
    renderer = fig.canvas.get_renderer()
    written = fig.get_tightbbox(renderer)  # inches
    panels = sum(ax.get_window_extent(renderer).width * ax.get_window_extent(renderer).height
                 for ax in fig.axes if ax.axison or ax.images)  # fmt: skip
    area = panels / (written.width * written.height * fig.dpi**2)
    return [] if area >= share else [f"the panels fill {area:.0%} of the canvas"]


def check_colors(figs: dict) -> list[str]:
    """One colour per pipeline or input name, the same in every figure's legend."""
    seen: dict[str, set] = {}
    for fig in figs.values():
        for legend in fig.legends:
            for handle, text in zip(legend.legend_handles, legend.get_texts(), strict=True):
                color = _color(handle)
                if color:
                    seen.setdefault(" ".join(text.get_text().split()), set()).add(color)
    problems = [f"{name!r} drawn in {sorted(c)}" for name, c in seen.items() if len(c) > 1]
    names = {**PIPELINE_COLORS, **INPUT_COLORS}
    for name, colors in seen.items():
        for other, color in names.items():
            if color in colors and other not in name:  # "ours: ..., raw PNG ..." may
                problems.append(f"{name!r} uses {other}'s colour {color}")
    return problems


def _color(handle) -> str | None:
    getter = getattr(handle, "get_facecolor", None) or getattr(handle, "get_color", None)
    colors = to_rgba_array(getter()) if getter else []
    return to_hex(colors[0]) if len(colors) else None


def cpu_limits_drawn(figs: dict) -> dict[str, set]:
    found: dict[str, set] = {}
    for name, fig in figs.items():
        for ax in fig.axes:
            for line in ax.lines:
                gid = line.get_gid() or ""
                if gid.startswith("cpu-limit:"):
                    data = line.get_xdata() if name.startswith("simulated") else line.get_ydata()
                    found.setdefault(gid, set()).add((name, float(np.asarray(data)[0])))
    return found


CHECKS = {"legend": check_one_legend, "axes": check_axes, "text": check_text,
          "canvas": check_fills_canvas}  # fmt: skip


@pytest.mark.parametrize("check", list(CHECKS))
def test_every_figure_keeps_the_rule(figures, check):
    problems = {name: CHECKS[check](fig) for name, fig in figures.items()}
    assert not {n: p for n, p in problems.items() if p}, problems


def test_one_colour_and_one_name_per_pipeline_and_input(figures):
    assert not check_colors(figures)


def test_the_cpu_limit_is_one_number_across_figures(figures):
    limits = cpu_limits_drawn(figures)
    raw = limits.get("cpu-limit:raw PNG", set())
    assert {name for name, _ in raw} == {"pipeline_vs_limit.png", "simulated_utilization.png"}
    assert len({value for _, value in raw}) == 1, raw
    assert {value for _, value in raw} == {bench_plots.cpu_limits(_throughput_table())["raw PNG"]}


def test_error_bars_of_the_gain_are_in_percentage_points():
    gain = pd.DataFrame({"gain_percent": [203.0], "noise_percent": [25.0]})
    assert gain_error_points(gain).iloc[0] == pytest.approx(3.03 * 25.0)


def test_the_bound_drawn_is_the_bound_the_table_prints(figures):
    """fig1_2 hatches the runs the README's table calls input-bound, per bar: DenseNet121's
    naive run is input-bound while its optimized run is compute-bound."""
    train = throughput_rows(study_tables()["train"])
    raw = train[train["input"] == "raw PNG"]
    fig = figures["fig1_2_naive_vs_optimized.png"]
    for ax, model in zip(fig.axes, dict.fromkeys(raw["model"]), strict=True):
        for bars in [c for c in ax.containers if isinstance(c, BarContainer)]:
            rows = raw[(raw["model"] == model) & (raw["pipeline"] == bars.get_label())]
            expected = int((rows["bound"] == "input-bound").sum())
            assert sum(p.get_hatch() == "//" for p in bars.patches) == expected, (model, bars)
    dense = [line for line in throughput_table(train).splitlines() if "densenet121" in line]
    assert any("naive" in line and "input-bound" in line for line in dense)
    assert any("optimized" in line and "compute-bound" in line for line in dense)


def test_the_timelines_follow_each_pipelines_structure():
    """Naive: one thread and the accelerator take turns (never both busy), every stage of
    every image in order; optimized: one lane per core, and the map works while the
    accelerator trains."""
    stages, consume = stage_record(), 60.0
    naive = pipeline_timeline.naive_schedule(stages, consume, batches=3)
    work = [s for s in naive if s.lane != pipeline_timeline.ACCELERATOR]
    train = [s for s in naive if s.lane == pipeline_timeline.ACCELERATOR]
    assert {s.lane for s in work} == {"pipeline thread"} and len(train) == 3
    assert not any(w.start < t.end and t.start < w.end for w in work for t in train)
    per_batch = 8 * sum(stages["ms_per_image"].values()) + 1.5 + consume
    assert max(s.end for s in naive) == pytest.approx(3 * per_batch)
    optimized = pipeline_timeline.optimized_schedule(stages, consume, batches=3)
    maps = [s for s in optimized if s.lane.startswith("map thread")]
    train = [s for s in optimized if s.lane == pipeline_timeline.ACCELERATOR]
    assert {s.lane for s in maps} == {"map thread 1", "map thread 2"}
    assert any(m.start < t.end and t.start < m.end for m in maps for t in train)
    assert max(s.end for s in optimized) < max(s.end for s in naive)


def test_the_shards_picture_is_drawn_from_the_record():
    run = record("r2", "optimized", 2, 20.0, pin=1)["metrics"]
    fig = shards_allreduce.plot_shards_allreduce(run, [140, 139])
    bars = [p.get_width() for p in fig.axes[0].patches if p.get_height() > 0.6]
    assert bars == [140, 139]
    assert len(fig.axes[1].collections) == run["ranks"]  # one node per rank
    with pytest.raises(ValueError, match="3 shard sizes for a run of 2 ranks"):
        shards_allreduce.plot_shards_allreduce(run, [1, 2, 3])


def test_the_gradcam_figure_shows_each_images_top_finding_boxed_first(tmp_path):
    records = explain_run(tmp_path / "explain")
    table = gradcam_plots.overlay_table(records, top=2)
    assert list(table["finding"]) == ["Effusion", "Mass"]  # boxed, most probable first
    assert gradcam_plots.plot_overlays(gradcam_plots.overlay_table([], top=2)) is None


def test_stage_times_measure_each_stage_of_the_pipeline(tmp_path):
    """The timeline's numbers are measured: every stage takes time, and decoding a
    1024-px PNG takes longer than a 64-px one."""
    from chexlib.bench.stages import STAGES, stage_times  # here: it starts TensorFlow

    rng = np.random.default_rng(0)
    times = {}
    for side in (64, 1024):
        paths = []
        for i in range(3):
            path = tmp_path / f"{side}_{i}.png"
            Image.fromarray(rng.integers(0, 255, (side, side), dtype=np.uint8)).save(path)
            paths.append(path)
        times[side] = stage_times(paths, image_size=32, batch_size=4, images=3)
    measured = {**times[64]["ms_per_image"], **times[64]["ms_per_batch"]}
    assert set(measured) == set(STAGES) and all(ms > 0 for ms in measured.values())
    decode = "decode + box-reduce"
    assert times[1024]["ms_per_image"][decode] > 3 * times[64]["ms_per_image"][decode]
