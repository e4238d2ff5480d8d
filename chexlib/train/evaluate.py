"""Evaluation of a training run: per-class AUROC over every rank's predictions.

Every rank predicts its shard of a split; the predictions are gathered
(``hvd.allgather``), so each image counts exactly once (checked against the
split size), and every rank scores the same set: the per-class AUROC
(scikit-learn), their mean and the binary cross-entropy. A class with only one
label value in a split has no AUROC: it is None with the reason.

Before evaluating, :func:`sync_moving_statistics` averages the BatchNorm
moving statistics over ranks, so all ranks evaluate (and rank 0 checkpoints)
one model. TensorFlow and Horovod are imported inside the functions that use
them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

from chexlib.data.metadata import LABELS

SPLITS = ("val", "test")  # the evaluated splits: val each epoch, test at the end


def auroc_per_class(
    labels: np.ndarray, scores: np.ndarray, split: str = "val"
) -> tuple[dict, dict]:
    """Per-class AUROC; undefined ones are None with a reason (never an exception).

    Returns:
        ``({label: auroc or None}, {label: reason})`` for the 14 labels.
    """
    from sklearn.metrics import roc_auc_score

    values, reasons = {}, {}
    for k, label in enumerate(LABELS):
        y, s = labels[:, k], scores[:, k]
        positives = int(y.sum())
        if len(y) == 0:
            values[label], reasons[label] = None, f"no images in {split}"
        elif positives in (0, len(y)):
            kind = "negative" if positives == 0 else "positive"
            values[label], reasons[label] = (
                None,
                f"only {kind} examples in {split} ({len(y)} images)",
            )
        elif not np.all(np.isfinite(s)):
            values[label], reasons[label] = None, "predictions are not finite (training diverged)"
        else:
            values[label] = float(roc_auc_score(y, s))
    return values, reasons


def mean_auroc(values: dict) -> float | None:
    defined = [v for v in values.values() if v is not None]
    return float(np.mean(defined)) if defined else None


def binary_crossentropy(labels: np.ndarray, scores: np.ndarray, eps: float = 1e-7) -> float:
    """Mean BCE over images and classes, clipped like Keras."""
    if len(labels) == 0:
        return float("nan")
    p = np.clip(scores.astype(np.float64), eps, 1 - eps)
    return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))


def evaluate_split(predict, dataset, split: str, expected: int | None) -> dict:
    """Predict this rank's shard, gather all ranks' predictions, score them.

    Every rank returns the same result. ``expected`` (the split size) is checked
    against the gathered count: each image must be counted exactly once.
    """
    import horovod.tensorflow as hvd_tf
    import tensorflow as tf

    scores, labels = [], []
    for images, y in dataset:
        scores.append(predict(images).numpy())
        labels.append(y.numpy())
    scores = np.concatenate(scores) if scores else np.zeros((0, len(LABELS)), np.float32)
    labels = np.concatenate(labels) if labels else np.zeros((0, len(LABELS)), np.float32)
    # Horovod: gather every rank's shard, so each image is scored exactly once.
    scores = hvd_tf.allgather(tf.constant(scores, tf.float32)).numpy()
    labels = hvd_tf.allgather(tf.constant(labels, tf.float32)).numpy()
    if expected is not None and len(scores) != expected:
        raise RuntimeError(f"{split}: evaluated {len(scores)} images, the split has {expected}")
    values, reasons = auroc_per_class(labels, scores, split)
    return {
        "loss": binary_crossentropy(labels, scores),
        "auroc": values,
        "auroc_reasons": reasons,
        "mean_auroc": mean_auroc(values),
        "images": len(scores),
    }


def split_scorers(model, data, evaluate: bool) -> tuple[dict[str, Callable[[], dict]], dict]:
    """What scores ``model`` on each evaluated split, and the split sizes.

    Args:
        model: the Keras model being trained (scored as it is when called).
        data: the rank's :class:`chexlib.train.inputs.RankData`.
        evaluate: False: no scorers (synthetic data, or ``--no-evaluate``).

    Returns:
        ``({split: scorer}, {split: images})``, both empty without ``evaluate``;
        a scorer takes no argument and returns :func:`evaluate_split`'s result.
    """
    import tensorflow as tf

    predict = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    if not evaluate:
        return {}, {}
    datasets = {s: data.evaluation(s) for s in SPLITS}
    expected = {s: data.split_size(s) for s in SPLITS}
    scorers = {
        s: functools.partial(evaluate_split, predict, datasets[s], s, expected[s]) for s in SPLITS
    }
    return scorers, expected


def sync_moving_statistics(model, ranks: int) -> None:
    """Average the non-trainable variables (BatchNorm moving mean/variance) over ranks.

    Each rank updates them from its own batches only, so without this the
    ranks would evaluate, and rank 0 would checkpoint, slightly different models.
    """
    import horovod.tensorflow as hvd_tf

    variables = model.non_trainable_variables
    if ranks > 1 and variables:
        # Horovod: one grouped allreduce (average) of all moving statistics.
        averaged = hvd_tf.grouped_allreduce([v.value() for v in variables], op=hvd_tf.Average)
        for var, value in zip(variables, averaged, strict=True):
            var.assign(value)
