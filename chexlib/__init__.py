"""chexlib: fast CheXNet training on NIH ChestX-ray14, measured.

One module per idea: ``data`` (metadata, splits, validation), ``synth``
(a generated dataset in the NIH layout), ``images`` (decoding to one channel),
``records`` (TFRecords), ``pipeline`` (tf.data builders), ``bench``
(measurement), ``models``, ``train`` (Horovod), ``launch``, ``study``
(papermill sweeps), ``results`` (run records, tables, figures), ``cli``.

Heavy dependencies (TensorFlow, Horovod) are imported inside the modules that
need them, so ``import chexlib`` and the data tools stay fast.
"""

from chexlib.data import LABELS

__version__ = "0.1.0"
__all__ = ["LABELS", "__version__"]
