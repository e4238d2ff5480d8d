"""Foundations every layer may use: flags built from config dataclasses, durable
JSON files, the machine a number came from, run folders, the typed run record,
published reference numbers, and the names shared across layers.

Imports: the standard library, numpy and pandas only; never TensorFlow and no
other chexlib layer.
"""
