"""Batch studies: papermill sweeps over parameter grids, resumable.

A study specification (``papermill_runs/*.yaml``) is a list of stages; each
stage is a notebook and a parameter grid::

    name: demo
    vars: {data: "{outputs}/data/demo"}       # reusable values, may use {outputs}
    stages:
      - name: train
        notebook: 04_distributed_training
        parameters: {DATA_DIR: "{data}", EPOCHS: 2}   # fixed for every run
        grid: {MODEL: [densenet121, resnet50], RANKS: [1, 2]}   # cartesian product
        cases:                    # optional: values that go together, crossed with the grid
          - {SOURCE: raw}
          - {SOURCE: records, RECORDS_DIR: "{study_dir}/records/png-w2", _label: png-records}

Every run gets a stable id from its parameters and executes into
``outputs/<study>/<stage>/<run_id>/`` (executed notebook, HTML rendering,
and the notebook's own ``params.json``/``metrics.json``, since ``OUTPUT_DIR``
is set to that folder). A run is complete when its ``run.json`` says so for
the same parameters; complete runs are skipped, so an interrupted study
resumes where it stopped. A failed run is reported and the study goes on.
A collecting stage (the summary) is run again when a run record it read has
changed since. One study at a time runs in a study folder (``.study.lock``).

A stage (or the whole spec, as a default) can set ``timeout: SECONDS``: a run
that takes longer has its kernel and the processes it started (Horovod ranks)
killed, is recorded as failed ("timed out after ..."), and the study goes on.

``log_output: true`` in a spec (or ``chexlib study --log-output``) shows a run
as it goes: each notebook's printed cell output is written to the study's
stdout as it comes, and the Horovod jobs it launches pass every rank's lines
on as they come, prefixed with the rank (``[1] Epoch 2/10 ...``), also kept in
``ranks.log`` in the training run's folder. With ``--jobs`` above 1 the lines of
runs executed at the same time interleave.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import os
import re
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from chexlib.core.files import read_json, write_json
from chexlib.core.flags import add_flags, config_from_args, option
from chexlib.study import slurm, slurm_spec
from chexlib.study.html import render_html
from chexlib.study.lock import study_lock
from chexlib.study.notebook import REPO, run_notebook
from chexlib.study.safe_yaml import YamlLimitError, safe_load
from chexlib.study.summary_inputs import inputs_digest

DEFAULT_OUTPUTS = REPO / "outputs"
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


class SpecError(ValueError):
    """A study specification is malformed; the message names the file and stage."""


@dataclass(frozen=True)
class Run:
    """One notebook execution: a stage, its parameters and where it writes."""

    study: str
    stage: str
    notebook: str
    parameters: dict
    run_dir: Path
    html_name: str | None = None  # name of the HTML rendering; default: the notebook's
    collects: bool = False  # a one-run stage reading every earlier run (the summary)
    timeout: float | None = None  # seconds the run may take; then its kernel is stopped
    study_dir: Path | None = None  # the folder whose runs a collecting run reads
    slurm: slurm_spec.Resources | None = None  # its Slurm job's request (--executor slurm)

    @property
    def run_id(self) -> str:
        return self.run_dir.name

    @property
    def executed(self) -> Path:
        return self.run_dir / f"{Path(self.notebook).stem}.ipynb"

    def status(self) -> str:
        """``complete`` (same parameters finished), ``failed``, ``incomplete`` or ``new``."""
        marker = self.run_dir / "run.json"
        if not marker.is_file():
            return "incomplete" if self.run_dir.exists() else "new"
        record = read_json(marker, expect=dict)  # RecordError names a corrupt marker
        if record.get("parameters") != _canonical(self.parameters):
            return "incomplete"
        return record.get("status", "incomplete")


@dataclass
class StudyResult:
    ran: list[Run] = field(default_factory=list)
    skipped: list[Run] = field(default_factory=list)
    failed: list[tuple[Run, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed


def _canonical(params: dict) -> dict:
    return json.loads(json.dumps(params, sort_keys=True, default=str))


def run_id(params: dict, grid_keys: list[str]) -> str:
    """Readable and stable: the grid values, then a hash of all parameters."""
    digest = hashlib.sha256(json.dumps(_canonical(params), sort_keys=True).encode()).hexdigest()[:8]
    slug = "_".join(f"{k.lower()}-{params[k]}" for k in grid_keys)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "", slug)[:80]
    return f"{slug}_{digest}" if slug else digest


def _substitute(value, variables: dict, where: str):
    """Fill ``{name}`` placeholders in strings (recursively in lists and dicts)."""
    if isinstance(value, str):

        def fill(match):
            name = match.group(1)
            if name not in variables:
                raise SpecError(
                    f"{where}: unknown placeholder {{{_cut(name)}}}; "
                    f"known: {_echo(sorted(variables))}"
                )
            return str(variables[name])

        return _PLACEHOLDER.sub(fill, value)
    if isinstance(value, list):
        return [_substitute(v, variables, where) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, variables, where) for k, v in value.items()}
    return value


# Names that become folders: no '/', no '..', nothing hidden, so a run folder
# can never land outside --outputs.
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")
_SAFE_HINT = (
    "letters, digits, '-', '_' and '.' only (no '/', no '..', not starting with '.' or '-')"
)
_SPEC_KEYS = ("name", "hosts", "vars", "stages", "timeout", "log_output", "slurm")
_STAGE_KEYS = ("name", "notebook", "parameters", "grid", "cases", "output_dir", "html")
_STAGE_KEYS += ("timeout", "slurm")


def _kind(value) -> str:
    return "null" if value is None else type(value).__name__


_ECHOED = 80  # characters of a bad value an error repeats


def _cut(text: str) -> str:
    """``text``, or its first :data:`_ECHOED` characters and its length."""
    return text if len(text) <= _ECHOED else f"{text[:_ECHOED]}... ({len(text):,} characters)"


def _echo(value) -> str:
    """``repr(value)`` as an error repeats it: cut by :func:`_cut`."""
    return _cut(repr(value))


def check_name(value, field: str) -> str:
    """``value`` if it is a safe folder name, else a :class:`SpecError` naming ``field``."""
    if not isinstance(value, str):
        raise SpecError(f"{field} must be a string, not {_kind(value)} ({_echo(value)})")
    if not _SAFE_NAME.fullmatch(value) or ".." in value:
        raise SpecError(f"{field} {_echo(value)} is not a safe name: use {_SAFE_HINT}")
    return value


def _check_mapping(value, field: str, keys: str = "identifier") -> dict:
    """A mapping whose keys are parameter names (Python identifiers papermill can inject)."""
    if not isinstance(value, dict):
        raise SpecError(f"{field} must be a mapping, not {_kind(value)} ({_echo(value)})")
    bad = [k for k in value if not (isinstance(k, str) and (k.isidentifier() or k == keys))]
    if bad:
        raise SpecError(
            f"{field}: keys must be parameter names (Python identifiers), not {_echo(bad)}"
        )
    return value


def _check_keys(mapping: dict, known: tuple, field: str) -> None:
    unknown = [k for k in mapping if k not in known]
    if unknown:
        raise SpecError(f"{field}: unknown key(s) {_echo(unknown)}; known: {list(known)}")


def _check_string(mapping: dict, key: str, field: str) -> None:
    if key in mapping and (not isinstance(mapping[key], str) or not mapping[key].strip()):
        value = mapping[key]
        raise SpecError(
            f"{field}{key} must be a non-empty string, not {_kind(value)} ({_echo(value)})"
        )


def _check_timeout(mapping: dict, field: str) -> None:
    """``timeout``: seconds (a positive number) a run may take, or null for no limit."""
    value = mapping.get("timeout")
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise SpecError(
            f"{field}timeout must be a positive number of seconds (or null), "
            f"not {_kind(value)} ({_echo(value)})"
        )


def load_spec(path: str | Path) -> dict:
    """Read and check a study specification: every field's type, and names safe as folders.

    Raises:
        SpecError: the message names the file, the stage and the field.
    """
    path = Path(path)
    try:
        spec = safe_load(path.read_text(encoding="utf-8"))  # bounded: no alias bomb, no deep nest
    except YamlLimitError as err:
        raise SpecError(f"{path}: {err}") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise SpecError(f"{path}: cannot read study specification ({err})") from err
    if not isinstance(spec, dict):
        raise SpecError(f"{path}: a study specification is a mapping with a 'stages' list")
    _check_keys(spec, _SPEC_KEYS, str(path))
    if "name" in spec:
        check_name(spec["name"], f"{path}: name")
    else:
        check_name(path.stem, f"{path}: name (from the file name; set 'name:')")
        spec["name"] = path.stem
    if spec.get("hosts") is not None and not isinstance(spec["hosts"], str):
        raise SpecError(f"{path}: hosts must be a string, not {_kind(spec['hosts'])}")
    _check_timeout(spec, f"{path}: ")
    slurm_spec.check(spec.get("slurm"), f"{path}: slurm", SpecError)
    if not isinstance(spec.get("log_output", False), bool):
        value = spec["log_output"]
        raise SpecError(
            f"{path}: log_output must be true or false, not {_kind(value)} ({_echo(value)})"
        )
    variables = _check_mapping(spec.get("vars") or {}, f"{path}: vars")
    for name, value in variables.items():
        if not isinstance(value, str | int | float | bool):
            raise SpecError(f"{path}: vars.{name} must be a string or a number, not {_kind(value)}")
    stages = spec.get("stages")
    if not isinstance(stages, list) or not stages:
        raise SpecError(f"{path}: a study needs a non-empty 'stages' list")
    names = set()
    for i, stage in enumerate(stages):
        _check_stage(stage, f"{path} stage {i + 1}", path)
        if stage["name"] in names:
            raise SpecError(f"{path} stage {i + 1}: duplicate stage name {stage['name']!r}")
        names.add(stage["name"])
    spec["_path"] = str(path)
    return spec


def _check_stage(stage, where: str, path: Path) -> None:
    """Check one stage of a specification in place (a notebook path made absolute)."""
    if not isinstance(stage, dict) or "name" not in stage or "notebook" not in stage:
        raise SpecError(f"{where}: each stage needs 'name' and 'notebook'")
    check_name(stage["name"], f"{where}: name")
    where = f"{where} ({stage['name']})"
    _check_keys(stage, _STAGE_KEYS, where)
    _check_timeout(stage, f"{where}: ")
    slurm_spec.check(stage.get("slurm"), f"{where}: slurm", SpecError)
    for key in ("notebook", "output_dir", "html"):
        _check_string(stage, key, f"{where}: ")
    if "html" in stage:
        check_name(stage["html"], f"{where}: html")
    _check_mapping(stage.get("parameters", {}), f"{where}: 'parameters'")
    grid = _check_mapping(stage.get("grid", {}), f"{where}: 'grid'")
    bad = [k for k, v in grid.items() if not isinstance(v, list) or not v]
    if bad:
        raise SpecError(f"{where}: grid values must be non-empty lists: {_echo(bad)}")
    cases = stage.get("cases", [{}])
    if not isinstance(cases, list) or not cases or not all(isinstance(c, dict) for c in cases):
        raise SpecError(f"{where}: 'cases' must be a non-empty list of mappings")
    for j, case in enumerate(cases):
        _check_mapping(case, f"{where}: cases[{j}]", keys="_label")
        if "_label" in case:
            check_name(case["_label"], f"{where}: cases[{j}]._label")
    if "output_dir" in stage and (grid or len(cases) > 1):
        raise SpecError(f"{where}: 'output_dir' is for one-run stages only")
    if "/" in stage["notebook"]:  # a path: relative to the specification's folder
        stage["notebook"] = str((path.parent / stage["notebook"]).resolve())


def expand(spec: dict, outputs: str | Path = DEFAULT_OUTPUTS, hosts=None) -> list[Run]:
    """All runs of a study, in stage order, grid in the order written; ``hosts``: what
    ``{hosts}`` becomes (None: ``CHEXLIB_HOSTS``, else the spec's ``hosts``)."""
    outputs = Path(outputs).resolve()
    study_dir = outputs / spec["name"]
    variables = {"outputs": outputs, "study_dir": study_dir, "repo": REPO}
    # Cluster-specific values come from the environment, so one spec runs anywhere.
    variables["hosts"] = os.environ.get("CHEXLIB_HOSTS", spec.get("hosts", "") or "")
    variables["hosts"] = variables["hosts"] if hosts is None else hosts
    # absolute: the notebooks run in their own folder, not where `chexlib study` started
    data_env = os.environ.get("CHEXLIB_DATA") or str(outputs / "data" / "nih")
    variables["data_env"] = str(Path(data_env).expanduser().resolve())
    for name, value in (spec.get("vars") or {}).items():
        variables[name] = _substitute(value, variables, f"{spec['_path']} vars.{name}")
    stage_dirs = {str(study_dir / stage["name"]) for stage in spec["stages"]}
    clash = [f"{k}={v}" for k, v in variables.items() if str(v).rstrip("/") in stage_dirs]
    if clash:
        raise SpecError(
            f"{spec['_path']}: vars {_echo(clash)} point into a stage's run folder; rename them"
        )
    runs = []
    for stage in spec["stages"]:
        where = f"{spec['_path']} stage {stage['name']}"
        fixed = _substitute(stage.get("parameters", {}), variables, where)
        grid = _substitute(stage.get("grid", {}), variables, where)
        cases = _substitute(stage.get("cases", [{}]), variables, where)
        for case, combo in itertools.product(cases, itertools.product(*grid.values())):
            label = case.get("_label")  # names a case in run ids; not a notebook parameter
            varied = {k: v for k, v in case.items() if k != "_label"}
            varied.update(zip(grid, combo, strict=True))
            params = {**fixed, **varied}
            # Ids show short values only (paths would make them unreadable).
            shown = [
                k
                for k, v in varied.items()
                if "/" not in str(v) and not (label and str(v) in label.split("-"))
            ]
            if label is not None:  # placeholders are filled by now: check again
                check_name(label, f"{where}: _label")
            rid = run_id(params, shown)
            run_dir = study_dir / stage["name"] / (f"{label}_{rid}" if label else rid)
            if "output_dir" in stage:  # a one-run stage writing to a fixed folder (the summary)
                run_dir = Path(_substitute(stage["output_dir"], variables, where))
            run_dir = _inside(run_dir, outputs, f"{where}: run folder")
            params["OUTPUT_DIR"] = str(run_dir)
            runs.append(
                Run(
                    spec["name"],
                    stage["name"],
                    stage["notebook"],
                    params,
                    run_dir,
                    stage.get("html"),
                    collects="output_dir" in stage,
                    timeout=stage.get("timeout", spec.get("timeout")),
                    study_dir=study_dir,
                    slurm=_resources(spec, stage, {**variables, **params}, where),
                )
            )
    return runs


def _resources(spec: dict, stage: dict, variables: dict, where: str) -> slurm_spec.Resources:
    """A run's Slurm request (:func:`chexlib.study.slurm_spec.of_run`), placeholders filled."""
    fill = functools.partial(_substitute, variables=variables, where=f"{where}: slurm")
    return slurm_spec.of_run(spec, stage, fill, f"{where}: slurm", SpecError)


def _inside(folder: Path, outputs: Path, field: str) -> Path:
    """``folder`` made absolute (``..`` removed, links kept), if it lies inside ``outputs``."""
    folder = Path(os.path.abspath(outputs / folder))
    if folder == outputs or not folder.is_relative_to(outputs):
        raise SpecError(f"{field} {folder} is not inside the outputs folder {outputs}")
    return folder


class RunTimeout(RuntimeError):
    """A run outlived its stage's ``timeout``; its kernel and everything it started were killed."""


def execute(run: Run, html: bool = True, log_output: bool = False, extra=None, parameters=None):
    """Run one notebook; ``run.json`` records the outcome either way, and ``extra`` (a
    Slurm job's id and nodes). ``parameters``: the notebook's instead of ``run.parameters``.

    ``log_output``: stream its cell output and its ranks' output as it comes
    (see :func:`chexlib.study.notebook.run_notebook`).

    With ``run.timeout``, the kernel (and the processes it started, such as
    Horovod ranks) is killed when the run takes longer: papermill then fails
    and this raises :class:`RunTimeout`, so a hung rank cannot stall a study.
    """
    run.run_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "stage": run.stage,
        "notebook": run.notebook,
        "parameters": _canonical(run.parameters),
        **(extra or {}),
    }
    if run.collects:  # what it reads, taken before: a later change makes it stale
        record["inputs_sha256"] = _inputs_digest(run)
    write_json(run.run_dir / "run.json", {**record, "status": "running"})
    html_path = run.run_dir / (run.html_name or f"{run.executed.stem}.html")
    start, done, fired = time.time(), threading.Event(), []
    watch = threading.Thread(
        target=_watch_kernel, args=(run.run_dir, run.timeout, done, fired), daemon=True
    )
    if run.timeout:
        watch.start()
    try:
        given = run.parameters if parameters is None else parameters  # hosts filled in by Slurm
        run_notebook(run.notebook, run.executed, given, cwd=run.run_dir, log_output=log_output)
    except Exception as err:  # papermill keeps the failing cell's error in the notebook
        done.set()
        if watch.is_alive():
            watch.join()
        reason = _short(err)
        if fired:
            reason = (
                f"timed out after {run.timeout:g} s (timeout of stage {run.stage}): stopped its "
                f"kernel and the processes it started ({type(err).__name__}: {reason[:200]})"
            )
        write_json(
            run.run_dir / "run.json",
            {**record, "status": "failed", "error": reason, "seconds": time.time() - start},
        )
        if fired:
            raise RunTimeout(reason) from err
        raise
    finally:
        done.set()
        if html and run.executed.exists():
            render_html(run.executed, html_path)
    write_json(
        run.run_dir / "run.json", {**record, "status": "complete", "seconds": time.time() - start}
    )


