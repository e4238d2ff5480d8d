"""chexlib: fast CheXNet training on NIH ChestX-ray14, measured.

One module per idea, in layers: data (``data``, ``images``, ``synth*``),
records (``records*``), the input pipeline (``sources``, ``imageops``,
``spng``, ``pipeline``, ``dataservice``), training (``train`` and the modules
it names), launching (``launch*``, ``ranklog``, ``interactive``), measuring
(``bench*``), the study and its reports (``study``, ``results``, ``summary``,
``verdicts``, ``plots``, ...; no TensorFlow), Grad-CAM (``explain``), and the
command line (``cli``, ``flags``). The README's module table lists them all.

Heavy dependencies (TensorFlow, Horovod) are imported inside the modules that
need them, so ``import chexlib`` and the data tools stay fast.
"""

from chexlib.data import LABELS

__version__ = "0.1.0"
__all__ = ["LABELS", "__version__"]
