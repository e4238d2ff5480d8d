"""A study's run folders: each run's ``params.json`` / ``metrics.json`` (with the
machine they came from) and collecting them into one table."""

from __future__ import annotations

import warnings
from pathlib import Path

from chexlib.core.files import RecordError, json_safe, read_json, write_json
from chexlib.core.machine import environment_info


class RecordWarning(UserWarning):
    """A record was left out of a collection because it is unreadable; names the file."""


def table_records(table) -> list[dict]:
    """Rows of a pandas table as JSON-ready dicts (NaN becomes None; see :func:`json_safe`)."""
    return json_safe(table.to_dict(orient="records"))


def write_run_record(run_dir: str | Path, params, metrics: dict) -> None:
    """Write ``params.json`` and ``metrics.json`` (with environment) into ``run_dir``."""
    run_dir = Path(run_dir)
    write_json(run_dir / "params.json", params)
    metrics = {**metrics, "environment": metrics.get("environment") or environment_info()}
    write_json(run_dir / "metrics.json", metrics)


def _flatten(prefix: str, value, into: dict) -> None:
    """Scalars stay; dicts become ``prefix.key`` columns; lists are left out."""
    if isinstance(value, dict):
        for key, inner in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), inner, into)
    elif not isinstance(value, list):
        into[prefix] = value


def collect_runs(
    study_dir: str | Path, on_error: str = "warn", problems: list | None = None
) -> list[dict]:
    """Every complete run under ``study_dir/<stage>/<run_id>/`` as a nested record.

    Each record has ``stage``, ``run_id``, ``run_dir``, ``parameters`` (what
    papermill passed), and the run's own ``params`` and ``metrics`` JSON.

    Args:
        study_dir: the study's folder.
        on_error: what an unreadable ``run.json``, ``params.json`` or
            ``metrics.json`` does: ``"warn"`` leaves that run out with a
            :class:`RecordWarning` naming the file (a summary of the other runs
            is still worth having); ``"raise"`` raises the error
            (:class:`RecordError` or ``OSError``).
        problems: a list to add each run left out to instead of warning (with
            ``"warn"``): ``{"run_dir", "stage", "notebook", "problem"}``, also for
            a run marked complete whose ``metrics.json`` is missing (not warned).
    """
    if on_error not in ("warn", "raise"):
        raise ValueError(f"on_error must be 'warn' or 'raise', not {on_error!r}")
    records = []
    for marker in sorted(Path(study_dir).glob("*/*/run.json")):
        try:
            record = _run_record(marker)
        except (RecordError, OSError) as err:
            if on_error == "raise":
                raise
            if problems is None:
                warnings.warn(f"run left out: {err}", RecordWarning, stacklevel=2)
            else:
                problems.append(_problem(marker, str(err)))
            continue
        if record is not None:
            records.append(record)
        elif problems is not None and _complete_without_metrics(marker):
            problems.append(
                _problem(marker, "metrics.json is missing (the run is marked complete)")
            )
    return records


def _problem(marker: Path, problem: str) -> dict:
    """A run left out of a collection: its folder, stage, notebook (when known) and why."""
    try:
        notebook = read_json(marker, expect=dict).get("notebook")
    except (RecordError, OSError):
        notebook = None
    return {
        "run_dir": str(marker.parent),
        "stage": marker.parent.parent.name,
        "notebook": notebook if isinstance(notebook, str) else None,
        "problem": problem,
    }


def _complete_without_metrics(marker: Path) -> bool:
    run = read_json(marker, expect=dict)  # read a moment ago by _run_record
    return run.get("status") == "complete" and not (marker.parent / "metrics.json").exists()


def _run_record(marker: Path) -> dict | None:
    """The record of the run whose ``run.json`` is ``marker``; None if not complete."""
    run = read_json(marker, expect=dict)
    metrics_path = marker.parent / "metrics.json"
    if run.get("status") != "complete" or not metrics_path.is_file():
        return None
    params_path = marker.parent / "params.json"
    parameters = run.get("parameters", {})
    if not isinstance(parameters, dict):
        raise RecordError(f"{marker}: 'parameters' must be a JSON object")
    return {
        "stage": marker.parent.parent.name,
        "run_id": marker.parent.name,
        "run_dir": str(marker.parent),
        "parameters": parameters,
        "params": read_json(params_path, expect=dict) if params_path.is_file() else {},
        "metrics": read_json(metrics_path, expect=dict),
    }


def runs_table(records: list[dict]):
    """One tidy row per run: stage, run id, parameters and scalar metrics (dotted keys)."""
    import pandas as pd

    rows = []
    for rec in records:
        row = {"stage": rec["stage"], "run_id": rec["run_id"]}
        _flatten("", {k: v for k, v in rec["parameters"].items() if k != "OUTPUT_DIR"}, row)
        _flatten("", rec["metrics"], row)
        rows.append(row)
    return pd.DataFrame(rows)