def _watch_kernel(run_dir: Path, timeout: float, done: threading.Event, fired: list) -> None:
    """After ``timeout`` seconds, kill the run's kernel; again every 2 s until ``done``."""
    if done.wait(timeout):
        return
    fired.append(time.time())
    while True:
        _kill_kernel(run_dir)
        if done.wait(2.0):
            return


def _kill_kernel(run_dir: Path) -> int:
    """Kill the kernel this process runs in ``run_dir`` (papermill starts it there) and
    every process below it; return how many processes were killed."""
    import psutil

    target, killed = os.path.realpath(run_dir), 0
    for child in psutil.Process().children():
        try:
            if os.path.realpath(child.cwd()) != target:
                continue
            tree = [*child.children(recursive=True), child]
        except psutil.Error:
            continue
        for proc in tree:
            with contextlib.suppress(psutil.Error):
                proc.kill()
                killed += 1
    return killed


def _short(err: Exception, keep: int = 600) -> str:
    """``err`` on one line; a long one keeps its start (what failed) and its end (why).
    A notebook's failure is its exception (papermill's ``ename: evalue``), not the
    traceback around it (the executed notebook keeps that)."""
    name, value = getattr(err, "ename", None), getattr(err, "evalue", None)
    lines = (f"{name}: {value}" if name and value else str(err)).strip().splitlines()
    text = " | ".join(line for line in lines if line.strip()) or type(err).__name__
    if len(text) <= keep:
        return text
    head = keep // 3
    return f"{text[:head]} ... {text[-(keep - head) :]}"


