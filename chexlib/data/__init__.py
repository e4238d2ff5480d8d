"""The dataset: NIH ChestX-ray14's metadata, patient-wise splits, validation, and
decoding a PNG to one 8-bit channel.

Imports: ``chexlib.core``. No TensorFlow.
"""
