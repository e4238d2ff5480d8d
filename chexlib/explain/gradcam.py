"""Grad-CAM heatmaps of a trained run, scored against the findings' boxes.

:func:`explain` loads a run's model from its checkpoint (the folder
``chexlib train --out`` writes), computes a Grad-CAM heatmap for the top
findings of each test image and for every finding that has a box, writes
the overlays, and, when the dataset has NIH's ``BBox_List_2017.csv`` (the real
release, or ``chexlib synth`` output), scores each boxed finding:

* the **pointing game** (Zhang et al. 2016): a hit when the heatmap's maximum
  lies inside the box (strictly: no tolerance margin);
* the **IoU** of the heatmap thresholded at ``threshold`` x its maximum
  (default 0.5) with the box;
* **chance**: the box's share of the image, what a random point would hit.

Findings are averaged with equal weight (as CheXNet's per-class tables), over
the findings that have boxes; the pooled rate over all boxes is given too.

Grad-CAM (Selvaraju et al. 2017): for finding ``k`` and feature maps ``A``
(h x w x C) of the last convolutional block, ``alpha_c`` is the mean over
pixels of d logit_k / d A_c and the heatmap is ``ReLU(sum_c alpha_c A_c)``,
upsampled to the model input and divided by its maximum. The upsampling is
bicubic by default (``--upsampling bilinear`` is the paper's): a bilinear map's
maximum always falls on a cell centre, so the pointing game can only point at
one of h x w places (16 px apart in the tiny CNN at 128 px, 32 px in
DenseNet121 at 224) and misses a small box that lies between two centres; a
cubic kernel lets the peak fall between the two strongest cells. Each
feature cell is placed at the centre of its receptive field
(:func:`feature_grid`), not where a plain resize would put it: TensorFlow's
``same`` stride-2 convolutions pad after the image, which moves the tiny CNN's
8 x 8 map half a cell (7.5 of 128 px) down and to the right. The logit
(before the sigmoid) is differentiated, as the paper does with the score
before the softmax. The last block is the input of global average pooling:
``relu`` in DenseNet121, ``conv5_block3_out`` in ResNet50, ``tiny_relu3`` in
the tiny/standin CNN. With pooling and one Dense layer after it, Grad-CAM
there equals CAM (Zhou et al. 2016), the maps the CheXNet paper shows.

Images are preprocessed as evaluation does (``chexlib.pipeline.builders``: decode to
one channel, ``resize_gray`` to the model input, ``normalize``; no flip), so
a heatmap is of what the model saw; boxes scale from the stored image size to
the model input. Weights come only from the run folder, never the network.

TensorFlow is imported inside the functions that need it: reading boxes and
summarising scores (pandas, numpy) stay light.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from chexlib.core.files import read_json, write_json
from chexlib.core.flags import add_flags, config_from_args, option
from chexlib.data.metadata import LABELS, load_metadata
from chexlib.train.models import HEAD_NAME, build_model

BBOX_NAME = "BBox_List_2017.csv"
# NIH's box list spells one finding differently from Data_Entry_2017.csv.
_BOX_ALIASES = {"Infiltrate": "Infiltration"}
LOCALIZATION_CSV = "localization.csv"
HEATMAPS_CSV = "heatmaps.csv"
SUMMARY_JSON = "localization.json"
# Heatmap upsampling kernels, the default first.
UPSAMPLING = ("bicubic", "bilinear")
# heatmaps.csv: one row per overlay written; rank 1 is the image's top finding.
HEATMAP_COLUMNS = ("image", "finding", "probability", "rank", "boxed", "overlay")
# localization.csv: box and peak in pixels of the model input; box_fraction: the box's share of it.
SCORE_COLUMNS = (
    "image",
    "finding",
    "probability",
    "box_x",
    "box_y",
    "box_w",
    "box_h",
    "peak_x",
    "peak_y",
    "hit",
    "iou",
    "box_fraction",
)


class ExplainError(ValueError):
    """A run, dataset or box list that cannot be explained; the message says why."""


@dataclass(frozen=True)
class ExplainConfig:
    """One ``chexlib explain`` call: ``run`` is its positional argument, every other field a flag."""

    run: str = option(
        "trained run folder (chexlib train --out), or a folder holding one",
        default="",
        positional=True,
    )
    data: str = option(
        "dataset folder in the NIH layout (with BBox_List_2017.csv to score)", default=""
    )
    images: int = option(
        "test images explained, boxed ones first; 0: every boxed test image "
        "(every test image when there is no box list)",
        default=0,
    )
    out: str = option("output folder; empty: RUN/explain", default="")
    top: int = option("top-scoring findings explained per image, besides the boxed ones", default=3)
    threshold: float = option("IoU mask: heatmap >= this x its maximum", default=0.5)
    layer: str = option("layer explained; empty: the last convolutional block", default="")
    upsampling: str = option(
        "heatmap upsampling to the input: bicubic (peaks between cell centres) or bilinear "
        "(the Grad-CAM paper's; every peak on a cell centre)",
        default="bicubic",
        choices=UPSAMPLING,
    )
    batch_size: int = option("images per Grad-CAM batch", default=16)
    overlay_size: int = option("overlay PNG side in pixels (at least the model input)", default=256)

    def __post_init__(self):
        checks = (
            (bool(self.run), "run must name a trained run folder"),
            (bool(self.data), "data must name a dataset folder"),
            (self.images >= 0, f"images must be >= 0, not {self.images}"),
            (self.top >= 0, f"top must be >= 0, not {self.top}"),
            (0 < self.threshold < 1, f"threshold must be in (0, 1), not {self.threshold}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, not {self.batch_size}"),
            (self.overlay_size >= 32, f"overlay_size must be >= 32, not {self.overlay_size}"),
            (
                self.upsampling in UPSAMPLING,
                f"upsampling must be one of {', '.join(UPSAMPLING)}, not {self.upsampling!r}",
            ),
        )
        for ok, message in checks:
            if not ok:
                raise ExplainError(f"ExplainConfig: {message}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --- runs, boxes, images (no TensorFlow) ---------------------------------------------


def _is_run(path: Path) -> bool:
    return (path / "params.json").is_file() and (path / "checkpoints" / "latest.json").is_file()


def find_run(path: str | Path) -> Path:
    """The run folder at ``path``, in its ``run/`` (notebook 04's layout), or the only one below.

    A study stage's folder holds its runs under hashed names; pointing at the
    stage is enough when it holds exactly one trained run, and a glob pattern
    (``.../train/raw-optimized_*``) picks one case of a stage.
    """
    if glob.has_magic(str(path)):
        matches = sorted(glob.glob(str(path)))
        if len(matches) != 1:
            raise ExplainError(f"{path}: {len(matches)} folders match; the pattern must match one")
        path = matches[0]
    path = Path(path)
    for candidate in (path, path / "run"):
        if _is_run(candidate):
            return candidate
    found = sorted({p.parent.parent for p in path.glob("**/checkpoints/latest.json")})
    found = [p for p in found if _is_run(p)]
    if len(found) == 1:
        return found[0]
    what = "no trained run" if not found else f"{len(found)} trained runs"
    raise ExplainError(
        f"{path}: {what} (a folder with params.json and checkpoints/latest.json, "
        "as `chexlib train --out` writes); name one run folder"
    )


def read_boxes(data_dir: str | Path) -> pd.DataFrame | None:
    """``BBox_List_2017.csv`` as columns image, finding, x, y, w, h; None when absent.

    Reads NIH's file (``Infiltrate`` becomes ``Infiltration``) and synth's.
    """
    path = Path(data_dir) / BBOX_NAME
    if not path.is_file():
        return None
    raw = pd.read_csv(path)
    if raw.shape[1] < 6 or list(raw.columns[:2]) != ["Image Index", "Finding Label"]:
        raise ExplainError(
            f"{path}: expected NIH's header 'Image Index,Finding Label,Bbox [x,y,w,h]'"
        )
    boxes = raw.iloc[:, :6].set_axis(["image", "finding", "x", "y", "w", "h"], axis=1)
    boxes["finding"] = boxes["finding"].replace(_BOX_ALIASES)
    unknown = sorted(set(boxes["finding"]) - set(LABELS))
    if unknown:
        raise ExplainError(f"{path}: unknown finding(s) {unknown}")
    coords = boxes[["x", "y", "w", "h"]].apply(pd.to_numeric, errors="coerce")
    if coords.isna().any().any() or (coords[["w", "h"]] <= 0).any().any():
        raise ExplainError(f"{path}: every box needs numbers x, y and positive w, h")
    boxes[["x", "y", "w", "h"]] = coords.astype(float)
    return boxes


def select_images(meta: pd.DataFrame, boxes: pd.DataFrame | None, n: int) -> pd.DataFrame:
    """Test images to explain: boxed ones first (by name), then the rest; ``n`` = 0: the boxed."""
    test = meta[(meta["split"] == "test") & meta["path"].notna()]
    boxed = set(boxes["image"]) if boxes is not None else set()
    order = sorted(test["image"], key=lambda name: (name not in boxed, name))
    if n == 0:
        order = [name for name in order if name in boxed] or order
    else:
        order = order[:n]
    return test.set_index("image").loc[order].reset_index()


# --- scores (numpy) -------------------------------------------------------------------


def box_mask(box, shape: tuple[int, int]) -> np.ndarray:
    """Pixels whose centres lie in ``box`` = (x, y, w, h), as a bool array of ``shape`` (rows, cols)."""
    x, y, w, h = box
    cols = np.arange(shape[1]) + 0.5
    rows = np.arange(shape[0]) + 0.5
    return ((rows >= y) & (rows < y + h))[:, None] & ((cols >= x) & (cols < x + w))[None, :]


def peak(heat: np.ndarray) -> tuple[int, int]:
    """(row, col) of the heatmap's maximum; of tied maxima, the one nearest the map's centre.

    Upsampling holds a border cell's value from the image's edge to the cell's
    centre, so a strongest border cell is a plateau of equal maxima that ends at
    its centre: the tie nearest the middle is that centre, where the cell looks.
    """
    rows, cols = np.nonzero(heat == np.max(heat))
    centre = (np.array(heat.shape) - 1) / 2
    nearest = np.argmin((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2)
    return int(rows[nearest]), int(cols[nearest])


def pointing_hit(heat: np.ndarray, box) -> bool:
    """The pointing game: is the heatmap's maximum inside ``box``? A flat-zero map misses."""
    if not np.max(heat) > 0:
        return False
    return bool(box_mask(box, heat.shape)[peak(heat)])


def heat_iou(heat: np.ndarray, box, threshold: float = 0.5) -> float:
    """IoU of ``heat >= threshold x max(heat)`` with ``box``; 0 for a flat-zero map."""
    inside = box_mask(box, heat.shape)
    if not np.max(heat) > 0:
        return 0.0
    mask = heat >= threshold * np.max(heat)
    union = np.logical_or(mask, inside).sum()
    return float(np.logical_and(mask, inside).sum() / union) if union else 0.0


def scale_box(box, stored: tuple[int, int], size: int) -> tuple[float, float, float, float]:
    """A box in pixels of the stored image (height, width) -> pixels of the ``size`` model input."""
    sy, sx = size / stored[0], size / stored[1]
    x, y, w, h = box
    return (x * sx, y * sy, w * sx, h * sy)


def summarize(scores: pd.DataFrame) -> dict:
    """Hit rate, IoU and chance per finding, averaged over findings (equal weight) and pooled."""
    if scores.empty:
        return {
            "boxes": 0,
            "findings_with_boxes": 0,
            "hit_rate": None,
            "mean_iou": None,
            "hit_rate_chance": None,
            "hit_rate_pooled": None,
            "per_finding": {},
        }
    grouped = scores.groupby("finding")
    per = pd.DataFrame(
        {
            "boxes": grouped.size(),
            "hit_rate": grouped["hit"].mean(),
            "mean_iou": grouped["iou"].mean(),
            "hit_rate_chance": grouped["box_fraction"].mean(),
        }
    )
    per = per.loc[[k for k in LABELS if k in per.index]]
    return {
        "boxes": len(scores),
        "findings_with_boxes": len(per),
        "hit_rate": float(per["hit_rate"].mean()),
        "mean_iou": float(per["mean_iou"].mean()),
        "hit_rate_chance": float(per["hit_rate_chance"].mean()),
        "hit_rate_pooled": float(scores["hit"].mean()),
        "per_finding": {
            k: {c: int(v) if c == "boxes" else float(v) for c, v in row.items()}
            for k, row in per.iterrows()
        },
    }


def finding_table(summary: dict) -> pd.DataFrame:
    """The per-finding scores of a :func:`summarize` result, one row per finding, and the mean."""
    table = pd.DataFrame.from_dict(summary["per_finding"], orient="index")
    if table.empty:
        return table
    table.index.name = "finding"
    table.loc["mean over findings"] = [
        summary["boxes"],
        summary["hit_rate"],
        summary["mean_iou"],
        summary["hit_rate_chance"],
    ]
    return table.astype({"boxes": int})


# --- overlays (PIL) ---------------------------------------------------------------------


def _jet(heat: np.ndarray) -> np.ndarray:
    """The classic jet colour map: [0, 1] -> RGB in [0, 1]."""
    h = heat[..., None] * 4.0
    return np.clip(1.5 - np.abs(h - np.array([3.0, 2.0, 1.0])), 0.0, 1.0)


def overlay(gray: np.ndarray, heat: np.ndarray, box=None, title: str = "", side: int = 256):
    """A PIL image: ``gray`` (uint8, model input) under the heatmap, the box in green, the peak marked."""
    from PIL import Image, ImageDraw

    f = max(1, math.ceil(side / gray.shape[0]))
    size = (gray.shape[1] * f, gray.shape[0] * f)
    base = np.asarray(Image.fromarray(gray).resize(size, Image.BILINEAR), dtype=np.float32) / 255
    hot = np.asarray(Image.fromarray(heat.astype(np.float32), "F").resize(size, Image.BILINEAR))
    hot = np.clip(hot, 0.0, 1.0)
    alpha = 0.55 * hot[..., None]
    rgb = (1 - alpha) * base[..., None] + alpha * _jet(hot)
    img = Image.fromarray((255 * rgb).round().astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    if box is not None:
        x, y, w, h = (v * f for v in box)
        draw.rectangle([x, y, x + w - 1, y + h - 1], outline=(0, 255, 0), width=2)
    if np.max(heat) > 0:
        r, c = ((v + 0.5) * f for v in peak(heat))
        draw.line([c - 6, r, c + 6, r], fill=(255, 255, 255), width=2)
        draw.line([c, r - 6, c, r + 6], fill=(255, 255, 255), width=2)
    if title:
        draw.rectangle([0, 0, img.width, 14], fill=(0, 0, 0))
        draw.text((3, 1), title, fill=(255, 255, 255))
    return img


# --- Grad-CAM (TensorFlow) ----------------------------------------------------------------


def load_run_model(run_dir: str | Path):
    """``(model, params)`` of a trained run: its architecture from params.json, weights from its checkpoint."""

    run_dir = find_run(run_dir)
    params = read_json(run_dir / "params.json", expect=dict)
    try:
        model, size = params["model"], int(params["image_size"])
    except (KeyError, TypeError, ValueError):
        raise ExplainError(f"{run_dir / 'params.json'}: no model and image_size") from None
    return build_model(model, size, weights=str(run_dir)), {**params, "run": str(run_dir)}


def last_conv_layer(net) -> str:
    """Name of the layer feeding global average pooling: the last convolutional block."""
    inbound = net.get_layer("avg_pool").inbound_nodes[0].inbound_layers
    return (inbound[0] if isinstance(inbound, list | tuple) else inbound).name


def cam_model(net, layer: str = ""):
    """A model from the input to (the feature maps of ``layer``, the head's input)."""
    import tensorflow as tf

    try:
        features = net.get_layer(layer or last_conv_layer(net)).output
    except ValueError as err:
        raise ExplainError(f"{net.name} has no layer {layer!r}: {err}") from None
    return tf.keras.Model(net.inputs, [features, net.get_layer(HEAD_NAME).input])


# Layers that move or subsample the feature grid; every other layer keeps it as it is.
_KERNEL_LAYERS = ("Conv2D", "DepthwiseConv2D", "SeparableConv2D")
_POOL_LAYERS = ("MaxPooling2D", "AveragePooling2D")


def _chain(layer) -> list:
    """The layers from the input to ``layer``, following each layer's first input.

    Branches that merge (DenseNet's concatenations, ResNet's additions) are
    aligned with each other, so the first input's path gives the grid.
    """
    chain = []
    while True:
        chain.append(layer)
        inbound = layer.inbound_nodes[0].inbound_layers if layer.inbound_nodes else []
        inbound = inbound if isinstance(inbound, list | tuple) else [inbound]
        if not inbound:
            return chain[::-1]
        layer = inbound[0]


def _axis_grid(layer, axis: int, start: float, jump: float) -> tuple[float, float]:
    """(centre of cell 0, cell spacing) after ``layer`` along ``axis`` (0: rows, 1: cols)."""
    kind = type(layer).__name__
    if kind == "ZeroPadding2D":
        return start - layer.padding[axis][0] * jump, jump
    if kind not in _KERNEL_LAYERS + _POOL_LAYERS:
        return start, jump
    if kind in _KERNEL_LAYERS:
        k = (layer.kernel_size[axis] - 1) * layer.dilation_rate[axis] + 1
    else:
        k = layer.pool_size[axis]
    s, n_in = layer.strides[axis], layer.input.shape[1 + axis]
    before = 0
    if layer.padding == "same":  # TensorFlow pads the odd pixel at the end
        before = max((-(-n_in // s) - 1) * s + k - n_in, 0) // 2
    return start + ((k - 1) / 2 - before) * jump, jump * s


def feature_grid(cams) -> tuple[tuple[float, float], tuple[float, float]]:
    """Where a :func:`cam_model`'s feature cells sit on its input: per axis (rows, cols),
    the centre of cell 0 and the spacing of cells, in input pixels (pixel ``i`` spans [i, i+1)).

    A stride-2 convolution with TensorFlow's ``same`` padding centres output
    cell ``j`` on input pixel ``2j + 1`` (the padding goes after the image), not
    between pixels ``2j`` and ``2j + 1`` as a plain resize assumes: in the tiny
    CNN four of them put cell ``j`` of the 8 x 8 map at ``16j + 15.5`` of a
    128 px input, not ``16j + 8``: half a cell down and to the right.
    """
    grid = []
    for axis in (0, 1):
        start, jump = 0.5, 1.0
        for layer in _chain(cams.get_layer(cams.output_names[0])):
            start, jump = _axis_grid(layer, axis, start, jump)
        grid.append((start, jump))
    return tuple(grid)


def _cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    """Keys' cubic convolution kernel (a = -0.5: Catmull-Rom, as bicubic image resizers)."""
    x = np.abs(x)
    near = (a + 2) * x**3 - (a + 3) * x**2 + 1
    far = a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def upsampling_matrix(
    cells: int, size: int, start: float, jump: float, kernel: str = "bicubic"
) -> np.ndarray:
    """``[size, cells]`` interpolation weights (each row sums to 1): cell ``j`` centred at
    ``start + j x jump`` input pixels, held constant beyond the first and last centres
    (as ``tf.image.resize``); ``kernel`` is ``bicubic`` or ``bilinear``."""
    if kernel not in UPSAMPLING:
        raise ExplainError(f"upsampling must be one of {', '.join(UPSAMPLING)}, not {kernel!r}")
    at = np.clip((np.arange(size) + 0.5 - start) / jump, 0, cells - 1)
    low = np.floor(at).astype(int)
    rows = np.arange(size)
    weights = np.zeros((size, cells), np.float32)
    if kernel == "bilinear":
        np.add.at(weights, (rows, low), 1 - (at - low))
        np.add.at(weights, (rows, np.minimum(low + 1, cells - 1)), at - low)
        return weights
    for offset in (-1, 0, 1, 2):  # cells beyond the edge repeat the edge cell
        np.add.at(weights, (rows, np.clip(low + offset, 0, cells - 1)), _cubic(at - low - offset))
    return weights


def heatmaps(
    net, images, classes, layer: str = "", cams=None, upsampling: str = "bicubic"
) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM of ``classes`` (indices into ``LABELS``) for a batch of preprocessed images,
    upsampled to the input with ``upsampling`` (see :func:`upsampling_matrix`).

    Returns:
        ``(maps, probabilities)``: ``float32 [B, len(classes), S, S]`` in [0, 1]
        (each map divided by its maximum; all zero when nothing is positive)
        and the model's ``[B, 14]`` probabilities.
    """
    import tensorflow as tf

    cams = cam_model(net, layer) if cams is None else cams
    head = net.get_layer(HEAD_NAME)
    images = tf.convert_to_tensor(images, tf.float32)
    with tf.GradientTape(persistent=True) as tape:
        features, pooled = cams(images, training=False)
        features = tf.cast(features, tf.float32)
        logits = tf.matmul(tf.cast(pooled, tf.float32), head.kernel) + head.bias
    maps = []
    for k in classes:  # each image's logit depends on its own input only: one pass per class
        pick = tf.one_hot(tf.fill([tf.shape(logits)[0]], k), logits.shape[-1])
        grads = tape.gradient(logits, features, output_gradients=pick)
        alpha = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
        maps.append(tf.nn.relu(tf.reduce_sum(alpha * features, axis=-1)))
    del tape
    size = images.shape[1:3]
    probs = tf.sigmoid(logits).numpy()
    if not maps:
        return np.zeros((images.shape[0], 0, *size), np.float32), probs
    stacked = tf.stack(maps, axis=1)  # [B, K, h, w]
    rows, cols = feature_grid(cams)
    up_rows = upsampling_matrix(stacked.shape[2], size[0], *rows, kernel=upsampling)
    up_cols = upsampling_matrix(stacked.shape[3], size[1], *cols, kernel=upsampling)
    up = tf.einsum("yh,bkhw,xw->bkyx", tf.constant(up_rows), stacked, tf.constant(up_cols))
    up = tf.nn.relu(up)  # a cubic kernel overshoots below zero next to a strong cell
    top = tf.reduce_max(up, axis=(2, 3), keepdims=True)
    up = tf.math.divide_no_nan(up, top)
    return up.numpy(), probs


def load_images(paths, size: int, model: str) -> tuple[np.ndarray, np.ndarray, list]:
    """``(gray uint8 [N, S, S], model input uint8 [N, S, S, 1], stored (height, width))``.

    The evaluation path of :mod:`chexlib.pipeline.builders`: decode to one channel,
    ``resize_gray`` to the model input; no flip. The model normalises its uint8
    input itself (the uint8 input contract), as in training.
    """
    import tensorflow as tf

    # here: it loads TensorFlow; importing this module does not
    from chexlib.pipeline.decode import decode_png_gray, resize_gray

    grays, stored = [], []
    for path in paths:
        gray = decode_png_gray(tf.io.read_file(str(path)))
        stored.append(tuple(int(v) for v in gray.shape[:2]))
        grays.append(resize_gray(gray, size))
    batch = tf.stack(grays).numpy()
    return batch[..., 0], batch, stored


# --- the whole run --------------------------------------------------------------------


def _wanted(probs: np.ndarray, boxed, top: int) -> list[int]:
    """Finding indices to explain for one image: its ``top`` scores, then its boxed findings."""
    order = [int(i) for i in np.argsort(-probs, kind="stable")[:top]]
    return order + [LABELS.index(k) for k in LABELS if k in boxed and LABELS.index(k) not in order]


def _boxes_by_image(boxes: pd.DataFrame | None) -> dict[str, dict[str, tuple]]:
    """image -> finding -> (x, y, w, h) in stored pixels (the first box of a finding)."""
    found: dict[str, dict[str, tuple]] = {}
    if boxes is not None:
        for name, finding, *box in boxes.itertuples(index=False, name=None):
            found.setdefault(name, {}).setdefault(finding, tuple(box))
    return found


def _explain_batch(net, cams, rows, boxes_of: dict, config, size: int, model: str, out: Path):
    """Heatmap rows and score rows of one batch of images; writes their overlays."""
    gray, x, stored = load_images(rows["path"], size, model)
    probs = np.asarray(net(x, training=False), dtype=np.float64)
    names = list(rows["image"])
    wanted = [
        _wanted(p, boxes_of.get(n, {}), config.top) for n, p in zip(names, probs, strict=True)
    ]
    classes = sorted({k for ks in wanted for k in ks})
    maps, _ = heatmaps(net, x, classes, cams=cams, upsampling=config.upsampling)
    heat_rows, score_rows = [], []
    for i, (name, ks) in enumerate(zip(names, wanted, strict=True)):
        for k in ks:
            finding, heat, p = LABELS[k], maps[i, classes.index(k)], float(probs[i, k])
            rank = int((probs[i] > probs[i, k]).sum()) + 1  # 1: the image's top finding
            box = boxes_of.get(name, {}).get(finding)
            if box is not None:
                box = scale_box(box, stored[i], size)
                score_rows.append(_score_row(name, finding, p, heat, box, config.threshold))
            path = out / "overlays" / f"{Path(name).stem}__{finding}.png"
            overlay(gray[i], heat, box, f"{finding} p={p:.2f}", config.overlay_size).save(path)
            heat_rows.append(
                {
                    "image": name,
                    "finding": finding,
                    "probability": p,
                    "rank": rank,
                    "boxed": box is not None,
                    "overlay": str(path.relative_to(out)),
                }
            )
    return heat_rows, score_rows


def _score_row(name, finding, probability, heat, box, threshold) -> dict:
    r, c = peak(heat) if np.max(heat) > 0 else (None, None)  # a flat-zero map has no peak
    x, y, w, h = box
    return {
        "image": name,
        "finding": finding,
        "probability": probability,
        "box_x": x,
        "box_y": y,
        "box_w": w,
        "box_h": h,
        "peak_x": c,
        "peak_y": r,
        "hit": pointing_hit(heat, box),
        "iou": heat_iou(heat, box, threshold),
        "box_fraction": float(box_mask(box, heat.shape).mean()),
    }


def explain(config: ExplainConfig, progress: bool = False) -> dict:
    """Explain a run's test images (see the module docstring); returns the summary it writes.

    Writes into ``config.out`` (default ``RUN/explain``): ``overlays/*.png``
    (one per image and finding), ``heatmaps.csv`` (what each overlay shows),
    ``localization.csv`` (one row per boxed finding: box and peak in model
    input pixels, hit, IoU, box share of the image) and ``localization.json``.
    """

    net, params = load_run_model(config.run)
    size, model = int(params["image_size"]), params["model"]
    out = Path(config.out) if config.out else Path(params["run"]) / "explain"
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    boxes = read_boxes(config.data)
    chosen = select_images(load_metadata(config.data), boxes, config.images)
    boxes_of = _boxes_by_image(boxes)
    cams = cam_model(net, config.layer)
    heat_rows, score_rows = [], []
    starts = range(0, len(chosen), config.batch_size)
    for start in _progress(starts, progress):
        rows = chosen.iloc[start : start + config.batch_size]
        h, s = _explain_batch(net, cams, rows, boxes_of, config, size, model, out)
        heat_rows += h
        score_rows += s
    scores = pd.DataFrame(score_rows, columns=list(SCORE_COLUMNS))
    pd.DataFrame(heat_rows, columns=list(HEATMAP_COLUMNS)).to_csv(out / HEATMAPS_CSV, index=False)
    scores.to_csv(out / LOCALIZATION_CSV, index=False)
    summary = {
        "run": params["run"],
        "model": model,
        "image_size": size,
        "layer": config.layer or last_conv_layer(net),
        "data": str(config.data),
        "images": len(chosen),
        "boxed_images": int(chosen["image"].isin(list(boxes_of)).sum()),
        "box_list": boxes is not None,
        "threshold": config.threshold,
        "upsampling": config.upsampling,
        "overlays": len(heat_rows),
        **summarize(scores),
        "out": str(out),
    }
    write_json(out / SUMMARY_JSON, summary)
    return summary


def _progress(items, on: bool):
    if not on:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc="explain", unit="batch")


# --- command line ---------------------------------------------------------------------


def add_arguments(parser) -> None:
    """``RUN`` positional, then one flag per other :class:`ExplainConfig` field."""
    add_flags(parser, ExplainConfig)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args) -> int:
    """``chexlib explain RUN --data DIR``: write overlays and scores, print the summary."""
    config = config_from_args(ExplainConfig, args)
    summary = explain(config, progress=not args.no_progress and sys.stderr.isatty())
    for key, value in summary.items():
        if key != "per_finding":
            print(f"{key:<20} {value}")
    table = finding_table(summary)
    if not table.empty:
        print(table.round(3).to_string())
    return 0