def run_study(
    spec_path: str | Path,
    outputs: str | Path = DEFAULT_OUTPUTS,
    only: Sequence[str] | None = None,
    dry_run: bool = False,
    jobs: int = 1,
    html: bool = True,
    log=print,
    log_output: bool | None = None,
    executor: str = "local",
) -> StudyResult:
    """Expand a study and execute what is not complete yet.

    Args:
        spec_path: the YAML specification.
        outputs: root of the outputs tree; runs go to ``<outputs>/<study>/...``.
        only: run only these stages (names); the others are left as they are.
        dry_run: list runs and their status, execute nothing.
        jobs: runs of one stage executed at the same time (stages stay in order,
            since later stages read what earlier ones wrote).
        html: write an HTML rendering beside each executed notebook.
        log: where progress lines go.
        log_output: stream each run's cell output and its Horovod ranks' output
            to stdout as it comes; None: the spec's ``log_output`` (default off).
        executor: ``local`` (here) or ``slurm`` (each run a batch job: chexlib.study.slurm).
    """
    spec = load_spec(spec_path)
    if log_output is None:
        log_output = spec.get("log_output", False)
    if executor not in ("local", "slurm"):
        raise ValueError(f"executor {executor!r}: use 'local' or 'slurm'")
    on_slurm = executor == "slurm"
    every_run = expand(spec, outputs, hosts=slurm_spec.ALLOCATION_HOSTS if on_slurm else None)
    # One study per folder at a time, from deciding what to run to the last run; the
    # lock's folder is made here: one that cannot be (a file in the way, no permission,
    # a full disk) stops the study with one error, not as a failure of every run.
    lock = study_lock(Path(outputs).resolve() / spec["name"])
    with contextlib.nullcontext() if dry_run else lock:
        statuses = _statuses(every_run)  # over all stages: a summary depends on every run
        runs = _selected_runs(spec, spec_path, every_run, only, log)
        result = StudyResult()
        todo = []
        for run in runs:
            status = statuses[run.run_dir]
            (result.skipped if status == "complete" else todo).append(run)
            if dry_run:
                log(f"{status:>10}  {run.stage}/{run.run_id}")
        log(
            f"study {spec['name']}: {len(runs)} runs, {len(result.skipped)} already complete, "
            f"{len(todo)} to run"
        )
        if dry_run or not todo:
            return result
        start = time.time()
        run_one = functools.partial(slurm.execute, log=log) if on_slurm else execute
        _execute_stages(todo, result, jobs, log, run_one, html=html, log_output=log_output)
        _report(spec["name"], result, time.time() - start, log)
    return result


