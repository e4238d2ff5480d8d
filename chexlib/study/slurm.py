"""The study's Slurm executor: each run a batch job with the resources its stage asks for.

``chexlib study SPEC --executor slurm`` hands every run to :func:`execute` here
instead of running its notebook in this process. For each run it writes, in the
run's folder, ``job.json`` (the run) and ``job.sbatch`` (the batch script, with
the stage's ``slurm:`` request as ``#SBATCH`` lines, see
:mod:`chexlib.study.slurm_spec`), submits it with ``sbatch --parsable`` and polls
``scontrol show job`` (there may be no accounting database, so no ``sacct``)
until the job ends. Inside the allocation :mod:`chexlib.study.slurm_job` runs the
notebook through :func:`chexlib.study.runner.execute`, as the local executor does
(so a rerun resumes killed training the same way), with ``{hosts}`` made from
the allocation's nodes. The job's output goes to ``slurm-<job id>.log`` in the run
folder; its path is printed when the job is submitted. ``run.json`` records the
job id, the nodes and the log; a job that ends FAILED, CANCELLED, TIMEOUT,
NODE_FAIL, ... is a failed run whose error names the Slurm state and the log.

Every Slurm command has a timeout, and a job that waits in the queue longer than
its ``queue_timeout`` (or runs past its time limit plus a grace) is cancelled and
failed: the study never waits forever for a job that cannot start or end.
"""

from __future__ import annotations

import contextlib
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from chexlib.core.files import read_json, write_json, write_text_atomic
from chexlib.study.slurm_spec import ALLOCATION_HOSTS, Resources

# Job states after which a job never runs again (Slurm's squeue/scontrol names).
ENDED = frozenset(
    "COMPLETED FAILED CANCELLED TIMEOUT NODE_FAIL OUT_OF_MEMORY PREEMPTED BOOT_FAIL "
    "DEADLINE REVOKED SPECIAL_EXIT".split()
)
POLL_SECONDS = 2.0
COMMAND_TIMEOUT = 60.0  # seconds for any one sbatch/scontrol/scancel call
RUNNING_GRACE = 300.0  # seconds past its time limit before a still-running job is given up
UNANSWERED = 180.0  # seconds of scontrol failing before the run is given up


# ``run`` below is a chexlib.study.runner.Run (not imported: the runner imports this module).


class SlurmError(RuntimeError):
    """A Slurm command failed, or a job ended other than COMPLETED; names the log."""


