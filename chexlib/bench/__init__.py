"""Benchmarks of the input pipeline and of TFRecord conversion: timed windows,
peers, paired rounds, the profiling notebook's sweeps.

Imports: ``chexlib.core``, ``chexlib.data``, ``chexlib.synth``,
``chexlib.records``, ``chexlib.pipeline``, ``chexlib.report``.
"""
