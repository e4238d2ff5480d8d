"""The study on Slurm: ``chexlib study SPEC --executor slurm`` and tools/slurm/chexlib_train.sbatch.

Unit tests pin the parts that need no cluster: the spec's ``slurm:`` checks, the
batch script, ``scontrol show job`` parsing (real output of Slurm 22.05, captured
on the local cluster), the polling and how a job's end becomes the run's record.
The slow tests run on the local emulated cluster (``chexlib cluster``, brought up
here when none is): the tracked sbatch file trains across both nodes, and a
study's runs go through Slurm, one cancelled with ``scancel``, then resumed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import require

from chexlib.core.files import read_json
from chexlib.study import slurm, slurm_job
from chexlib.study.runner import Run, SpecError, expand, load_spec
from chexlib.study.slurm_spec import ALLOCATION_HOSTS, Resources, time_to_seconds

REPO = Path(__file__).resolve().parents[1]
SBATCH_FILE = REPO / "tools" / "slurm" / "chexlib_train.sbatch"
CHEXLIB = str(Path(sys.executable).parent / "chexlib")
PROBE = Path(__file__).parent / "notebooks" / "probe.ipynb"

# `scontrol show job 1` on the local cluster (Slurm 22.05.8): a 2-node job running,
# then the same job after `scancel 1`.
RUNNING = """JobId=1 JobName=wrap
   UserId=root(0) GroupId=root(0) MCS_label=N/A
   Priority=4294901759 Nice=0 Account=(null) QOS=(null)
   JobState=RUNNING Reason=None Dependency=(null)
   Requeue=1 Restarts=0 BatchFlag=1 Reboot=0 ExitCode=0:0
   RunTime=00:00:01 TimeLimit=UNLIMITED TimeMin=N/A
   SubmitTime=2026-12-07T02:26:21 EligibleTime=2026-12-07T02:26:21
   AccrueTime=2026-12-07T02:26:21
   StartTime=2026-12-07T02:26:22 EndTime=Unknown Deadline=N/A
   SuspendTime=None SecsPreSuspend=0 LastSchedEval=2026-12-07T02:26:22 Scheduler=Main
   Partition=debug AllocNode:Sid=localhost:28125
   ReqNodeList=(null) ExcNodeList=(null)
   NodeList=node[1-2]
   BatchHost=node1
   NumNodes=2 NumCPUs=2 NumTasks=2 CPUs/Task=1 ReqB:S:C:T=0:0:*:*
   TRES=cpu=2,node=2,billing=2
   Socks/Node=* NtasksPerN:B:S:C=1:0:*:* CoreSpec=*
   MinCPUsNode=1 MinMemoryNode=0 MinTmpDiskNode=0
   Features=(null) DelayBoot=00:00:00
   OverSubscribe=OK Contiguous=0 Licenses=(null) Network=(null)
   Command=(null)
   WorkDir=/tmp/slurmtry
   StdErr=/tmp/slurmtry/o-1.log
   StdIn=/dev/null
   StdOut=/tmp/slurmtry/o-1.log
   Power=