def _selected_runs(
    spec: dict, spec_path, runs: list[Run], only: Sequence[str] | None, log
) -> list[Run]:
    """``runs``, or those of the ``only`` stages; notes stray run folders."""
    for folder in _unlisted_run_folders(runs):
        log(
            f"note: {folder} is not a run of this spec (an earlier version?); summaries still read it"
        )
    if not only:
        return runs
    unknown = set(only) - {s["name"] for s in spec["stages"]}
    if unknown:
        raise SpecError(f"{spec_path}: no stage(s) {_echo(sorted(unknown))}")
    return [r for r in runs if r.stage in only]


def _execute_stages(todo: list[Run], result: StudyResult, jobs: int, log, run_one, **execute_args):
    """Run ``todo`` stage after stage (later stages read earlier ones), ``jobs`` at a time
    within a stage; each outcome goes into ``result``, a failure does not stop the rest."""
    counter, start = itertools.count(1), time.time()

    def one(run: Run) -> None:
        i = next(counter)
        log(f"[{i}/{len(todo)}] {_clock(time.time() - start)}  {run.stage}/{run.run_id} ...")
        t0 = time.time()
        try:
            run_one(run, **execute_args)
            result.ran.append(run)
            log(f"[{i}/{len(todo)}] done in {_clock(time.time() - t0)}  {run.stage}/{run.run_id}")
        except Exception as err:
            result.failed.append((run, _short(err)))
            log(f"[{i}/{len(todo)}] FAILED  {run.stage}/{run.run_id}: see {run.executed}")

    for _, stage_runs in itertools.groupby(todo, key=lambda r: r.stage):
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            list(pool.map(one, stage_runs))


