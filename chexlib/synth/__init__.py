"""A generated dataset in the NIH ChestX-ray14 layout, with findings planted in the
pixels so that training can be shown to learn them.

Imports: ``chexlib.core``, ``chexlib.data``. No TensorFlow.
"""