"""
CANCELLED = (
    RUNNING.replace("JobState=RUNNING", "JobState=CANCELLED")
    .replace("ExitCode=0:0", "ExitCode=0:15")
    .replace("EndTime=Unknown", "EndTime=2026-12-07T02:26:23")
)


# --- the spec's slurm: mapping --------------------------------------------------------------
def _write_spec(tmp_path: Path, stage_slurm=None, spec_slurm=None, **stage) -> Path:
    spec = {
        "name": "s",
        "stages": [
            {"name": "p", "notebook": str(PROBE), "grid": {"VALUE": [1, 2]}, **stage},
        ],
    }
    if stage_slurm is not None:
        spec["stages"][0]["slurm"] = stage_slurm
    if spec_slurm is not None:
        spec["slurm"] = spec_slurm
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_stage_resources_reach_each_run(tmp_path):
    path = _write_spec(
        tmp_path,
        stage_slurm={"nodes": "{VALUE}", "time": "0:10:00"},
        spec_slurm={"partition": "debug", "cores_per_rank": 2},
    )
    runs = expand(load_spec(path), tmp_path / "out")
    assert [r.slurm for r in runs] == [
        Resources(nodes=v, cores_per_rank=2, time="0:10:00", partition="debug") for v in (1, 2)
    ]
    # a stage timeout without a time limit: a minute more, rounded up to minutes
    path = _write_spec(tmp_path, timeout=90)
    assert expand(load_spec(path), tmp_path / "out")[0].slurm.time == "3"


@pytest.mark.parametrize(
    ("stage_slurm", "message"),
    [
        ({"nodes": 0}, r"stage 1 \(p\): slurm\.nodes must be a positive integer, not int \(0\)"),
        ({"nodes": "two"}, r"slurm\.nodes must be a positive integer, not str \('two'\)"),
        ({"ranks_per_node": True}, r"slurm\.ranks_per_node must be a positive integer"),
        ({"time": "ten minutes"}, r"slurm\.time must be a Slurm time limit"),
        ({"time": "0:00"}, r"slurm\.time must be a Slurm time limit"),
        ({"partition": "a/b"}, r"slurm\.partition must be a partition name"),
        ({"queue_timeout": -1}, r"slurm\.queue_timeout must be a positive number of seconds"),
        ({"gpus": 4}, r"slurm: unknown key\(s\) \['gpus'\]"),
        (["nodes", 2], r"slurm must be a mapping"),
    ],
)
def test_bad_slurm_fields_are_named(tmp_path, stage_slurm, message):
    with pytest.raises(SpecError, match=message):
        load_spec(_write_spec(tmp_path, stage_slurm=stage_slurm))


def test_a_placeholder_is_checked_once_filled(tmp_path):
    path = _write_spec(tmp_path, stage_slurm={"nodes": "{VALUE}x"})
    spec = load_spec(path)  # a placeholder: accepted as written
    with pytest.raises(SpecError, match=r"stage p: slurm\.nodes must be a positive integer.*'1x'"):
        expand(spec, tmp_path / "out")
    with pytest.raises(SpecError, match=r"s\.yaml: slurm\.nodes must be a positive integer"):
        load_spec(_write_spec(tmp_path, spec_slurm={"nodes": -2}))


def test_every_spec_in_papermill_runs_loads_and_cluster_yaml_asks_for_two_nodes(tmp_path):
    for path in sorted((REPO / "papermill_runs").glob("*.yaml")):
        expand(load_spec(path), tmp_path, hosts=ALLOCATION_HOSTS)
    runs = expand(load_spec(REPO / "papermill_runs" / "cluster.yaml"), tmp_path, ALLOCATION_HOSTS)
    nodes = {(r.stage, r.parameters.get("RANKS")): r.slurm.nodes for r in runs}
    assert nodes[("train", 2)] == 2
    assert nodes[("scaling", 1)] == 1 and nodes[("scaling", 2)] == 2
    assert all(r.slurm.ranks_per_node == 1 for r in runs)
    training = [r for r in runs if "RANKS" in r.parameters]
    assert all(r.parameters["HOSTS"] == ALLOCATION_HOSTS for r in training)


def test_time_limits_in_seconds():
    assert [time_to_seconds(t) for t in ("30", "5:30", "1:00:00", "2-0", "1-2:03", "0-0:0:9")] == [
        1800,
        330,
        3600,
        172800,
        93780,
        9,
    ]


# --- the batch script, the hosts -------------------------------------------------------
def _run(tmp_path, resources=None) -> Run:
    params = {"HOSTS": ALLOCATION_HOSTS, "VALUE": 1}
    return Run("s", "p", str(PROBE), params, tmp_path / "run", slurm=resources)


def test_job_script_asks_for_the_stage_resources_and_runs_the_job_side(tmp_path):
    resources = Resources(nodes=2, ranks_per_node=4, cores_per_rank=10, time="30", partition="gpu")
    run = _run(tmp_path, resources)
    script = slurm.job_script(run, resources, python="/venv/bin/python")
    options = re.findall(r"^#SBATCH (\S+)$", script, re.M)
    assert options == [
        "--job-name=chexlib-s-p",
        "--nodes=2",
        "--ntasks-per-node=4",
        "--cpus-per-task=10",
        "--time=30",
        "--partition=gpu",
        f"--output={run.run_dir}/slurm-%j.log",
        f"--chdir={run.run_dir}",
    ]
    assert script.rstrip().endswith(
        f"exec /venv/bin/python -m chexlib.study.slurm_job {run.run_dir}/job.json"
    )
    # what the job side rebuilds is the run
    described = json.loads(json.dumps(slurm.describe(run, html=False)))
    assert slurm_job.run_of(described) == Run(**{**run.__dict__, "slurm": None})
    assert described["ranks_per_node"] == 4


def test_hosts_from_the_allocation():
    assert slurm.allocation_hosts(["node1", "node2"], 1) == "node1:1,node2:1"
    assert slurm.allocation_hosts(["gpu7", "gpu8"], 4) == "gpu7:4,gpu8:4"
    assert slurm.allocation_hosts(["node1"], 2) == ""  # one node: ranks here, no ssh
    params = {"HOSTS": ALLOCATION_HOSTS, "ARGS": [f"-H {ALLOCATION_HOSTS}"], "N": 2}
    assert slurm.fill_hosts(params, "node1:1,node2:1") == {
        "HOSTS": "node1:1,node2:1",
        "ARGS": ["-H node1:1,node2:1"],
        "N": 2,
    }


# --- job states -----------------------------------------------------------------------------
def test_scontrol_output_is_parsed():
    info = slurm.parse_job(RUNNING)
    assert (info["JobState"], info["NodeList"], info["ExitCode"]) == ("RUNNING", "node[1-2]", "0:0")
    assert info["StdOut"] == "/tmp/slurmtry/o-1.log" and info["Reason"] == "None"
    assert slurm.parse_job(CANCELLED)["JobState"] == "CANCELLED"
    one_line = " ".join(RUNNING.split())  # scontrol -o
    assert slurm.parse_job(one_line) == info
    pending = (
        "JobId=9 JobName=x JobState=PENDING Reason=Resources Dependency=(null) NodeList=(null)"
    )
    assert slurm.parse_job(pending)["Reason"] == "Resources"
    assert slurm.hostnames("(null)") == []


def _states(monkeypatch, *texts):
    """``job_info`` answers with these ``scontrol`` outputs in turn (the last one again)."""
    answers = [slurm.parse_job(t) if t is not None else None for t in texts]
    calls = []

    def job_info(job_id):
        calls.append(job_id)
        return answers[min(len(calls), len(answers)) - 1]

    monkeypatch.setattr(slurm, "job_info", job_info)
    monkeypatch.setattr(slurm, "POLL_SECONDS", 0.01)
    return calls


def test_wait_returns_the_final_state(monkeypatch):
    pending = "JobId=1 JobState=PENDING Reason=Resources NodeList=(null)"
    calls = _states(monkeypatch, pending, RUNNING, RUNNING, CANCELLED)
    assert slurm.wait("1", Resources())["JobState"] == "CANCELLED"
    assert len(calls) == 4


def test_wait_gives_up_a_job_that_cannot_start(monkeypatch):
    _states(monkeypatch, "JobId=1 JobState=PENDING Reason=PartitionDown NodeList=(null)")
    with pytest.raises(slurm.SlurmError, match=r"still PENDING \(PartitionDown\) after 0.2 s"):
        slurm.wait("1", Resources(queue_timeout=0.2))


def test_wait_gives_up_a_job_past_its_time_limit(monkeypatch):
    _states(monkeypatch, RUNNING)
    monkeypatch.setattr(slurm, "RUNNING_GRACE", 0.2)
    started = time.monotonic()
    with pytest.raises(slurm.SlurmError, match=r"RUNNING 0.2 s past its time limit 0:0:1"):
        slurm.wait("1", Resources(time="0:0:1"))
    assert time.monotonic() - started < 5


def test_a_purged_job_is_unknown_not_complete(monkeypatch):
    _states(monkeypatch, RUNNING, None)
    assert slurm.wait("1", Resources())["JobState"] == "UNKNOWN"


def test_a_cancelled_job_fails_its_run_naming_state_nodes_and_log(tmp_path, monkeypatch):
    run = _run(tmp_path)
    run.run_dir.mkdir(parents=True)
    monkeypatch.setattr(slurm, "hostnames", lambda nodelist: ["node1", "node2"])
    monkeypatch.setattr(slurm, "submit", lambda run, html: "41")
    monkeypatch.setattr(slurm, "slurm_command", lambda *argv, **kw: "")
    _states(monkeypatch, RUNNING, CANCELLED)
    lines = []
    with pytest.raises(slurm.SlurmError) as caught:
        slurm.execute(run, log=lines.append)
    log_path = run.run_dir / "slurm-41.log"
    assert str(caught.value) == (
        f"Slurm job 41 CANCELLED on node1,node2 (exit_code 0:15); log: {log_path}"
    )
    assert lines == [f"    p/run: Slurm job 41, log {log_path}"]
    record = read_json(run.run_dir / "run.json")
    assert record["status"] == "failed" and record["error"] == str(caught.value)
    assert record["slurm"]["job_id"] == "41" and record["slurm"]["nodes"] == ["node1", "node2"]
    assert run.status() == "failed"  # a rerun runs it again


def test_a_refused_submission_fails_the_run(tmp_path, monkeypatch):
    run = _run(tmp_path, Resources(nodes=9))
    refused = (
        "sbatch: error: Batch job submission failed: Requested node configuration is not available"
    )

    def sbatch(*argv, **kw):
        raise slurm.SlurmError(f"sbatch --parsable {argv[-1]} failed: {refused}")

    monkeypatch.setattr(slurm, "slurm_command", sbatch)
    with pytest.raises(slurm.SlurmError, match="Requested node configuration"):
        slurm.execute(run, log=lambda line: None)
    record = read_json(run.run_dir / "run.json")
    assert record["status"] == "failed" and refused in record["error"]
    assert "#SBATCH --nodes=9" in (run.run_dir / "job.sbatch").read_text()


def test_a_completed_job_keeps_the_record_the_job_wrote(tmp_path, monkeypatch):
    run = _run(tmp_path)
    run.run_dir.mkdir(parents=True)
    monkeypatch.setattr(slurm, "hostnames", lambda nodelist: ["node1", "node2"])
    monkeypatch.setattr(slurm, "slurm_command", lambda *argv, **kw: "")

    def submit(run, html):  # the job side's record, as slurm_job writes it when done
        job = {"job_id": "7", "nodes": ["node1", "node2"], "hosts": "node1:1,node2:1"}
        record = {"stage": "p", "notebook": str(PROBE), "status": "complete", "slurm": job}

        def done(job_id):
            (run.run_dir / "run.json").write_text(
                json.dumps({**record, "parameters": slurm._plain(run.parameters)})
            )
            return slurm.parse_job(RUNNING.replace("RUNNING", "COMPLETED"))

        monkeypatch.setattr(slurm, "job_info", done)
        return "7"

    monkeypatch.setattr(slurm, "submit", submit)
    slurm.execute(run, log=lambda line: None)
    record = read_json(run.run_dir / "run.json")
    assert record["status"] == "complete"
    assert record["slurm"]["state"] == "COMPLETED" and record["slurm"]["hosts"] == "node1:1,node2:1"
    assert run.status() == "complete"


def test_the_tracked_sbatch_file_and_the_readme():
    text = SBATCH_FILE.read_text()
    assert subprocess.run(["bash", "-n", str(SBATCH_FILE)], check=False).returncode == 0
    assert re.findall(r"^#SBATCH --(nodes|ntasks-per-node|cpus-per-task|time)=", text, re.M) == [
        "nodes",
        "ntasks-per-node",
        "cpus-per-task",
        "time",
    ]
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST"' in text
    readme = (REPO / "README.md").read_text()
    assert "tools/slurm/chexlib_train.sbatch" in readme
    assert not re.search(r"^#SBATCH", readme, re.M)  # the template lives in the tracked file only


# --- on the local cluster ------------------------------------------------------------------
def _status() -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHEXLIB, "cluster", "status"], capture_output=True, text=True, timeout=60, check=False
    )


@pytest.fixture(scope="module")
def cluster():
    """The local 2-node cluster: the one up, else brought up here (and down after)."""
    require(os.geteuid() == 0, "the local cluster needs root (namespaces, slurmd)")
    require((REPO / "chexlib" / "cluster").is_dir(), "chexlib cluster is not in this checkout")
    status, brought_up = _status(), False
    if "no cluster is up" in status.stdout:
        make = ["make", "-C", str(REPO), "cluster"]
        done = subprocess.run(make, capture_output=True, text=True, timeout=600, check=False)
        require(
            done.returncode == 0, f"make cluster failed: {done.stdout[-800:]}{done.stderr[-800:]}"
        )
        status, brought_up = _status(), True
    nodes = re.findall(r"^  (node\d+): ", status.stdout, re.M)
    require(
        status.returncode == 0 and len(nodes) >= 2,
        f"the local cluster is not healthy with 2 nodes: {status.stdout[-600:]}",
    )
    yield nodes
    if brought_up:
        subprocess.run([CHEXLIB, "cluster", "down"], timeout=120, check=False)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    from chexlib.synth.generate import generate

    out = tmp_path_factory.mktemp("slurm") / "data"
    generate(out, n_images=60, size=64, seed=3, workers=2, progress=False)
    return out


@pytest.mark.slow
def test_tracked_sbatch_file_trains_across_two_nodes(cluster, small_data, tmp_path):
    out = tmp_path / "train"
    args = ["--data", str(small_data), "--model", "tiny", "--image-size", "32", "--batch-size"]
    args += ["4", "--epochs", "1", "--steps-per-epoch", "3", "--warmup-epochs", "0"]
    args += ["--no-evaluate", "--out", str(out)]
    done = subprocess.run(
        ["sbatch", "--wait", "--nodes=2", "--time=5", f"--output={tmp_path}/slurm-%j.log"]
        + [str(SBATCH_FILE), "train", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    logs = list(tmp_path.glob("slurm-*.log"))
    text = logs[0].read_text() if logs else "(no log)"
    assert done.returncode == 0, f"{done.stdout}{done.stderr}\n{text[-3000:]}"
    assert re.search(r"job \d+: 2 rank\(s\) on node\d:1,node\d:1", text), (
        f"{done.stdout}{text[:500]}"
    )
    metrics = read_json(out / "metrics.json")
    assert metrics["ranks"] == 2


def _study(spec: Path, outputs: Path, *extra: str, **kw) -> subprocess.Popen:
    argv = [CHEXLIB, "study", str(spec), "--outputs", str(outputs), "--executor", "slurm"]
    return subprocess.Popen(
        [*argv, "--no-html", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


@pytest.mark.slow
def test_study_on_slurm_survives_scancel_and_a_lost_node_and_resumes(cluster, small_data, tmp_path):
    """Two faults in one study on the real cluster. Run 1 (one node) is cancelled with
    scancel mid-training; run 2 (two nodes) loses node2 mid-training (`chexlib cluster
    crash`: its slurmd, sshd and rank killed); each fails naming its Slurm state and log,
    the lost one naming the node. The study goes on: run 3 completes on the node left.
    `chexlib cluster up` brings node2 back and the rerun resumes both killed runs, the
    second across both nodes again, with its job id and nodes in run.json."""
    train = {"DATA_DIR": str(small_data), "MODEL": "tiny", "IMAGE_SIZE": 32, "BATCH_SIZE": 4}
    train.update(WARMUP_EPOCHS=0, TIMING_WARMUP_STEPS=1, TIMING_WINDOW_STEPS=1, EVALUATE=False)
    train.update(SYNTHETIC_STEPS=0, STEPS_PER_EPOCH=6, HOSTS="{hosts}")
    spec = {
        "name": "slurmy",
        "timeout": 400,
        "slurm": {"queue_timeout": 300},
        "stages": [
            {
                "name": "train",
                "notebook": "04_distributed_training",
                "parameters": train,
                "slurm": {"nodes": "{RANKS}"},
                "cases": [
                    {"RANKS": 1, "EPOCHS": 40, "_label": "cancelled"},
                    {"RANKS": 2, "EPOCHS": 12, "_label": "node-lost"},
                    {"RANKS": 1, "EPOCHS": 1, "_label": "goes-on"},
                ],
            }
        ],
    }
    path = tmp_path / "slurmy.yaml"
    path.write_text(yaml.safe_dump(spec))
    outputs = tmp_path / "out"
    cancelled, lost, goes_on = expand(load_spec(path), outputs, hosts=ALLOCATION_HOSTS)
    lost_node = cluster[1]
    proc = _study(path, outputs)
    try:
        job_id = _after_first_checkpoint(cancelled.run_dir, deadline=240)
        subprocess.run([shutil.which("scancel"), job_id], timeout=60, check=True)
        lost_job = _after_first_checkpoint(lost.run_dir, deadline=240)
        crashed = subprocess.run(
            [CHEXLIB, "cluster", "crash", lost_node], capture_output=True, text=True, timeout=60
        )
        assert crashed.returncode == 0, crashed.stdout + crashed.stderr
        output, _ = proc.communicate(timeout=400)
    finally:
        proc.kill()
        up = subprocess.run([CHEXLIB, "cluster", "up"], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 1, output
    assert "2 failed" in output and f"failed: train/{cancelled.run_id}" in output, output
    log_path = cancelled.run_dir / f"slurm-{job_id}.log"
    assert f"Slurm job {job_id} CANCELLED on node" in output and f"log: {log_path}" in output
    assert log_path.is_file()
    assert f"Slurm job {lost_job} FAILED on {','.join(cluster[:2])}" in output, output
    assert f"lost node(s) {lost_node}" in output, output
    assert f"log: {lost.run_dir / f'slurm-{lost_job}.log'}" in output
    assert read_json(goes_on.run_dir / "run.json")["status"] == "complete", output
    assert "restarted its dead daemons" in up.stdout and up.returncode == 0, up.stdout + up.stderr

    rerun = _study(path, outputs)
    output, _ = rerun.communicate(timeout=400)
    assert rerun.returncode == 0, output
    assert "2 ran, 1 skipped, 0 failed" in output
    for run in (cancelled, lost):
        metrics = read_json(run.run_dir / "metrics.json")
        assert metrics["resumed_from_epoch"] >= 1, (run.run_id, metrics.get("resumed_from_epoch"))
    record = read_json(lost.run_dir / "run.json")
    assert record["status"] == "complete", output
    assert record["slurm"]["job_id"].isdigit() and record["slurm"]["job_id"] != lost_job
    assert sorted(record["slurm"]["nodes"]) == sorted(cluster[:2])
    assert record["slurm"]["hosts"] == ",".join(f"{n}:1" for n in record["slurm"]["nodes"])
    assert (lost.run_dir / f"slurm-{record['slurm']['job_id']}.log").is_file()
    assert read_json(lost.run_dir / "metrics.json")["ranks"] == 2


def _after_first_checkpoint(run_dir: Path, deadline: float) -> str:
    """Wait for the run's job and its first checkpoint; the job id."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        marker = run_dir / "run.json"
        job_id = None
        if marker.is_file():
            job_id = (json.loads(marker.read_text() or "{}").get("slurm") or {}).get("job_id")
        if job_id and (run_dir / "run" / "checkpoints" / "latest.json").is_file():
            return job_id
        time.sleep(0.5)
    pytest.fail(f"no checkpoint in {run_dir}/run within {deadline} s")