def _report(name: str, result: StudyResult, seconds: float, log) -> None:
    """The closing lines of a study: counts, then each failure with where to look."""
    log(
        f"study {name}: {len(result.ran)} ran, {len(result.skipped)} skipped, "
        f"{len(result.failed)} failed in {_clock(seconds)}"
    )
    for run, reason in result.failed:
        log(
            f"  failed: {run.stage}/{run.run_id}\n    notebook: {run.executed}\n    error: {reason}"
        )


def _statuses(runs: list[Run]) -> dict[Path, str]:
    """Each run's status; a complete run that collects the study (the summary) is
    ``stale`` when a run before it is not complete, or finished after it, or a
    run record it read has changed since (edited, deleted, added)."""
    statuses, latest, pending = {}, 0.0, False
    for run in runs:
        status = run.status()
        if (
            status == "complete"
            and run.collects
            and (pending or _finished(run) < latest or _inputs_changed(run))
        ):
            status = "stale"
        if status == "complete":
            latest = max(latest, _finished(run))
        else:
            pending = True
        statuses[run.run_dir] = status
    return statuses


def _inputs_changed(run: Run) -> bool:
    """Whether the records a complete collecting run read differ from those there now
    (a record written before the digest was kept counts as changed)."""
    recorded = read_json(run.run_dir / "run.json", expect=dict).get("inputs_sha256")
    return recorded != _inputs_digest(run)


