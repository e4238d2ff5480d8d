"""Shared fixtures: one small generated dataset for the whole suite."""

from __future__ import annotations

import os

import pytest

# Quiet TensorFlow's C++ start-up logging in test output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """A generated ChestX-ray14-format dataset: 120 images of 128x128."""
    from chexlib.synth.generate import generate

    out = tmp_path_factory.mktemp("synth") / "data"
    generate(out, n_images=120, size=128, seed=7, workers=2, progress=False)
    return out


@pytest.fixture(scope="session")
def synth_metadata(synth_dir):
    from chexlib.data.metadata import load_metadata

    return load_metadata(synth_dir)
