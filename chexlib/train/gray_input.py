"""The model's first layer: the uint8 input contract.

The input pipeline hands the model one ``uint8`` grey channel at the training
size (``[B, S, S, 1]``: 50 KB per 224-px image); this layer, inside the model,
turns it into the three normalised channels its backbone's ImageNet weights
expect (``float32 [B, S, S, 3]``, 602 KB), on the device that runs the model.
So a checkpoint, Grad-CAM and a served model all take the same input as
training did, and a host-to-device copy moves 12x fewer bytes. Normalising is
one gather from a 256 x 3 table (a grey level has 256 values).

The layer has no weights: checkpoints written before it existed (a model that
took the normalised three channels) load into a model with it unchanged.
"""

from __future__ import annotations

import tensorflow as tf

from chexlib.pipeline.builders import normalization_table

INPUT_NAME = "gray_uint8"


@tf.keras.utils.register_keras_serializable(package="chexlib")
class GrayToBackbone(tf.keras.layers.Layer):
    """``uint8 [..., 1]`` grey -> the normalised ``[..., 3]`` of ``normalization``'s backbone.

    Args:
        normalization: the model whose ImageNet normalisation to apply
            (``densenet121``: torch-style, ``resnet50``: caffe-style).
    """

    def __init__(self, normalization: str, **kwargs):
        super().__init__(**kwargs)
        self.normalization = normalization
        self._table = tf.constant(normalization_table(normalization))

    def call(self, gray):
        rgb = tf.gather(self._table, tf.cast(gray[..., 0], tf.int32))
        return tf.cast(rgb, self.compute_dtype)  # bfloat16/float16 under a mixed policy

    def compute_output_shape(self, input_shape):
        return tf.TensorShape(input_shape)[:-1].concatenate([3])

    def get_config(self):
        return {**super().get_config(), "normalization": self.normalization}


def gray_input(image_size: int, normalization: str):
    """(the ``uint8 [S, S, 1]`` model input, the normalised three channels from it)."""
    inputs = tf.keras.Input((image_size, image_size, 1), dtype=tf.uint8, name=INPUT_NAME)
    return inputs, GrayToBackbone(normalization, name="gray_to_backbone")(inputs)
