"""``chexlib bench-loop``: chexlib's training loop against a plain Keras ``fit``, and
one precision against another, in alternating processes.

``--compare loop``: the baseline is :mod:`chexlib.bench.plain_fit` (a plain
Keras ``fit`` of the same model on the same repeated batch); the other side is
``chexlib train --synthetic`` with the same model, batch and steps. The ratio
chexlib / plain says what chexlib's loop (callbacks, Horovod at one rank,
throughput accounting, the process set-up) costs; the target is >= 0.99.

``--compare precision``: ``chexlib train --synthetic --precision float32``
against ``--precision auto``. Where auto resolves to float32 (a CPU without
native bfloat16 instructions) there is nothing to compare: it says so and why,
and runs nothing. The target, on a CPU with bfloat16, is >= 1.6x.

Each process is timed by the same code (chexlib's throughput callback: warm-up
steps untimed, then windows, the median window rate). Separate processes on a
shared machine differ by 10-15 %, so the sides alternate A B, B A, A B ...
and each round's ratio compares neighbours; the median round ratio is the
result, given with its range and the load average before the first round.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from chexlib.core.files import read_json, write_json
from chexlib.core.machine import cpu_flags, cpu_model, usable_cores
from chexlib.report.benchmarks import loop_lines
from chexlib.train.config import choose_precision

TARGETS = {"loop": 0.99, "precision": 1.6}


class BenchLoopError(RuntimeError):
    """A benchmark process failed: names its log."""


@dataclasses.dataclass(frozen=True)
class LoopBench:
    """Settings shared by both sides of every round."""

    model: str = "densenet121"
    image_size: int = 224
    batch_size: int = 16
    warmup_steps: int = 3
    window_steps: int = 3
    windows: int = 4
    verbose: int = 1
    timeout: float = 1800.0  # seconds per process

    @property
    def steps(self) -> int:
        return self.warmup_steps + self.windows * self.window_steps


def _run(command: list[str], log: Path, timeout: float) -> str:
    """Run one side to completion; its stdout (also in ``log`` with stderr)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, env=env, check=False
        )
    except subprocess.TimeoutExpired:
        raise BenchLoopError(f"{command[0]} ran over {timeout:.0f} s: see {log}") from None
    log.write_text(f"$ {' '.join(command)}\n{done.stdout}\n--- stderr ---\n{done.stderr}")
    if done.returncode != 0:
        raise BenchLoopError(f"a benchmark process exited {done.returncode}: see {log}")
    return done.stdout


def plain_side(cfg: LoopBench, work: Path, tag: str, precision: str = "float32") -> float:
    """Images/s of the plain Keras fit (:mod:`chexlib.bench.plain_fit`)."""
    command = [sys.executable, "-m", "chexlib.bench.plain_fit", "--model", cfg.model]
    command += ["--image-size", str(cfg.image_size), "--batch-size", str(cfg.batch_size)]
    command += ["--warmup-steps", str(cfg.warmup_steps), "--window-steps", str(cfg.window_steps)]
    command += ["--windows", str(cfg.windows), "--precision", precision]
    command += ["--verbose", str(cfg.verbose)]
    stdout = _run(command, work / f"{tag}.log", cfg.timeout)
    lines = stdout.strip().splitlines()
    result = json.loads(lines[-1]) if lines else {}
    if not result.get("images_per_sec"):
        raise BenchLoopError(f"the plain fit timed no window: see {work / f'{tag}.log'}")
    return float(result["images_per_sec"])


def chexlib_side(cfg: LoopBench, work: Path, tag: str, precision: str = "float32") -> float:
    """Images/s of ``chexlib train --synthetic`` (its record's median window rate)."""
    out = work / tag
    command = [str(Path(sys.executable).with_name("chexlib")), "train", "--synthetic"]
    command += ["--out", str(out), "--model", cfg.model, "--image-size", str(cfg.image_size)]
    command += ["--batch-size", str(cfg.batch_size), "--epochs", "1"]
    command += ["--steps-per-epoch", str(cfg.steps), "--warmup-epochs", "0"]
    command += ["--throughput-warmup-steps", str(cfg.warmup_steps)]
    command += ["--throughput-window-steps", str(cfg.window_steps), "--no-evaluate"]
    command += ["--no-checkpoint", "--precision", precision, "--verbose", str(cfg.verbose)]
    _run(command, work / f"{tag}.log", cfg.timeout)
    record = read_json(out / "metrics.json", expect=dict)
    if not record.get("images_per_sec"):
        raise BenchLoopError(f"chexlib train timed no window: see {out / 'metrics.json'}")
    return float(record["images_per_sec"])


