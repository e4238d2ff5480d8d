"""chexlib.train.models: the CheXNet head, weights from local files only, matching preprocessing."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from chexlib.data.metadata import LABELS
from chexlib.pipeline import builders
from chexlib.train import models


@pytest.fixture
def keras_home(tmp_path, monkeypatch):
    """An empty Keras cache, so no test sees (or fills) the user's ~/.keras."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    return tmp_path / "keras" / "models"


@pytest.mark.parametrize("name", ["densenet121", "resnet50", "tiny"])
def test_head_is_14_sigmoids(name):
    net = models.build_model(name, image_size=32)
    assert net.output_shape == (None, len(LABELS))
    head = net.get_layer(models.HEAD_NAME)
    assert head.activation is tf.keras.activations.sigmoid
    assert isinstance(net.layers[-2], tf.keras.layers.GlobalAveragePooling2D)
    out = net(np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype("float32")).numpy()
    assert out.shape == (2, 14) and np.all((out > 0) & (out < 1))


def test_head_stays_float32_under_mixed_precision():
    tf.keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        net = models.build_model("tiny", image_size=32)
        assert net.get_layer("tiny_conv0").compute_dtype == "float16"
        assert net.get_layer(models.HEAD_NAME).compute_dtype == "float32"
        assert net.output.dtype == tf.float32
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")


def test_unknown_model():
    with pytest.raises(ValueError, match="unknown model"):
        models.build_model("vgg16")


def test_imagenet_without_file_says_how_to_get_it(keras_home):
    with pytest.raises(models.WeightsError) as err:
        models.build_model("densenet121", image_size=32, weights="imagenet")
    message = str(err.value)
    assert "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5" in message
    assert "https://storage.googleapis.com/tensorflow/keras-applications/densenet/" in message
    assert str(keras_home) in message and "--weights none" in message


def test_missing_weights_file(tmp_path):
    with pytest.raises(models.WeightsError, match="not found"):
        models.build_model("resnet50", image_size=32, weights=str(tmp_path / "nope.h5"))
    with pytest.raises(models.WeightsError, match="expected none, imagenet"):
        models.weights_kind(str(tmp_path))


def _notop_file(path, name):
    """A stand-in for the Keras notop weights file: same layers, random values."""
    base = models._base(name, 32, None)
    base.save_weights(str(path))
    return base


@pytest.mark.parametrize("name, where", [("densenet121", "keras cache"), ("resnet50", "path")])
def test_imagenet_from_local_file(name, where, tmp_path, keras_home):
    tf.keras.utils.set_random_seed(1)
    reference = _notop_file(tmp_path / "notop.h5", name)
    expected = reference.layers[2].get_weights()[0]  # the first convolution
    if where == "path":
        weights = str(tmp_path / "notop.h5")
    else:  # where tf.keras.applications would have cached its download
        keras_home.mkdir(parents=True)
        (tmp_path / "notop.h5").rename(keras_home / models.IMAGENET_FILES[name][0])
        weights = "imagenet"
    loaded = models.build_model(name, image_size=64, weights=weights)
    np.testing.assert_array_equal(loaded.layers[2].get_weights()[0], expected)


def test_full_model_h5_round_trip(tmp_path):
    tf.keras.utils.set_random_seed(2)
    net = models.build_model("tiny", image_size=32)
    net.save_weights(str(tmp_path / "model.h5"))
    assert models.weights_kind(str(tmp_path / "model.h5"))[0] == "full_h5"
    again = models.build_model("tiny", image_size=32, weights=str(tmp_path / "model.h5"))
    for a, b in zip(net.get_weights(), again.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_tiny_has_no_imagenet_weights():
    with pytest.raises(models.WeightsError, match="tiny"):
        models.build_model("tiny", image_size=32, weights="imagenet")


@pytest.mark.parametrize("name", ["densenet121", "resnet50"])
def test_pipeline_normalisation_matches_keras_preprocess_input(name):
    """The pipeline normalises a grey image exactly as the backbone's ImageNet weights expect."""
    gray = np.random.default_rng(3).integers(0, 256, (16, 16, 1), dtype=np.uint8)
    ours = builders.normalize(tf.constant(gray), models.PIPELINE_MODEL[name]).numpy()
    rgb = np.repeat(gray, 3, axis=-1).astype("float32")
    module = (
        tf.keras.applications.densenet if name == "densenet121" else tf.keras.applications.resnet50
    )
    np.testing.assert_allclose(ours, module.preprocess_input(rgb), rtol=1e-5, atol=1e-4)