def _inputs_digest(run: Run) -> str:
    return inputs_digest(run.study_dir or run.run_dir.parent, run.run_dir)


def _finished(run: Run) -> float:
    """When a complete run finished (its ``run.json`` was last written)."""
    return (run.run_dir / "run.json").stat().st_mtime


def _unlisted_run_folders(runs: list[Run]) -> list[Path]:
    """Run folders in the study's stage folders that no run of the spec owns."""
    owned = {r.run_dir for r in runs}
    stage_dirs = {r.run_dir.parent for r in runs if not r.collects}
    return sorted(
        d
        for parent in stage_dirs
        if parent.is_dir()
        for d in parent.iterdir()
        if d.is_dir() and (d / "run.json").exists() and d not in owned
    )


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60:d}:{minutes % 60:02d}:{secs:02d}"


@dataclass(frozen=True)
class StudyCommand:
    """One ``chexlib study`` call: ``spec`` is its positional argument, every other field a flag."""

    spec: str = option("study specification (papermill_runs/*.yaml)", positional=True)
    only: tuple[str, ...] | None = option(
        "run only this stage (repeatable)", default=None, metavar="STAGE"
    )
    dry_run: bool = option("list runs and their status, run nothing", default=False)
    jobs: int = option("runs of one stage at the same time", default=1)
    outputs: str = option("root of the outputs tree", default=str(DEFAULT_OUTPUTS))
    html: bool = option("skip HTML renderings", default=True)  # the switch is --no-html
    executor: str = option(
        "where runs execute: local (here) or slurm (each a batch job, resources from the "
        "spec's slurm:)", choices=("local", "slurm"), default="local")  # fmt: skip
    log_output: bool | None = option(
        "stream each notebook's cell output and the Horovod ranks' output ([R]-prefixed, "
        "also kept in ranks.log) as it comes; default: the spec's log_output (off)",
        default=None,
    )


def add_arguments(parser) -> None:
    """``SPEC`` positional, then one flag per other :class:`StudyCommand` field."""
    add_flags(parser, StudyCommand)


def run(args) -> int:
    """``chexlib study SPEC``: 0 when every run is complete, 1 when one failed.

    A bad specification, a corrupt record or a system error ends the study
    before any run; the ``chexlib`` dispatcher reports it in one line (exit 2).
    """
    config = config_from_args(StudyCommand, args)
    result = run_study(
        config.spec,
        outputs=config.outputs,
        only=config.only,
        dry_run=config.dry_run,
        jobs=config.jobs,
        html=config.html,
        log=functools.partial(print, flush=True),  # in order with the streamed output
        log_output=config.log_output,
        executor=config.executor,
    )
    return 0 if result.ok else 1
