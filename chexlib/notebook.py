"""Executing the parameterized notebooks with papermill."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
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
    log_output: bool = False,
) -> Path:
    """Execute a notebook with papermill into ``output`` and return its path.

    The executed copy keeps every cell's output, including the error of a
    failing cell (papermill raises ``PapermillExecutionError`` after saving).

    With ``log_output``, every cell's printed output is also written to this
    process's stdout and stderr as it comes, and the kernel starts with
    ``CHEXLIB_LOG_OUTPUT=1`` so that Horovod jobs it launches pass their ranks'
    lines on as they come too (``[R] ...``, also kept in ``ranks.log``).
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
    with _streaming_kernels() if log_output else contextlib.nullcontext():
        pm.execute_notebook(
            str(source),
            str(output),
            parameters=parameters or {},
            kernel_name=kernel or env_kernel or KERNEL,
            cwd=str(cwd or output.parent),
            progress_bar=progress,
            log_output=False,
            **streams,
        )
    return output


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


_ENV_LOCK = threading.Lock()
_ENV_USERS = [0, None]  # runs streaming now, and the variable's value before the first


@contextlib.contextmanager
def _streaming_kernels():
    """While open, kernels started by this process inherit ``CHEXLIB_LOG_OUTPUT=1``.

    Counted, so runs of one study executed at the same time (``--jobs``) can
    share it; the variable's previous value comes back when the last one ends.
    """
    from chexlib.launch import LOG_OUTPUT_ENV

    with _ENV_LOCK:
        if _ENV_USERS[0] == 0:
            _ENV_USERS[1] = os.environ.get(LOG_OUTPUT_ENV)
            os.environ[LOG_OUTPUT_ENV] = "1"
        _ENV_USERS[0] += 1
    try:
        yield
    finally:
        with _ENV_LOCK:
            _ENV_USERS[0] -= 1
            if _ENV_USERS[0] == 0:
                if _ENV_USERS[1] is None:
                    os.environ.pop(LOG_OUTPUT_ENV, None)
                else:
                    os.environ[LOG_OUTPUT_ENV] = _ENV_USERS[1]