def slurm_command(*argv: str, timeout: float = COMMAND_TIMEOUT) -> str:
    """Run a Slurm client command; its stdout.

    Raises:
        SlurmError: the command is missing, fails or outlives ``timeout``.
    """
    tool = shutil.which(argv[0])
    if tool is None:
        raise SlurmError(
            f"{argv[0]} not found: --executor slurm needs Slurm's client commands "
            "(Debian: slurm-client; a local cluster: make cluster)"
        )
    try:
        done = subprocess.run(
            [tool, *argv[1:]], capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{shlex.join(argv)} did not answer within {timeout:g} s") from None
    if done.returncode != 0:
        raise SlurmError(f"{shlex.join(argv)} failed: {(done.stderr or done.stdout).strip()}")
    return done.stdout


def _plain(params: dict) -> dict:
    """``params`` as ``run.json`` keeps them (JSON types; the runner's ``_canonical``)."""
    return json.loads(json.dumps(params, sort_keys=True, default=str))


def parse_job(text: str) -> dict[str, str]:
    """``scontrol show job ID`` output (either form, ``-o`` or not) as ``{key: value}``.

    Values with spaces (a ``Command`` path) are cut at the space; the keys read
    here (``JobState``, ``Reason``, ``ExitCode``, ``NodeList``, ``RunTime``,
    ``StdOut``) hold none.
    """
    fields: dict[str, str] = {}
    for key, value in re.findall(r"(?:^|\s)([A-Za-z][\w/:]*)=(\S*)", text):
        fields.setdefault(key, value)
    return fields


def job_info(job_id: str) -> dict[str, str] | None:
    """The job's ``scontrol show job`` fields, or None when Slurm no longer knows it
    (purged ``MinJobAge`` seconds after it ended)."""
    try:
        text = slurm_command("scontrol", "show", "job", job_id)
    except SlurmError as err:
        if "Invalid job id" in str(err):
            return None
        raise
    return parse_job(text)


def hostnames(nodelist: str) -> list[str]:
    """``node[1-2]`` -> ``["node1", "node2"]`` (``scontrol show hostnames``)."""
    if not nodelist or nodelist in ("(null)", "None"):
        return []
    return slurm_command("scontrol", "show", "hostnames", nodelist).split()


def allocation_hosts(nodes: list[str], ranks_per_node: int) -> str:
    """Horovod's ``-H`` for an allocation: ``node1:R,node2:R``; ``""`` (all ranks on
    this machine, no ssh) for one node."""
    if len(nodes) <= 1:
        return ""
    return ",".join(f"{node}:{ranks_per_node}" for node in nodes)


def fill_hosts(value, hosts: str):
    """``value`` with :data:`ALLOCATION_HOSTS` replaced by ``hosts`` (in lists and dicts too)."""
    if isinstance(value, str):
        return value.replace(ALLOCATION_HOSTS, hosts)
    if isinstance(value, list):
        return [fill_hosts(v, hosts) for v in value]
    if isinstance(value, dict):
        return {k: fill_hosts(v, hosts) for k, v in value.items()}
    return value


def job_script(run, resources: Resources, python: str = sys.executable) -> str:
    """The batch script for ``run``: its ``#SBATCH`` request, then the job side."""
    name = re.sub(r"[^\w.-]", "", f"chexlib-{run.study}-{run.stage}")[:60]
    options = [
        f"--job-name={name}",
        *resources.sbatch_options(),
        f"--output={run.run_dir / 'slurm-%j.log'}",
        f"--chdir={run.run_dir}",
    ]
    lines = [
        "#!/bin/bash",
        f"# chexlib study {run.study}: run {run.stage}/{run.run_id} (written by chexlib study"
        " --executor slurm; resubmit by hand with: sbatch job.sbatch)",
        *(f"#SBATCH {option}" for option in options),
        "set -euo pipefail",
        f"exec {shlex.quote(python)} -m chexlib.study.slurm_job "
        f"{shlex.quote(str(run.run_dir / 'job.json'))}",
    ]
    return "\n".join(lines) + "\n"


def describe(run, html: bool) -> dict:
    """``job.json``: what the job side needs to rebuild and execute ``run``."""
    return {
        "study": run.study,
        "stage": run.stage,
        "notebook": run.notebook,
        "parameters": _plain(run.parameters),
        "run_dir": str(run.run_dir),
        "html_name": run.html_name,
        "collects": run.collects,
        "timeout": run.timeout,
        "study_dir": str(run.study_dir) if run.study_dir else None,
        "ranks_per_node": run.slurm.ranks_per_node if run.slurm else 1,
        "html": html,
    }


def submit(run, html: bool = True) -> str:
    """Write ``job.json`` and ``job.sbatch`` into the run folder, submit; the job id."""
    resources = run.slurm or Resources()
    run.run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run.run_dir / "job.json", describe(run, html))
    script = run.run_dir / "job.sbatch"
    write_text_atomic(script, job_script(run, resources))
    answer = slurm_command("sbatch", "--parsable", str(script)).strip()
    job_id = answer.split(";")[0]  # "ID" or "ID;cluster"
    if not job_id.isdigit():
        raise SlurmError(f"sbatch --parsable {script} answered {answer!r}, not a job id")
    return job_id


def execute(run, html: bool = True, log_output: bool = False, log=print) -> None:
    """Run ``run`` as a Slurm job and wait for it; ``run.json`` records the outcome.

    ``log_output``: pass the job's log on to stdout as it grows.

    Raises:
        SlurmError: the job could not be submitted, or ended other than
            COMPLETED, or was given up (queue or time limit passed): the message
            names the job, its Slurm state, its nodes and its log.
    """
    _cancel_leftover(run, log)
    record = {"stage": run.stage, "notebook": run.notebook, "parameters": _plain(run.parameters)}
    try:
        job_id = submit(run, html=html)
    except SlurmError as err:  # e.g. more nodes than the partition has: never queued
        write_json(run.run_dir / "run.json", {**record, "status": "failed", "error": str(err)})
        raise
    log_path = run.run_dir / f"slurm-{job_id}.log"
    job = {"job_id": job_id, "log": str(log_path), "nodes": []}
    write_json(run.run_dir / "run.json", {**record, "status": "submitted", "slurm": job})
    log(f"    {run.stage}/{run.run_id}: Slurm job {job_id}, log {log_path}")
    try:
        info = wait(job_id, run.slurm or Resources(), log_path if log_output else None)
    except BaseException as err:  # given up, or the study stops (Ctrl-C): do not leave it
        with contextlib.suppress(SlurmError):
            slurm_command("scancel", job_id)
        if not isinstance(err, SlurmError):
            raise
        info = {"JobState": "CANCELLED", "Reason": str(err)}
    job["nodes"] = _nodes(info)
    job.update(state=info.get("JobState", "UNKNOWN"), reason=info.get("Reason"))
    job.update(exit_code=info.get("ExitCode"), run_time=info.get("RunTime"))
    _finish_record(run, record, job, log_path)


