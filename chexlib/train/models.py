"""CheXNet models: an ImageNet backbone, global average pooling, 14 sigmoid outputs.

``densenet121`` is CheXNet's network (Rajpurkar et al. 2017) and the poster's;
``resnet50`` is the poster's second model. ``tiny`` is a small CNN for tests
and teaching only: it trains in seconds on a CPU, so end-to-end checks (AUROC
on planted signals, resume, Horovod ranks) stay fast. It is not a CheXNet.

``standin`` is the same small CNN in another role: a **stand-in for a fast
accelerator**. The poster's question (is the GPU starved by its input?) is
about the ratio of the model's cost per image to the input's cost per image.
On a CPU, DenseNet121 costs far more per image than decoding a PNG, so every
run is compute-bound and the pipelines tie. The stand-in costs about a
millisecond per image at 128 px, less than the raw-PNG decode (about 10 ms per
image per core), which puts a CPU run in the poster's regime for real: the
input pipeline decides the speed. The study prints both costs side by side.

Weights never come from the network at run time. ``imagenet`` loads the
Keras "notop" ``.h5`` file from a path the user gives, or from the Keras
cache (``~/.keras/models``) where ``tf.keras.applications`` would have put
it; otherwise :class:`WeightsError` says how to get the file.
"""

from __future__ import annotations

import os
from pathlib import Path

from chexlib.core.names import MODELS
from chexlib.data.metadata import LABELS
from chexlib.train.checkpoints import read_checkpoint_record

# What each model is, for tables and figures.
MODEL_LABELS = {
    "densenet121": "DenseNet121",
    "resnet50": "ResNet50",
    "tiny": "tiny (test CNN)",
    "standin": "stand-in for a fast accelerator",
}
HEAD_NAME = "chexnet_predictions"  # the Dense(14) layer; also marks a full-model .h5

# The Keras applications' notop weight files: name in the Keras cache, and where
# tf.keras.applications downloads them from (printed, never fetched, by chexlib).
_KERAS_BASE = "https://storage.googleapis.com/tensorflow/keras-applications"
IMAGENET_FILES = {
    "densenet121": (
        "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
        f"{_KERAS_BASE}/densenet/densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
    ),
    "resnet50": (
        "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        f"{_KERAS_BASE}/resnet/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
    ),
}

# The ImageNet normalisation each model expects, by the name the pipeline knows
# (chexlib.pipeline.builders.normalization_for): the tiny model uses DenseNet's.
PIPELINE_MODEL = {
    "densenet121": "densenet121",
    "resnet50": "resnet50",
    "tiny": "densenet121",
    "standin": "densenet121",
}


class WeightsError(ValueError):
    """Weights were asked for that are not available locally; the message says how to get them."""


