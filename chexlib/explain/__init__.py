"""Grad-CAM heatmaps of a trained run, scored against the NIH boxes
(``chexlib explain``).

Imports: ``chexlib.core``, ``chexlib.data``, ``chexlib.pipeline``,
``chexlib.train``, ``chexlib.report``.
"""