def _nodes(info: dict[str, str]) -> list[str]:
    """The job's nodes from its ``NodeList`` (empty when it never started, or unknown)."""
    try:
        return hostnames(info.get("NodeList", ""))
    except SlurmError:
        return [info["NodeList"]]


def _finish_record(run, record: dict, job: dict, log_path: Path) -> None:
    """Add the job's end to ``run.json``; a job that did not complete the run fails it."""
    marker = run.run_dir / "run.json"
    written = read_json(marker, expect=dict) if marker.is_file() else {}
    if written.get("parameters") != record["parameters"]:
        written = {}
    final = {**record, **written, "slurm": {**written.get("slurm", {}), **job}}
    # UNKNOWN: Slurm lost the job, but the job side wrote that the notebook completed
    if job["state"] in ("COMPLETED", "UNKNOWN") and written.get("status") == "complete":
        write_json(marker, final)
        return
    nodes = ",".join(job["nodes"]) or "no node"
    reason = f"Slurm job {job['job_id']} {job['state']} on {nodes}"
    details = [f"{k} {job[k]}" for k in ("reason", "exit_code") if job[k] not in (None, "None")]
    reason += f" ({', '.join(details)})" if details else ""
    if written.get("status") == "failed" and written.get("error"):
        reason += f": {written['error']}"  # already one line, cut by the runner
    reason += f"; log: {log_path}"
    write_json(marker, {**final, "status": "failed", "error": reason})
    raise SlurmError(reason)


def wait(job_id: str, resources: Resources, stream: Path | None = None) -> dict[str, str]:
    """Poll the job until it ends; its last ``scontrol`` fields.

    ``stream``: a log to pass on to stdout as it grows. A job pending longer than
    ``resources.queue_timeout``, or running longer than its time limit plus
    :data:`RUNNING_GRACE`, or unknown to an unanswering ``scontrol`` for
    :data:`UNANSWERED` seconds, is given up with :class:`SlurmError`.
    """
    submitted, started, failing, offset = time.monotonic(), None, None, 0
    info: dict[str, str] = {"JobState": "PENDING"}
    limit = resources.time_seconds()
    while True:
        try:
            fresh, failing = job_info(job_id), None
        except SlurmError as err:
            failing = failing or time.monotonic()
            if time.monotonic() - failing > UNANSWERED:
                message = f"Slurm job {job_id}: scontrol failing for {UNANSWERED:g} s: {err}"
                raise SlurmError(message) from err
            fresh = info
        if stream is not None:
            offset = _pass_on(stream, offset)
        if fresh is None:  # purged (we missed its end), or lost with a restarted slurmctld
            gone = "no longer known to Slurm: purged, or slurmctld restarted"
            return {**info, "JobState": "UNKNOWN", "Reason": gone}
        info = fresh
        state = info.get("JobState", "")
        if state in ENDED:
            if stream is not None:
                _pass_on(stream, offset)
            return info
        now = time.monotonic()
        if state == "PENDING" and now - submitted > resources.queue_timeout:
            raise SlurmError(
                f"Slurm job {job_id} still PENDING ({info.get('Reason')}) after "
                f"{resources.queue_timeout:g} s in the queue (queue_timeout): cancelled it"
            )
        if state != "PENDING" and started is None:
            started = now
        if limit is not None and started is not None and now - started > limit + RUNNING_GRACE:
            raise SlurmError(
                f"Slurm job {job_id} {state} {RUNNING_GRACE:g} s past its time limit "
                f"{resources.time}: cancelled it"
            )
        time.sleep(POLL_SECONDS)


def _pass_on(path: Path, offset: int) -> int:
    """Write what ``path`` gained since ``offset`` to stdout; the new offset."""
    with contextlib.suppress(OSError), open(path, "rb") as stream:
        stream.seek(offset)
        chunk = stream.read()
        sys.stdout.write(chunk.decode("utf-8", "replace"))
        sys.stdout.flush()
        return offset + len(chunk)
    return offset


def _cancel_leftover(run, log) -> None:
    """A job an earlier, killed study left running for this run is cancelled first,
    so two jobs never write into the same run folder."""
    marker = run.run_dir / "run.json"
    if not marker.is_file():
        return
    with contextlib.suppress(Exception):  # an unreadable record is the runner's to report
        record = read_json(marker, expect=dict)
        job_id = (record.get("slurm") or {}).get("job_id")
        if record.get("status") in ("submitted", "running") and job_id:
            info = job_info(str(job_id))
            if info and info.get("JobState") not in ENDED:
                slurm_command("scancel", str(job_id))
                log(f"    cancelled Slurm job {job_id}, left by an earlier study for this run")
