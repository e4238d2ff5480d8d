"""The ``chexlib`` command line: one subcommand per runnable thing.

Imports: every layer, each only when its subcommand runs.
"""
