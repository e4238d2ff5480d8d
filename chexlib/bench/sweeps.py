"""The profiling notebook's sweeps: each pipeline on each source, the ablation, a simulated device.

``notebooks/03_pipeline_profiling.ipynb`` (and the study's profiling stage)
validates its parameters as a :class:`ProfileConfig`, prepares the sources
(:func:`prepare_sources`: the dataset and its TFRecord variants), then runs
three sweeps of :func:`chexlib.bench.measure.measure`, one DataFrame row per
measurement:

* :func:`throughput_sweep`: every pipeline on every source;
* :func:`ablation` / :func:`ablation_sweep`: the optimized pipeline minus
  one step at a time;
* :func:`utilization_sweep`: a SIMULATED accelerator's utilization against
  its speed, as fractions of the measured CPU limit.

:func:`conclusion_markdown` writes what the numbers say from the measured
numbers themselves. The figures are in :mod:`chexlib.report.bench_plots`. Every name
here stays importable from :mod:`chexlib.bench.measure`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from chexlib.bench.config import BENCH_PIPELINES, SIMULATED, BenchConfig
from chexlib.bench.measure import measure
from chexlib.bench.peers import PEERS
from chexlib.bench.timing import metadata_for, single_core_rate
from chexlib.core.machine import usable_cores
from chexlib.data.metadata import CSV_NAMES, MODEL_INPUT_SIZE
from chexlib.pipeline import config
from chexlib.records import convert
from chexlib.synth.generate import generate

# --- the profiling notebook's parameters ------------------------------------------------

NOTEBOOK_SOURCES = ("raw", "records-png", "records-compact")


@dataclass(frozen=True)
class ProfileConfig:
    """Parameters of ``notebooks/03_pipeline_profiling.ipynb``, validated.

    Attributes:
        output_dir: where the run record, figures and converted records go.
        data_dir: dataset in the NIH layout.
        generate: generate a dataset into data_dir when it holds none.
        n_images: images generated.
        source_size: side of the generated PNGs (NIH: 1024).
        sources: any of ``raw``, ``records-png``, ``records-compact``.
        pipelines: any of ``naive``, ``optimized``, ``keras-sequence``, ``keras-directory``.
        batch_size, image_size, model: what the pipelines produce.
        warmup_batches: batches before timing.
        batches: timed batches per measurement.
        repeats: timed windows per measurement (median and spread over them).
        device_rate_fractions: SIMULATED device speeds as fractions of the CPU limit.
        utilization_source: source of the simulated-device sweep.
        ablation_sources: sources on which optimized loses one step at a time.
        images_per_shard: records per TFRecord shard when converting.
        records_size: side of the compact records' images.
        keras_workers: processes of the Keras Sequence peer (0: all cores).
        data_service_workers: also read through a local tf.data service with
            this many workers (0: skip).
        seed: seed of generation, shuffles and flips.
    """

    output_dir: str
    data_dir: str
    generate: bool = True
    n_images: int = 300
    source_size: int = 1024
    sources: tuple[str, ...] = NOTEBOOK_SOURCES
    pipelines: tuple[str, ...] = BENCH_PIPELINES
    batch_size: int = 32
    image_size: int = MODEL_INPUT_SIZE
    model: str = "densenet121"
    warmup_batches: int = 10
    batches: int = 40
    repeats: int = 5
    min_window_sec: float = 1.0
    device_rate_fractions: tuple[float, ...] = (0.25, 0.5, 0.7, 0.9, 1.2)
    utilization_source: str = "raw"
    ablation_sources: tuple[str, ...] = ("raw", "records-compact")
    images_per_shard: int = 32
    records_size: int = 256
    keras_workers: int = 0
    data_service_workers: int = 0
    seed: int = 0

    def __post_init__(self):
        for name in ("sources", "pipelines", "device_rate_fractions", "ablation_sources"):
            object.__setattr__(self, name, tuple(getattr(self, name)))

        def check(ok: bool, message: str):
            if not ok:
                raise ValueError(f"ProfileConfig: {message}")

        check(bool(self.output_dir) and bool(self.data_dir), "output_dir and data_dir are required")
        bad = [s for s in self.sources if s not in NOTEBOOK_SOURCES]
        check(not bad, f"unknown sources {bad}; choose from {NOTEBOOK_SOURCES}")
        bad = [p for p in self.pipelines if p not in BENCH_PIPELINES]
        check(not bad, f"unknown pipelines {bad}; choose from {BENCH_PIPELINES}")
        bad = [
            s for s in (*self.ablation_sources, self.utilization_source) if s not in self.sources
        ]
        check(not bad, f"ablation/utilization sources {bad} are not among sources {self.sources}")
        check(bool(self.ablation_sources), "ablation_sources must name at least one source")
        check(self.n_images >= 2 * self.batch_size, "generate at least two batches of images")
        check(
            self.batch_size >= 1 and self.image_size >= 8 and self.source_size >= 32,
            "sizes out of range",
        )
        check(self.repeats >= 1 and self.batches >= self.repeats, "need batches >= repeats >= 1")
        check(all(f > 0 for f in self.device_rate_fractions), "device rate fractions must be > 0")
        check(
            self.model in config.NORMALIZATION,
            f"model must be one of {tuple(config.NORMALIZATION)}",
        )
        check(
            self.keras_workers >= 0 and self.data_service_workers >= 0, "worker counts must be >= 0"
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def bench_settings(self) -> dict:
        """``BenchConfig`` fields shared by every measurement of the notebook."""
        return dict(
            batch_size=self.batch_size,
            image_size=self.image_size,
            model=self.model,
            warmup_batches=self.warmup_batches,
            batches=self.batches,
            windows=self.repeats,
            min_window_sec=self.min_window_sec,
            keras_workers=self.keras_workers or None,
            seed=self.seed,
        )


def prepare_sources(cfg: ProfileConfig, progress: bool = True) -> dict[str, dict]:
    """Generate the dataset if asked and absent, and convert the record variants the sources need.

    Records go to ``output_dir/records-<variant>``; a finished conversion with
    the same settings is reused (``records.convert`` resumes and skips).

    Returns:
        name -> ``{"source", "data_dir", "records_dir"}`` for each of ``cfg.sources``.
    """

    data_dir = Path(cfg.data_dir)
    if cfg.generate and not any((data_dir / n).is_file() for n in CSV_NAMES):
        generate(
            data_dir, n_images=cfg.n_images, size=cfg.source_size, seed=cfg.seed, progress=progress
        )
    sources = {}
    for name in cfg.sources:
        spec = {"source": "raw", "data_dir": str(data_dir), "records_dir": None}
        if name.startswith("records-"):
            variant = name.removeprefix("records-")
            records_dir = Path(cfg.output_dir) / name
            extra = {"size": cfg.records_size} if variant == "compact" else {}
            convert.convert(
                data_dir,
                records_dir,
                variant=variant,
                images_per_shard=cfg.images_per_shard,
                progress=progress,
                overwrite=True,
                **extra,
            )
            spec.update(source="records", records_dir=str(records_dir))
        sources[name] = spec
    return sources


# --- the sweeps --------------------------------------------------------------------------


def _configs(name: str, spec: dict, pipelines, settings: dict) -> list[BenchConfig]:
    out = []
    for p in pipelines:
        if p in PEERS and spec["source"] != "raw":
            continue  # the peers read PNG files only (documented in the notebook)
        out.append(
            BenchConfig(
                pipeline=p,
                source=spec["source"],
                data_dir=spec.get("data_dir"),
                records_dir=spec.get("records_dir"),
                **settings,
            )
        )
    return out


def throughput_sweep(
    sources: dict[str, dict],
    pipelines=("naive", "optimized", "keras-sequence", "keras-directory"),
    metadata=None,
    progress: bool = True,
    **settings,
):
    """Measure every pipeline on every source; one row per measurement.

    Args:
        sources: name -> ``{"source": "raw"|"records", "data_dir": ..., "records_dir": ...}``.
        pipelines: names from ``BENCH_PIPELINES``; the peers run on raw sources only.
        metadata: dataset table for raw sources, if loaded.
        **settings: other ``BenchConfig`` fields (batch_size, windows, ...).

    Returns:
        DataFrame: source_name, pipeline, images_per_sec, min/max, windows
        (list), single-core rate, limit, fraction_of_limit.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    jobs = [(n, c) for n, spec in sources.items() for c in _configs(n, spec, pipelines, settings)]
    single: dict = {}  # (source name, peer or None) -> single-core rate, measured once
    rows = []
    for name, cfg in tqdm(jobs, desc="throughput", disable=not progress):
        key = (name, cfg.pipeline if cfg.pipeline in PEERS else None)
        if key not in single:
            single[key] = single_core_rate(cfg, metadata)
        rows.append({"source_name": name, **_row(measure(cfg, metadata, single_core=single[key]))})
    return pd.DataFrame(rows)


