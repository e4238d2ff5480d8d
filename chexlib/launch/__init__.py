"""Starting N ranks of training: ``horovod.run``, ``horovodrun`` and ipyparallel
engines, with the ranks' logs, stacks and watchdogs.

Imports: ``chexlib.core``, ``chexlib.data``, ``chexlib.train`` (inside the
functions that run on a rank), ``chexlib.report``.
"""
