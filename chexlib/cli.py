"""The ``chexlib`` command line.

Each subcommand lives in the module that does the work: the module exposes
``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported only
when their subcommand runs, so ``chexlib synth`` never pays for TensorFlow.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("chexlib.synth", "generate a dataset in the NIH ChestX-ray14 layout"),
    "validate": ("chexlib.data", "check every listed image exists and decodes"),
    "convert": ("chexlib.records", "convert a dataset to sharded TFRecords"),
    "verify-records": ("chexlib.records", "read TFRecords back and check them"),
    "bench-pipeline": ("chexlib.bench", "time an input pipeline alone (no model)"),
    "data-service": ("chexlib.dataservice", "run a tf.data service dispatcher and/or workers"),
    "train": ("chexlib.train", "train CheXNet (run under horovodrun for N ranks)"),
    "study": ("chexlib.study", "run a papermill study specification"),
    "publish-results": ("chexlib.publish", "copy a study's figures and results into the README"),
}


def _module_for(name: str):
    return importlib.import_module(COMMANDS[name][0])


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chexlib", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == only:  # import only the module of the command being run
            module = _module_for(name)
            add = getattr(module, f"add_{name.replace('-', '_')}_arguments", None)
            (add or module.add_arguments)(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    only = next((a for a in argv if not a.startswith("-")), None)
    only = only if only in COMMANDS else None
    args = build_parser(only).parse_args(argv)
    module = _module_for(args.command)
    suffix = args.command.replace("-", "_")
    # Paired names (add_X_arguments/run_X) for modules with several commands, else add_arguments/run.
    paired = hasattr(module, f"add_{suffix}_arguments")
    run = getattr(module, f"run_{suffix}") if paired else module.run
    return int(run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
