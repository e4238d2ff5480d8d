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
    """A stand-in for the Keras notop weights file: same layers, random values (a
    backbone on three float channels, as Keras ships it: no grey input layer)."""
    rgb = tf.keras.Input((32, 32, 3))
    base = models._base(name, rgb, rgb, None)
    base.save_weights(str(path))
    return base


def _first_conv(model):
    return next(layer for layer in model.layers if isinstance(layer, tf.keras.layers.Conv2D))


@pytest.mark.parametrize("name, where", [("densenet121", "keras cache"), ("resnet50", "path")])
def test_imagenet_from_local_file(name, where, tmp_path, keras_home):
    tf.keras.utils.set_random_seed(1)
    reference = _notop_file(tmp_path / "notop.h5", name)
    expected = _first_conv(reference).get_weights()[0]
    if where == "path":
        weights = str(tmp_path / "notop.h5")
    else:  # where tf.keras.applications would have cached its download
        keras_home.mkdir(parents=True)
        (tmp_path / "notop.h5").rename(keras_home / models.IMAGENET_FILES[name][0])
        weights = "imagenet"
    loaded = models.build_model(name, image_size=64, weights=weights)
    np.testing.assert_array_equal(_first_conv(loaded).get_weights()[0], expected)


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


# --- the uint8 input contract ------------------------------------------------------


@pytest.mark.parametrize("name", ["densenet121", "resnet50"])
def test_the_models_first_layer_normalises_uint8_grey_as_keras_expects(name):
    """The model takes uint8 grey [S, S, 1] and its first layer gives exactly what
    tf.keras.applications' preprocess_input gives for the grey image in three channels."""
    net = models.build_model(name, image_size=32)
    assert net.input.dtype == tf.uint8 and tuple(net.input.shape) == (None, 32, 32, 1)
    gray = np.random.default_rng(5).integers(0, 256, (2, 32, 32, 1), dtype=np.uint8)
    first = tf.keras.Model(net.input, net.get_layer("gray_to_backbone").output)
    module = (
        tf.keras.applications.densenet if name == "densenet121" else tf.keras.applications.resnet50
    )
    theirs = module.preprocess_input(np.repeat(gray, 3, axis=-1).astype("float32"))
    np.testing.assert_allclose(first(gray).numpy(), theirs, rtol=1e-5, atol=1e-4)


def test_the_pipeline_hands_the_model_one_uint8_channel(synth_dir):
    """12x fewer bytes per batch than three float32 channels; the same pixels either way."""
    from chexlib.data.metadata import load_metadata

    meta = load_metadata(synth_dir)
    kw = dict(metadata=meta, batch_size=4, image_size=32, training=False, model="densenet121")
    gray, _ = next(iter(builders.build_dataset("raw", "val", **kw)))
    rgb, _ = next(iter(builders.build_dataset("raw", "val", normalize_in_pipeline=True, **kw)))
    assert gray.dtype == tf.uint8 and gray.shape == (4, 32, 32, 1)
    assert rgb.dtype == tf.float32 and rgb.shape == (4, 32, 32, 3)
    assert rgb.numpy().nbytes == 12 * gray.numpy().nbytes
    layer = models.build_model("tiny", image_size=32).get_layer("gray_to_backbone")
    np.testing.assert_allclose(layer(gray).numpy(), rgb.numpy(), atol=1e-6)


def test_a_checkpoint_from_before_the_grey_input_layer_loads(tmp_path):
    """A model that took the normalised three channels (the contract before) wrote this
    checkpoint; the grey-input model restores every weight from it (the layer has none)."""
    from chexlib.train.models import _base

    old_input = tf.keras.Input((32, 32, 3))
    base = _base("tiny", old_input, old_input, None)
    pooled = tf.keras.layers.GlobalAveragePooling2D(name="avg_pool")(base.output)
    head = tf.keras.layers.Dense(len(LABELS), activation="sigmoid", name=models.HEAD_NAME)
    old = tf.keras.Model(old_input, head(pooled))
    for v in old.weights:
        v.assign(tf.random.normal(v.shape, seed=1))
    tf.train.Checkpoint(model=old).write(str(tmp_path / "ckpt"))
    new = models.build_model("tiny", image_size=32)
    tf.train.Checkpoint(model=new).read(str(tmp_path / "ckpt")).assert_existing_objects_matched()
    assert len(new.weights) == len(old.weights)
    for a, b in zip(old.weights, new.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
