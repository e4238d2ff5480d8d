"""Reports, figures and verdicts from run records: a training run's report, the
study's summary, verdicts, the feeding projection, benchmark reports, colours,
and publishing into the README.

Imports: ``chexlib.core``, ``chexlib.data`` only. Never TensorFlow: the
summary runs where no TensorFlow is installed.
"""
