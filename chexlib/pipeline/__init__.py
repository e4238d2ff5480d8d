"""The input pipeline: which files or shards a worker reads, decoding and resizing,
the naive and optimized tf.data builders, and the tf.data service.

Imports: ``chexlib.core``, ``chexlib.data``, ``chexlib.records``.
"""
