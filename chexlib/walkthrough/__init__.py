"""Helpers of the teaching walkthrough (the notebooks): pictures a student looks
at and facts the prose would otherwise type.

Imports: every layer but ``chexlib.cli``; TensorFlow only inside the functions
that read records, run a model or launch ranks.
"""
