"""chexlib: fast CheXNet training on NIH ChestX-ray14, measured.

The package tree is its architecture: one subpackage per layer, each saying in
its docstring what it owns and which layers it may import, lower layers first:

- ``core``: flags from config dataclasses, durable JSON, run folders, the run
  record, published reference numbers (standard library, numpy, pandas);
- ``data``: NIH metadata, splits, validation, PNG decoding; ``synth``: the
  generated dataset;
- ``records``: TFRecord schema, conversion, reading and verifying;
- ``pipeline``: the tf.data input pipelines;
- ``train``: the Horovod training recipe and its parts;
- ``explain``: Grad-CAM; ``launch``: starting N ranks; ``bench``: benchmarks;
- ``report`` and ``study``: reports, figures, verdicts and the papermill
  study (never TensorFlow);
- ``walkthrough``: the notebooks' helpers; ``cli``: the command line.

``tests/test_layout.py`` holds the allowed directions. TensorFlow and Horovod
are imported by the modules that need them, so ``import chexlib`` and the data
tools stay fast.
"""

__version__ = "0.1.0"
