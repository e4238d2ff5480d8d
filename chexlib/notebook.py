"""Executing the parameterized notebooks with papermill."""

from __future__ import annotations

import os
from pathlib import Path

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
KERNEL = "chexlib"  # registered by tools/setup_env.sh (ipykernel install --sys-prefix)


def notebook_path(name: str) -> Path:
    """``"01_data_prep"`` -> the notebook file in ``notebooks/``."""
    path = NOTEBOOK_DIR / (name if name.endswith(".ipynb") else f"{name}.ipynb")
    if not path.is_file():
        raise FileNotFoundError(f"no notebook {path}")
    return path


def run_notebook(
    name: str | Path,
    output: str | Path,
    parameters: dict | None = None,
    cwd: str | Path | None = None,
    kernel: str | None = None,
    progress: bool = False,
) -> Path:
    """Execute a notebook with papermill into ``output`` and return its path.

    The executed copy keeps every cell's output, including the error of a
    failing cell (papermill raises ``PapermillExecutionError`` after saving).
    """
    import papermill as pm

    source = Path(name) if Path(name).is_file() else notebook_path(str(name))
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    env_kernel = os.environ.get("CHEXLIB_KERNEL")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # kernels inherit it: quiet TF start-up
    pm.execute_notebook(
        str(source),
        str(output),
        parameters=parameters or {},
        kernel_name=kernel or env_kernel or KERNEL,
        cwd=str(cwd or output.parent),
        progress_bar=progress,
        log_output=False,
    )
    return output
