"""The ``chexlib`` command line.

Each subcommand lives in the module that does the work: the module exposes
``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported only
when their subcommand runs, so ``chexlib synth`` never pays for TensorFlow.

Errors a user can act on (the system's: a full disk, a permission denied, an
output path that is a file; chexlib's own error types; a ``ValueError`` that
chexlib's code raised about a value it was given; a worker process that died)
end every command the same way: one ``chexlib <command>: error: ...`` line on
stderr and exit status 2, no traceback. A Horovod collective that failed
because another rank died ends with one line and status 1. That is done once,
here: no command prints its own errors.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import os
import sys
from concurrent.futures import BrokenExecutor
from pathlib import Path

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("chexlib.synth.generate", "generate a dataset in the NIH ChestX-ray14 layout"),
    "validate": ("chexlib.data.metadata", "check every listed image exists and decodes"),
    "convert": ("chexlib.records.convert", "convert a dataset to sharded TFRecords"),
    "verify-records": ("chexlib.records.read", "read TFRecords back and check them"),
    "bench-pipeline": ("chexlib.bench.measure", "time an input pipeline alone (no model)"),
    "bench-records": (
        "chexlib.bench.records",
        "time TFRecord conversion per variant and worker count",
    ),
    "bench-report": (
        "chexlib.report.benchmarks",
        "print make bench-pipeline's ratios against their targets",
    ),
    "bench-loop": (
        "chexlib.bench.loop",
        "time chexlib train's loop against a plain Keras fit, or precision against precision",
    ),
    "data-service": (
        "chexlib.pipeline.dataservice",
        "run a tf.data service dispatcher and/or workers",
    ),
    "train": ("chexlib.train.recipe", "train CheXNet (run under horovodrun for N ranks)"),
    "explain": (
        "chexlib.explain.gradcam",
        "Grad-CAM heatmaps of a trained run, scored against boxes",
    ),
    "study": ("chexlib.study.runner", "run a papermill study specification"),
    "publish-results": (
        "chexlib.report.publish",
        "copy a study's figures and results into the README",
    ),
    "cluster": (
        "chexlib.cluster.cli",
        "up/status/down: a LOCAL EMULATION of a cluster (namespaces as nodes, ssh, Slurm)",
    ),
}


def _module_for(name: str):
    return importlib.import_module(COMMANDS[name][0])


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chexlib", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == only:  # import only the module of the command being run
            _module_for(name).add_arguments(p)
    return parser


EXIT_ERROR = 2  # as argparse exits on a bad command line
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a writer whose reader left
# What a user can do about the commonest system errors.
_HINTS = {
    errno.ENOSPC: "free some space and rerun",
    errno.EDQUOT: "free some space (disk quota) and rerun",
    errno.EFBIG: "the file size limit was reached; free space or raise the limit and rerun",
    errno.EACCES: "check the permissions of this path",
    errno.EPERM: "check the permissions of this path",
    errno.EROFS: "the file system is read-only; choose another output folder",
    errno.ENOTDIR: "a part of this path is a file, not a folder",
    errno.EISDIR: "this path is a folder, not a file",
}


def is_user_error(err: BaseException) -> bool:
    """True for system errors (``OSError``), chexlib's own error types, a
    ``ValueError`` raised by chexlib's own code, and a broken worker pool.

    chexlib's own are the exception classes defined in a ``chexlib`` module
    (``DataError``, ``SpecError``, ``PublishError``, ``RecordError``, ...),
    found by their module so a new one needs no entry here. A ``ValueError``
    raised inside a library chexlib calls (numpy, TensorFlow) is a bug and keeps
    its traceback.
    """
    if isinstance(err, OSError | BrokenExecutor):
        return True
    if isinstance(err, ValueError) and _raised_in_chexlib(err):
        return True
    return any(cls.__module__.split(".")[0] == "chexlib" for cls in type(err).__mro__)


def _raised_in_chexlib(err: BaseException) -> bool:
    """Whether the innermost frame of ``err``'s traceback is chexlib's code."""
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(_PACKAGE)


_PACKAGE = Path(__file__).resolve().parent.parent
# Errors of a library chexlib does not import here, by class name: (exit status, what it means).
_PEER_FAILURES = {
    "HorovodInternalError": (
        1,
        "a Horovod collective failed (another rank died or a link was lost?)",
    )
}
# In a TensorFlow op error's message: Horovod stopped because a peer failed (an op
# error, not HorovodInternalError, when the collective ran inside a Keras step).
_PEER_SHUTDOWN = "Horovod has been shut down"


def describe(err: BaseException) -> str:
    """One line: the path first, then what went wrong and, when known, what to do."""
    if isinstance(err, OSError) and err.strerror:
        paths = [str(p) for p in (err.filename, err.filename2) if p is not None]
        text = f"{' -> '.join(paths)}: {err.strerror}" if paths else err.strerror
        hint = _HINTS.get(err.errno)
        text = f"{text} ({hint})" if hint else text
    else:
        text = str(err) or type(err).__name__
    return " | ".join(line.strip() for line in text.splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # `chexlib ... | head`: the reader left; end quietly, as cat does
        with contextlib.suppress(OSError):  # Python's flush at exit would raise again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    only = next((a for a in argv if not a.startswith("-")), None)
    only = only if only in COMMANDS else None
    args = build_parser(only).parse_args(argv)
    try:
        return int(_module_for(args.command).run(args) or 0)
    except KeyboardInterrupt:
        print(f"chexlib {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        raise  # not the command's error: main ends quietly
    except Exception as err:
        if type(err).__name__ in _PEER_FAILURES or _PEER_SHUTDOWN in str(err):
            status, meaning = _PEER_FAILURES["HorovodInternalError"]
            run = f" in run {args.out}" if getattr(args, "out", None) else ""
            text = describe(err)
            text = _PEER_SHUTDOWN if _PEER_SHUTDOWN in text else text  # not the graph's traceback
            print(f"chexlib {args.command}: error{run}: {meaning}: {text}", file=sys.stderr)
            return status
        if not is_user_error(err):
            raise  # a bug: its traceback is what a report needs
        print(f"chexlib {args.command}: error: {describe(err)}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
