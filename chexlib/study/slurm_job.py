"""Inside a Slurm allocation: one run of a study, executed as the local executor does.

``job.sbatch`` (written by :mod:`chexlib.study.slurm`) ends in
``python -m chexlib.study.slurm_job RUN_DIR/job.json``. This rebuilds the run,
makes Horovod's hosts from the allocation (``scontrol show hostnames
"$SLURM_JOB_NODELIST"`` -> ``node1:R,node2:R``, R the stage's ranks per node),
puts them where the spec wrote ``{hosts}``, and calls
:func:`chexlib.study.runner.execute`: the same papermill execution, ``run.json``
and resume of killed training as without Slurm. The cell output (and every
rank's lines) goes to stdout, which is the job's log.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from chexlib.core.files import read_json
from chexlib.study.runner import Run, execute
from chexlib.study.slurm import allocation_hosts, fill_hosts, hostnames


def run_of(described: dict) -> Run:
    """The :class:`Run` that ``job.json`` describes."""
    return Run(
        described["study"],
        described["stage"],
        described["notebook"],
        described["parameters"],
        Path(described["run_dir"]),
        described["html_name"],
        collects=described["collects"],
        timeout=described["timeout"],
        study_dir=Path(described["study_dir"]) if described["study_dir"] else None,
    )


def main(argv: list[str] | None = None) -> int:
    """Execute the run ``argv[0]`` (a ``job.json``) describes; 0 when it completed."""
    argv = sys.argv[1:] if argv is None else argv
    described = read_json(Path(argv[0]), expect=dict)
    run = run_of(described)
    job_id = os.environ.get("SLURM_JOB_ID", "")
    nodes = hostnames(os.environ.get("SLURM_JOB_NODELIST", ""))
    hosts = allocation_hosts(nodes, int(described.get("ranks_per_node", 1)))
    log_path = run.run_dir / f"slurm-{job_id}.log"
    job = {"job_id": job_id, "nodes": nodes, "hosts": hosts, "log": str(log_path)}
    print(
        f"chexlib study {run.study}: {run.stage}/{run.run_id} in Slurm job {job_id} on "
        f"{','.join(nodes)}; Horovod hosts: {hosts or '(this node)'}",
        flush=True,
    )
    try:
        execute(
            run,
            html=described.get("html", True),
            log_output=True,  # into the job's log, as it comes
            extra={"slurm": job},
            parameters=fill_hosts(run.parameters, hosts),
        )
    except Exception as err:  # run.json holds it; the job's state says FAILED
        print(f"chexlib study: {run.stage}/{run.run_id} failed: {err}", file=sys.stderr)
        return 1
    print(f"chexlib study: {run.stage}/{run.run_id} complete", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