def _row(r: dict) -> dict:
    return {
        "pipeline": r["pipeline"],
        "source": r["source"],
        "source_variant": r["variant"],
        "images_per_sec": r["images_per_sec"],
        "images_per_sec_min": r["images_per_sec_spread"]["min"],
        "images_per_sec_max": r["images_per_sec_spread"]["max"],
        "windows": r["images_per_sec_windows"],
        "single_core_images_per_sec": r.get("single_core_images_per_sec"),
        "limit_images_per_sec": r.get("limit_images_per_sec"),
        "fraction_of_limit": r.get("fraction_of_limit"),
        "utilization": r.get("utilization"),
        "stall_fraction": r["stall_fraction"],
        "device_rate": r.get("device_rate"),
        "png_decoder": r.get("pipeline_settings", {}).get("png_decoder"),
        # CPU time of this process per image (all its threads): what feeding one image
        # costs in core-milliseconds, whatever the number of cores
        "cpu_ms_per_image": r.get("cpu_ms_per_image"),
        "cpu_count": r["cpu_count"],
    }


def ablation(
    source: str,
    *,
    data_dir=None,
    records_dir=None,
    metadata=None,
    steps=None,
    include_naive: bool = True,
    progress: bool = True,
    **settings,
):
    """The optimized pipeline, then optimized minus one step at a time (then naive).

    Args:
        source: ``raw`` or ``records``.
        steps: step names (``pipeline.OPTIMIZED_STEPS``); default all that act on the source.
        include_naive: add the naive pipeline (every step off) as the last row.
        **settings: other ``BenchConfig`` fields.

    Returns:
        DataFrame: variant, step, images_per_sec (+ min/max), fraction_of_limit,
        relative (throughput / optimized with all steps).
    """
    import pandas as pd
    from tqdm.auto import tqdm

    base = BenchConfig(
        pipeline="optimized", source=source, data_dir=data_dir, records_dir=records_dir, **settings
    )
    metadata = metadata_for(base, metadata)
    single = single_core_rate(base, metadata)
    variants = [("optimized (all steps)", None, base)]
    variants += [
        (f"minus {s}", s, dataclasses.replace(base, disable=(s,)))
        for s in (steps or config.steps_for(source))
    ]
    if include_naive:
        variants.append(("naive (no steps)", "all", dataclasses.replace(base, pipeline="naive")))
    rows = []
    for label, step, cfg in tqdm(variants, desc=f"ablation {source}", disable=not progress):
        rows.append(
            {"variant": label, "step": step, **_row(measure(cfg, metadata, single_core=single))}
        )
    df = pd.DataFrame(rows)
    df["relative"] = df["images_per_sec"] / df["images_per_sec"].iloc[0]
    return df


