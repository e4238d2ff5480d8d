"""Names shared by every layer: where images come from, which pipeline reads them, which model.

The flags, configs, tables and figure legends all use these spellings.
"""

SOURCES = ("raw", "records")  # PNG files, or TFRecord shards from `chexlib convert`
PIPELINES = ("naive", "optimized")  # a plain tf.data loop, or the official-models recipe
MODELS = ("densenet121", "resnet50", "tiny", "standin")  # see chexlib.train.models
