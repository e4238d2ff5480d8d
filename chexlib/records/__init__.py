"""TFRecords: the schema and framing, planning and writing shards
(``chexlib convert``), reading and verifying them (``chexlib verify-records``).

Imports: ``chexlib.core``, ``chexlib.data``.
"""
