"""Executing the parameterized notebooks with papermill."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from chexlib.core.files import read_json

REPO = Path(__file__).resolve().parents[2]  # the checkout: chexlib/study/notebook.py
NOTEBOOK_DIR = REPO / "notebooks"
KERNEL = "chexlib"  # registered by tools/setup_env.sh (ipykernel install --sys-prefix)


# The parameter through which a notebook that launches ranks streams their output.
LOG_OUTPUT = "LOG_OUTPUT"


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
    log_output: bool = False,
) -> Path:
    """Execute a notebook with papermill into ``output`` and return its path.

    The executed copy keeps every cell's output, including the error of a
    failing cell (papermill raises ``PapermillExecutionError`` after saving).

    With ``log_output``, every cell's printed output is also written to this
    process's stdout and stderr as it comes, and a notebook that declares the
    parameter ``LOG_OUTPUT`` gets it True, so that Horovod jobs it launches pass
    their ranks' lines on as they come too (``[R] ...``, also kept in ``ranks.log``).
    """
    import papermill as pm

    source = Path(name) if Path(name).is_file() else notebook_path(str(name))
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    env_kernel = os.environ.get("CHEXLIB_KERNEL")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # kernels inherit it: quiet TF start-up
    # papermill's stdout_file/stderr_file get each output as it arrives, as plain text;
    # its log_output=True would route the same through the logging module instead.
    streams = (
        {"stdout_file": _Echo(sys.stdout), "stderr_file": _Echo(sys.stderr)} if log_output else {}
    )
    parameters = dict(parameters or {})
    if log_output and LOG_OUTPUT in declared_parameters(source):
        parameters.setdefault(LOG_OUTPUT, True)
    pm.execute_notebook(
        str(source),
        str(output),
        parameters=parameters,
        kernel_name=kernel or env_kernel or KERNEL,
        cwd=str(cwd or output.parent),
        progress_bar=progress,
        log_output=False,
        **streams,
    )
    return output


def declared_parameters(notebook: str | Path) -> set[str]:
    """Names assigned in the notebook's cell tagged ``parameters``."""
    cells = read_json(notebook, expect=dict).get("cells", [])
    tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    source = "".join("".join(c.get("source", [])) for c in tagged)
    return set(re.findall(r"^([A-Za-z_]\w*)\s*[:=]", source, re.M))


class _Echo:
    """A text stream that passes every write on to ``stream`` and flushes it at once."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        self.stream.write(text)
        self.stream.flush()
        return len(text)

    def flush(self) -> None:
        self.stream.flush()
