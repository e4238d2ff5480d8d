"""Running a papermill study specification: expanding its grid into runs,
executing each notebook, skipping finished runs.

Imports: ``chexlib.core``, ``chexlib.report``. Never TensorFlow.
"""
