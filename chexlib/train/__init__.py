"""Training: the Horovod recipe (``chexlib train``), its config, models, a rank's
process set-up and inputs, evaluation, callbacks, checkpoints and the files a
finished run writes.

Imports: ``chexlib.core``, ``chexlib.data``, ``chexlib.records``,
``chexlib.pipeline``, ``chexlib.report`` (TensorFlow-free summaries).
"""