def ablation_sweep(
    sources: dict[str, dict], names, metadata=None, progress: bool = True, **settings
):
    """:func:`ablation` on each source in ``names`` (keys of ``sources``), stacked, with ``source_name``."""
    import pandas as pd

    parts = [
        ablation(
            sources[n]["source"],
            data_dir=sources[n].get("data_dir"),
            records_dir=sources[n].get("records_dir"),
            metadata=metadata,
            progress=progress,
            **settings,
        ).assign(source_name=n)
        for n in names
    ]
    return pd.concat(parts, ignore_index=True)


def utilization_sweep(
    source: str,
    rates,
    *,
    data_dir=None,
    records_dir=None,
    metadata=None,
    pipelines=("naive", "optimized"),
    rates_are_fractions: bool = True,
    progress: bool = True,
    **settings,
):
    """SIMULATED accelerator utilization against its speed, for each pipeline.

    Args:
        rates: device speeds; fractions of the measured CPU limit when
            ``rates_are_fractions`` (portable across machines), else images/s.
        pipelines: pipelines compared (default naive vs optimized).
        **settings: other ``BenchConfig`` fields.

    Returns:
        DataFrame: pipeline, device_rate (images/s), rate_vs_limit,
        utilization, stall_fraction, images_per_sec, limit_images_per_sec.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    base = BenchConfig(
        pipeline="optimized", source=source, data_dir=data_dir, records_dir=records_dir, **settings
    )
    metadata = metadata_for(base, metadata)
    single = single_core_rate(base, metadata)
    limit = usable_cores() * single
    jobs = [(p, r * limit if rates_are_fractions else float(r)) for p in pipelines for r in rates]
    rows = []
    for p, rate in tqdm(jobs, desc="utilization (simulated)", disable=not progress):
        cfg = dataclasses.replace(base, pipeline=p, device_rate=rate)
        row = _row(measure(cfg, metadata, single_core=single))
        rows.append({**row, "rate_vs_limit": rate / limit, "device": SIMULATED})
    return pd.DataFrame(rows)


# --- the conclusion, computed -------------------------------------------------------


def _pick(df, **match):
    rows = df
    for k, v in match.items():
        rows = rows[rows[k] == v]
    return rows["images_per_sec"].iloc[0] if len(rows) else None


def conclusion_markdown(
    throughput=None, ablation_df=None, utilization=None, cores: int | None = None
) -> str:
    """A short conclusion written from the measured numbers (Markdown)."""
    cores = cores or usable_cores()
    lines = [
        f"**What these numbers say** (measured on this machine: {cores} CPU cores, no GPU):",
        "",
    ]
    if throughput is not None and len(throughput):
        lines += _throughput_findings(throughput)
    if ablation_df is not None and len(ablation_df):
        lines += _ablation_findings(ablation_df)
    if utilization is not None and len(utilization):
        lines += _utilization_findings(utilization)
    return "\n".join(lines)


def _throughput_findings(df) -> list[str]:
    out = []
    for name in dict.fromkeys(df["source_name"]):
        part = df[df["source_name"] == name]
        opt, naive = _pick(part, pipeline="optimized"), _pick(part, pipeline="naive")
        keras = _pick(part, pipeline="keras-sequence")
        directory = _pick(part, pipeline="keras-directory")
        if opt is None:
            continue
        text = f"- **{name}**: optimized {opt:.0f} images/s"
        if naive:
            text += f", {opt / naive:.2f}x naive ({naive:.0f})"
        frac = part.loc[part["pipeline"] == "optimized", "fraction_of_limit"].iloc[0]
        if frac is not None and not math.isnan(frac):
            text += f"; {frac:.0%} of the CPU limit"
        if keras:
            text += f"; {opt / keras:.2f}x the Keras Sequence peer ({keras:.0f})"
        if directory:
            text += (
                f"; {opt / directory:.2f}x Keras's image_dataset_from_directory "
                f"({directory:.0f}, no antialiasing)"
            )
        out.append(text + ".")
    opt = df[df["pipeline"] == "optimized"].set_index("source_name")["images_per_sec"]
    if "raw" in opt.index:
        for name, value in opt.items():
            if name != "raw":
                gain = value / opt["raw"]
                poster = (
                    "; the poster measured +8 % to +13 % for PNG bytes in TFRecords, in training"
                    if name == "records-png"
                    else ""
                )
                out.append(
                    f"- Optimized on **{name}** reads {gain:.2f}x as fast as on raw PNG files "
                    f"({gain - 1:+.0%}{poster})."
                )
    over = df[df["fraction_of_limit"].fillna(0) > 1.05]
    if len(over):
        out.append(
            f"- {len(over)} measurement(s) exceed the limit by more than 5 %: the single-core "
            "rate was measured low (noise, or per-batch overhead that one thread pays in full)."
        )
    return out + [""]


def _ablation_findings(df) -> list[str]:
    out = []
    hue = "source_name" if "source_name" in df else "source"
    for name in dict.fromkeys(df[hue]):
        part = df[(df[hue] == name) & df["step"].notna() & (df["step"] != "all")]
        if not len(part):
            continue
        worst = part.loc[part["relative"].idxmin()]
        free = part[part["relative"] >= 0.95]["step"].tolist()
        text = (
            f"- Ablation on **{name}**: removing *{worst['step']}* costs the most "
            f"({1 - worst['relative']:.0%} of the optimized throughput)"
        )
        if free:
            text += f"; removing {', '.join(free)} costs under 5 % here"
        out.append(text + ".")
    return out + [""]


def _utilization_findings(df) -> list[str]:
    out = []
    for p in dict.fromkeys(df["pipeline"]):
        part = df[df["pipeline"] == p].sort_values("device_rate")
        kept = part[part["utilization"] >= 0.95]
        if len(kept):
            best = kept.iloc[-1]
            out.append(
                f"- SIMULATED accelerator, **{p}**: utilization stays >= 95 % up to "
                f"{best['device_rate']:.0f} images/s ({best['rate_vs_limit']:.0%} of the CPU limit)."
            )
        else:
            out.append(
                f"- SIMULATED accelerator, **{p}**: utilization never reaches 95 % "
                f"(best {part['utilization'].max():.0%})."
            )
    out.append(
        "- A device faster than the CPU limit starves whatever the pipeline: then the answer is "
        "cheaper records (compact) or more CPUs (the tf.data service)."
    )
    return out + [""]
