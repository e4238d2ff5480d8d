"""Benchmarks of the input pipeline and of TFRecord conversion: timed windows,
peers, paired rounds, the profiling notebook's sweeps; the training loop against
a plain Keras fit.

Imports: ``chexlib.core``, ``chexlib.data``, ``chexlib.synth``,
``chexlib.records``, ``chexlib.pipeline``, ``chexlib.train`` (the model and the
throughput clock, for the loop benchmark), ``chexlib.report``.
"""