def keras_cache_dir() -> Path:
    """Where ``tf.keras.applications`` keeps downloaded weights (``$KERAS_HOME/models``)."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(home) / "models"


def imagenet_weights_path(model: str, path: str | Path | None = None) -> Path:
    """Return the local ImageNet notop ``.h5`` file for ``model``.

    Args:
        model: ``densenet121`` or ``resnet50``.
        path: an explicit file; when None, the standard file name in the Keras cache.

    Raises:
        WeightsError: the file is missing; the message gives the URL and where to put it.
    """
    if model not in IMAGENET_FILES:
        raise WeightsError(
            f"model {model!r} has no ImageNet weights (choose from {list(IMAGENET_FILES)})"
        )
    name, url = IMAGENET_FILES[model]
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise WeightsError(f"ImageNet weights file not found: {path}")
        return path
    cached = keras_cache_dir() / name
    if cached.is_file():
        return cached
    raise WeightsError(
        f"ImageNet weights for {model} are not available offline: {cached} does not exist.\n"
        f"chexlib never downloads at run time. On a machine with internet access run\n"
        f"  curl -L -o {name} {url}\n"
        f"then copy the file to {cached} (or anywhere, and pass --weights /path/to/{name}),\n"
        f"or train from scratch with --weights none."
    )


def is_checkpoint(path: str | Path) -> bool:
    """True for a chexlib training checkpoint: a run folder, its checkpoint folder or a prefix."""
    path = Path(path)
    return (
        (path / "checkpoints" / "latest.json").is_file()
        or (path / "latest.json").is_file()
        or Path(f"{path}.index").is_file()
    )


def _base(model: str, inputs, x, weights_file: Path | None):
    """The backbone built on ``x`` (computed from the model's ``inputs``), as one model."""
    import tensorflow as tf

    weights = str(weights_file) if weights_file else None
    if model == "densenet121":
        return tf.keras.applications.DenseNet121(include_top=False, weights=weights, input_tensor=x)
    if model == "resnet50":
        return tf.keras.applications.ResNet50(include_top=False, weights=weights, input_tensor=x)
    return _tiny_base(inputs, x, name=model)


def _tiny_base(inputs, x, name: str = "tiny"):
    """Four strided conv blocks (16..128 filters): a test/teaching model, not CheXNet
    (also the fast-accelerator stand-in, ``standin``)."""
    import tensorflow as tf

    layers = tf.keras.layers
    for i, filters in enumerate((16, 32, 64, 128)):
        x = layers.Conv2D(
            filters, 3, strides=2, padding="same", use_bias=False, name=f"tiny_conv{i}"
        )(x)
        # momentum 0.9: the moving statistics settle within a few dozen steps of a short test run
        x = layers.BatchNormalization(momentum=0.9, name=f"tiny_bn{i}")(x)
        x = layers.ReLU(name=f"tiny_relu{i}")(x)
    return tf.keras.Model(inputs, x, name=name)


def build_model(
    model: str = "densenet121",
    image_size: int = 224,
    weights: str | Path | None = None,
    num_classes: int = len(LABELS),
):
    """Build CheXNet: the grey input layer, backbone, global average pooling,
    ``Dense(14, sigmoid)``.

    The model takes ``uint8 [B, S, S, 1]`` grey images (the input pipeline's
    output) and normalises them itself (:mod:`chexlib.train.gray_input`). Under a
    mixed-precision policy the head's output stays float32, so the sigmoid and
    the loss are computed in full precision.

    Args:
        model: ``densenet121``, ``resnet50``, ``tiny`` (test/teaching model) or
            ``standin`` (the same small CNN as a fast-accelerator stand-in).
        image_size: square input size in pixels.
        weights: ``None``/``"none"`` (random init), ``"imagenet"`` (the notop
            file in the Keras cache), a path to a notop ``.h5`` file (ImageNet
            weights for the backbone), a full-model ``.h5`` saved by chexlib, or a
            chexlib checkpoint (run folder, its ``checkpoints`` folder or a prefix).

    Returns:
        An uncompiled ``tf.keras.Model`` named ``chexnet_<model>``.

    Raises:
        WeightsError: weights asked for but not available locally.
    """
    import tensorflow as tf

    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose from {', '.join(MODELS)}")
    kind, source = weights_kind(weights)
    base_file = None
    if kind == "imagenet":
        if model in ("tiny", "standin"):
            raise WeightsError(f"the {model} model has no ImageNet weights; use --weights none")
        base_file = imagenet_weights_path(model, source)
    # here: it loads TensorFlow, which building a model needs anyway
    from chexlib.train.gray_input import gray_input

    inputs, rgb = gray_input(image_size, PIPELINE_MODEL[model])
    base = _base(model, inputs, rgb, base_file)
    x = tf.keras.layers.GlobalAveragePooling2D(name="avg_pool")(base.output)
    # float32 head: keeps the sigmoid and the loss out of float16 under mixed precision
    outputs = tf.keras.layers.Dense(
        num_classes, activation="sigmoid", dtype="float32", name=HEAD_NAME
    )(x)
    net = tf.keras.Model(base.input, outputs, name=f"chexnet_{model}")
    if kind == "full_h5":
        net.load_weights(str(source))
    elif kind == "checkpoint":
        load_checkpoint_weights(net, source)
    return net


def weights_kind(weights) -> tuple[str, Path | None]:
    """Classify a ``--weights`` value: (``none``|``imagenet``|``full_h5``|``checkpoint``, path)."""
    if weights is None or str(weights).lower() in ("", "none", "random"):
        return "none", None
    if str(weights).lower() == "imagenet":
        return "imagenet", None
    path = Path(weights).expanduser()
    if path.suffix == ".h5":
        if not path.is_file():
            raise WeightsError(f"weights file not found: {path}")
        return ("full_h5" if _h5_has_layer(path, HEAD_NAME) else "imagenet"), path
    if is_checkpoint(path):
        return "checkpoint", path
    raise WeightsError(
        f"--weights {weights}: expected none, imagenet, a .h5 file or a chexlib checkpoint "
        "(a run folder with checkpoints/latest.json)"
    )


def _h5_has_layer(path: Path, layer: str) -> bool:
    import h5py

    with h5py.File(path, "r") as fh:
        names = fh.attrs.get("layer_names")
        if names is None and "model_weights" in fh:
            names = fh["model_weights"].attrs.get("layer_names")
        names = [
            n.decode() if isinstance(n, bytes) else str(n)
            for n in (names if names is not None else [])
        ]
    return layer in names


def checkpoint_prefix(path: str | Path) -> str:
    """The ``tf.train.Checkpoint`` prefix of the newest epoch under ``path`` (a damaged
    ``latest.json`` is refused naming it)."""
    path = Path(path)
    for pointer in (path / "checkpoints" / "latest.json", path / "latest.json"):
        if pointer.is_file():
            latest = read_checkpoint_record(pointer, {"dir": str})
            return str(pointer.parent / latest["dir"] / "ckpt")
    return str(path)


def load_checkpoint_weights(net, path: str | Path) -> None:
    """Load the model weights of a chexlib checkpoint (optimizer state ignored)."""
    import tensorflow as tf

    status = tf.train.Checkpoint(model=net).read(checkpoint_prefix(path))
    status.expect_partial()  # the optimizer slots are not wanted here