def sides(compare: str, cfg: LoopBench):
    """((name, run), (name, run)): the baseline first; ratios are second / first."""
    if compare == "loop":
        return (
            ("plain Keras fit", lambda w, t: plain_side(cfg, w, t)),
            ("chexlib train", lambda w, t: chexlib_side(cfg, w, t)),
        )
    return (
        ("chexlib train float32", lambda w, t: chexlib_side(cfg, w, t, "float32")),
        ("chexlib train auto", lambda w, t: chexlib_side(cfg, w, t, "auto")),
    )


def alternate(compare: str, cfg: LoopBench, rounds: int, work: Path, progress=print) -> dict:
    """``rounds`` rounds of both sides, the order flipping every round; the record."""
    (name_a, run_a), (name_b, run_b) = sides(compare, cfg)
    load = os.getloadavg()[0]
    rows = []
    for r in range(rounds):
        order = [("a", run_a), ("b", run_b)]
        rates = {}
        for side, run in order if r % 2 == 0 else order[::-1]:
            started = time.perf_counter()
            rates[side] = run(work, f"round{r}-{side}")
            progress(
                f"round {r + 1}/{rounds}: {name_a if side == 'a' else name_b}: "
                f"{rates[side]:.2f} images/s ({time.perf_counter() - started:.0f} s)"
            )
        rows.append(
            {"round": r, "a": rates["a"], "b": rates["b"], "ratio": rates["b"] / rates["a"]}
        )
    ratios = [row["ratio"] for row in rows]
    median = statistics.median(ratios)
    return {
        "compare": compare,
        "a": name_a,
        "b": name_b,
        "settings": dataclasses.asdict(cfg),
        "rounds": rows,
        "ratio_median": median,
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "target": TARGETS[compare],
        "meets_target": median >= TARGETS[compare],
        "load_before": load,
        "cpu": cpu_model(),
        "cores": usable_cores(),
    }


def not_testable(compare: str) -> str | None:
    """Why ``compare`` cannot be measured here, or None."""
    if compare != "precision":
        return None
    precision, why = choose_precision("auto", has_gpu=False, flags=cpu_flags())
    if precision == "float32":
        return f"--precision auto gives float32 here ({why}): nothing to compare"
    return None


def add_arguments(parser) -> None:
    defaults = LoopBench()
    parser.add_argument("--compare", choices=("loop", "precision"), default="loop")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument("--out", default="outputs/bench/loop", help="folder of logs and records")
    for field in dataclasses.fields(LoopBench):
        flag = "--" + field.name.replace("_", "-")
        parser.add_argument(flag, type=type(getattr(defaults, field.name)), default=None)


def run(args) -> int:
    if args.rounds < 1:
        raise ValueError(f"--rounds must be >= 1, not {args.rounds}")
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(LoopBench)}
    cfg = LoopBench(**{k: v for k, v in given.items() if v is not None})
    out = Path(args.out) / args.compare
    reason = not_testable(args.compare)
    if reason:
        print(f"chexlib bench-loop: {args.compare}: not testable on this machine: {reason}")
        write_json(out.with_suffix(".json"), {"compare": args.compare, "not_testable": reason})
        return 0
    out.mkdir(parents=True, exist_ok=True)
    for old in out.iterdir():  # each side's run folder must be new for chexlib train
        if old.is_dir():
            shutil.rmtree(old)
    record = alternate(args.compare, cfg, args.rounds, out)
    write_json(out.with_suffix(".json"), record)
    print("\n".join(loop_lines(record)))
    return 0
