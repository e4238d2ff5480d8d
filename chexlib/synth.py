"""A generated dataset in exactly the NIH ChestX-ray14 layout.

``generate`` writes what the NIH download unpacks to, so every other part of
chexlib runs unchanged on it::

    OUT_DIR/
      Data_Entry_2017.csv     the NIH header, every column, one row per image
      train_val_list.txt      split by patient
      test_list.txt           about ``test_fraction`` of the images
      BBox_List_2017.csv      NIH's box list: a box per planted finding of the test split
      images/*.png            8-bit grayscale, ``size`` x ``size``
      synth.json              the arguments (makes a rerun resumable)

Metadata model
    Patients have a geometric number of follow-up images with mean
    112,120 / 30,805 = 3.64, as in NIH. Findings come from a Gaussian copula:
    finding ``k`` is present when ``z_k > t_k`` with ``t_k = Phi^-1(1 - p_k)``
    and ``p_k`` the NIH prevalence, so every marginal is exact. ``z_k`` sums
    standard-normal factors: a global "sickness" factor (loading
    ``_GLOBAL_LOADING``, tuned so that ~53.8 % of images have No Finding), four
    disease-group factors (cardiac/fluid, airspace, growth, chronic; see
    ``_LOADINGS``) that make Effusion co-occur with Atelectasis, Infiltration,
    Edema and Cardiomegaly, Mass with Nodule, and so on, and a factor of its
    own. Each factor is a mix of a per-patient and a per-image draw, so the
    follow-ups of one patient share findings (chronic ones most). Sicker
    images are more often AP, as in NIH (40 % AP overall).

Image model
    A smooth chest (body, lungs, mediastinum, heart, diaphragm, ribs,
    clavicles, lung markings) is drawn on a grid of at most 256 pixels,
    resized to ``size`` and given pixel noise tuned so a 1024 x 1024 PNG
    compresses to ~300-500 KB like the real ones (decode and I/O cost stay
    representative). Each finding adds its own pattern at its own place
    (e.g. Mass: a large round well-defined opacity in the image-left lung;
    Nodule: a small dense spot in the upper image-right lung; Consolidation:
    an ill-defined patch crossed by dark air bronchograms; Pneumonia: an
    airspace opacity with a sharp upper edge at the fissure; Fibrosis: a
    reticular net of bright lines; Pleural_Thickening: a thick bright band
    lining the lateral chest wall; Effusion: a basal fill with a meniscus;
    Pneumothorax: a dark apical crescent; Cardiomegaly: a larger heart;
    Emphysema: darker, taller lungs), jittered per patient and image in
    position, size and strength. Patterns are coarse enough to survive
    downscaling to 64 x 64, and their fine structure (Fibrosis' mesh,
    Consolidation's bronchograms) is at least two pixels wide at the 128 px
    input of the demo's learning run. A model that pools over the image
    cannot tell findings apart by place, only by look, so each one looks
    unlike the others. Training flips images horizontally, so a
    finding's mirrored place is either about a tenth of the image or more
    from every other finding's place, or the two differ plainly in shape
    (dot, disk, haze, band, line).

Boxes
    NIH publishes radiologists' boxes for some test images
    (``BBox_List_2017.csv``, x, y, w, h in pixels of the 1024 px image). Here
    every finding drawn at a place (``BOXED``: the localised patterns and the
    heart of Cardiomegaly; not Emphysema, which darkens both lungs) gets the
    box of its own pattern: the finding is drawn alone, as the difference it
    makes to the image's density, and the box bounds the pixels where that
    difference is at least ``BOX_LEVEL`` of its peak, in pixels of the stored
    image (:func:`finding_boxes`). Edema's box spans both of its wings.

Everything is a function of the arguments only: the metadata comes from one
seeded stream, every image from streams keyed by (seed, patient) and (seed,
image number), so the output is byte-identical for any number of workers.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pandas as pd
from PIL import Image

from chexlib.data import LABELS, NO_FINDING, TEST_LIST, TRAIN_VAL_LIST

CSV_NAME = "Data_Entry_2017.csv"
MANIFEST = "synth.json"
# Bump when the bytes written for the same arguments change, so an old
# output directory is not mistaken for a current one.
FORMAT_VERSION = 2
# The real header: the bracketed pairs are split into two columns each, and
# the line ends with a comma (an empty twelfth column).
CSV_HEADER: tuple[str, ...] = (
    "Image Index",
    "Finding Labels",
    "Follow-up #",
    "Patient ID",
    "Patient Age",
    "Patient Gender",
    "View Position",
    "OriginalImage[Width",
    "Height]",
    "OriginalImagePixelSpacing[x",
    "y]",
    "",
)
CSV_COLUMNS = CSV_HEADER[:-1]
BBOX_NAME = "BBox_List_2017.csv"
# NIH's header, ``Image Index,Finding Label,Bbox [x,y,w,h],,,``: the bracketed
# box is four columns, and three empty ones follow (on every row too).
BBOX_HEADER: tuple[str, ...] = (
    "Image Index",
    "Finding Label",
    "Bbox [x",
    "y",
    "w",
    "h]",
    "",
    "",
    "",
)

# Fraction of NIH images with each finding (REFERENCE.md).
PREVALENCE: dict[str, float] = {
    "Atelectasis": 0.103,
    "Cardiomegaly": 0.025,
    "Effusion": 0.119,
    "Infiltration": 0.177,
    "Mass": 0.052,
    "Nodule": 0.056,
    "Pneumonia": 0.013,
    "Pneumothorax": 0.047,
    "Consolidation": 0.042,
    "Edema": 0.021,
    "Emphysema": 0.022,
    "Fibrosis": 0.015,
    "Pleural_Thickening": 0.030,
    "Hernia": 0.002,
}
NO_FINDING_FRACTION = 0.538
MEAN_FOLLOWUPS = 112_120 / 30_805
AP_FRACTION = 0.40

# --- metadata model -----------------------------------------------------------

# Loadings on the group factors (cardiac/fluid, airspace, growth, chronic).
_LOADINGS: dict[str, tuple[float, float, float, float]] = {
    "Atelectasis": (0.0, 0.45, 0.0, 0.0),
    "Cardiomegaly": (0.55, 0.0, 0.0, 0.0),
    "Effusion": (0.5, 0.35, 0.0, 0.0),
    "Infiltration": (0.0, 0.45, 0.0, 0.0),
    "Mass": (0.0, 0.0, 0.5, 0.0),
    "Nodule": (0.0, 0.0, 0.5, 0.0),
    "Pneumonia": (0.0, 0.5, 0.0, 0.0),
    "Pneumothorax": (0.0, 0.0, 0.0, 0.35),
    "Consolidation": (0.0, 0.5, 0.0, 0.0),
    "Edema": (0.55, 0.3, 0.0, 0.0),
    "Emphysema": (0.0, 0.0, 0.0, 0.45),
    "Fibrosis": (0.0, 0.0, 0.0, 0.45),
    "Pleural_Thickening": (0.0, 0.0, 0.2, 0.4),
    "Hernia": (0.0, 0.0, 0.0, 0.0),
}
# Found by bisection on 10^6 Monte Carlo draws: gives P(no finding) = 0.538.
_GLOBAL_LOADING = 0.28
# Share of each factor's variance that belongs to the patient, not the image.
_PATIENT_SHARE_GLOBAL = 0.6
_PATIENT_SHARE_GROUP = 0.5
_CHRONIC = {
    "Cardiomegaly",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
    "Mass",
    "Nodule",
}
# Common detector formats (width, height, pixel spacing in mm) and how often
# they occur; the other films get a random size at _FREE_SPACING.
_FORMATS = ((2500, 2048, "0.168"), (2048, 2500, "0.168"), (3056, 2544, "0.139"))
_FORMAT_P = (0.25, 0.2, 0.1)
_FREE_SPACING = "0.143"


def _rng(seed: int, *key: int) -> np.random.Generator:
    """An independent stream per (seed, key): like SeedSequence.spawn, but addressable."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


_STREAM_META, _STREAM_SPLIT, _STREAM_PATIENT, _STREAM_IMAGE = range(4)


def followup_counts(n_images: int, rng: np.random.Generator) -> np.ndarray:
    """Images per patient: geometric with NIH's mean, trimmed to sum to ``n_images``."""
    counts = rng.geometric(1.0 / MEAN_FOLLOWUPS, size=n_images)
    total = np.cumsum(counts)
    last = int(np.searchsorted(total, n_images))
    counts = counts[: last + 1].copy()
    counts[-1] -= total[last] - n_images
    return counts


def _mixed(rng: np.random.Generator, patient_of: np.ndarray, n_pat: int, width: int, share):
    """Standard normals that are partly shared by the images of one patient."""
    share = np.broadcast_to(np.asarray(share, dtype=float), (width,))
    per_patient = rng.standard_normal((n_pat, width))[patient_of]
    per_image = rng.standard_normal((len(patient_of), width))
    return np.sqrt(share) * per_patient + np.sqrt(1 - share) * per_image


def sample_findings(patient_of: np.ndarray, rng: np.random.Generator):
    """Draw the 14 findings of every image (see the module docstring).

    Args:
        patient_of: index (0..n_patients-1) of the patient of each image.
        rng: the metadata stream.

    Returns:
        ``(labels, sickness)``: a (n, 14) bool array in ``LABELS`` order and
        the per-image global factor (used to make sick images more often AP).
    """
    n_pat = int(patient_of.max()) + 1
    loadings = np.array([_LOADINGS[k] for k in LABELS])
    own_share = [0.8 if k in _CHRONIC else 0.4 for k in LABELS]
    sickness = _mixed(rng, patient_of, n_pat, 1, _PATIENT_SHARE_GLOBAL)[:, 0]
    groups = _mixed(rng, patient_of, n_pat, loadings.shape[1], _PATIENT_SHARE_GROUP)
    own = _mixed(rng, patient_of, n_pat, len(LABELS), own_share)
    rest = np.sqrt(1 - _GLOBAL_LOADING**2 - (loadings**2).sum(axis=1))
    z = _GLOBAL_LOADING * sickness[:, None] + groups @ loadings.T + rest * own
    thresholds = np.array([NormalDist().inv_cdf(1 - PREVALENCE[k]) for k in LABELS])
    return z > thresholds, sickness


def _patient_columns(counts: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Patient ID, follow-up number, age and gender of every image."""
    n_pat = len(counts)
    patient_of = np.repeat(np.arange(n_pat), counts)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    followup = np.arange(counts.sum()) - first[patient_of]
    base_age = np.clip(rng.normal(47, 17, n_pat), 1, 90)
    years_per_visit = rng.uniform(0.0, 0.5, n_pat)
    age = np.minimum(base_age[patient_of] + followup * years_per_visit[patient_of], 95)
    female = rng.random(n_pat) < 0.435
    return {
        "patient_of": patient_of,
        "Follow-up #": followup,
        "Patient ID": patient_of + 1,
        "Patient Age": age.astype(int),
        "Patient Gender": np.where(female[patient_of], "F", "M"),
    }


def _original_geometry(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Size and pixel spacing of the original films (NIH resized all of them to 1024)."""
    width, height = rng.integers(2400, 3057, size=(2, n))
    spacing = np.full(n, _FREE_SPACING, dtype=object)
    pick = rng.choice(len(_FORMATS) + 1, size=n, p=(*_FORMAT_P, 1 - sum(_FORMAT_P)))
    for i, (w, h, mm) in enumerate(_FORMATS):
        width[pick == i], height[pick == i], spacing[pick == i] = w, h, mm
    return {
        "OriginalImage[Width": width,
        "Height]": height,
        "OriginalImagePixelSpacing[x": spacing,
        "y]": spacing,
    }


def findings_text(row: np.ndarray) -> str:
    """``"Atelectasis|Effusion"`` (alphabetical, as in NIH) or ``"No Finding"``."""
    names = sorted(label for label, on in zip(LABELS, row, strict=True) if on)
    return "|".join(names) if names else NO_FINDING


def sample_metadata(n_images: int, seed: int = 0) -> pd.DataFrame:
    """Draw the metadata of ``n_images`` images without rendering any.

    Returns:
        One row per image in ``Image Index`` order with the 11 NIH CSV columns
        (named as pandas reads the real file, e.g. ``"OriginalImage[Width"``)
        followed by the 14 ``LABELS`` as 0/1 ints.
    """
    _check_count(n_images)
    rng = _rng(seed, _STREAM_META)
    cols = _patient_columns(followup_counts(n_images, rng), rng)
    labels, sickness = sample_findings(cols.pop("patient_of"), rng)
    # Sicker images are more often AP (bedside films), as in NIH.
    ap_score = 0.5 * sickness + np.sqrt(0.75) * rng.standard_normal(n_images)
    view = np.where(ap_score > NormalDist().inv_cdf(1 - AP_FRACTION), "AP", "PA")
    names = [
        f"{p:08d}_{f:03d}.png" for p, f in zip(cols["Patient ID"], cols["Follow-up #"], strict=True)
    ]
    meta = pd.DataFrame(
        {"Image Index": names, "Finding Labels": [findings_text(r) for r in labels]}
    )
    for name in CSV_COLUMNS[2:6]:
        meta[name] = cols[name]
    meta["View Position"] = view
    for name, values in _original_geometry(n_images, rng).items():
        meta[name] = values
    meta[list(LABELS)] = labels.astype("int64")
    return meta


def split_by_patient(meta: pd.DataFrame, test_fraction: float, seed: int = 0) -> np.ndarray:
    """Mark whole patients as test until about ``test_fraction`` of the images are.

    Patients are visited in a seeded random order; one joins the test list
    when that brings the count of test images closer to the target.

    Returns:
        A bool array, True for test images.
    """
    sizes = meta.groupby("Patient ID", sort=True).size()
    order = _rng(seed, _STREAM_SPLIT).permutation(len(sizes))
    target, count, chosen = test_fraction * len(meta), 0, []
    for pid, n in zip(sizes.index[order], sizes.to_numpy()[order], strict=True):
        if abs(count + n - target) < abs(count - target):
            chosen.append(pid)
            count += n
    return meta["Patient ID"].isin(chosen).to_numpy()


# --- image model --------------------------------------------------------------

# Where each localised finding sits, in image coordinates (x right, y down;
# the patient's right lung is on the image's left).
_PLACES: dict[str, tuple[float, float]] = {
    "Fibrosis": (0.31, 0.3),
    "Mass": (0.37, 0.43),
    "Edema": (0.39, 0.47),  # and its mirror image: a bilateral pattern
    "Pneumonia": (0.24, 0.45),
    "Atelectasis": (0.33, 0.63),
    "Effusion": (0.25, 0.80),
    "Pleural_Thickening": (0.0, 0.42),  # x follows the lateral lung wall
    "Pneumothorax": (0.75, 0.23),
    "Nodule": (0.76, 0.36),
    "Infiltration": (0.76, 0.56),
    "Consolidation": (0.75, 0.68),
    "Hernia": (0.52, 0.7),
}
# Findings with a box: every pattern drawn at a place, and the heart (Cardiomegaly).
BOXED: tuple[str, ...] = tuple(k for k in LABELS if k in _PLACES or k == "Cardiomegaly")
BOX_LEVEL = 0.2  # a box bounds where the finding changes the density by >= this x its peak
_BASE = 256  # drawing grid; everything finer than this is pixel noise
NOISE_SIGMA = 0.8  # gray levels; sets the PNG size (measured in the tests)
# zlib level 1: as small as level 6 would be with a little more noise, but
# several times faster to write; reading costs the same.
PNG_LEVEL = 1


class _Canvas:
    """One image being drawn: coordinates after the patient's positioning.

    ``u`` (to the right) and ``v`` (down) run over [0, 1] across the body, so
    everything drawn moves with the patient. ``_chest`` adds the lung masks
    (``lungs``, ``left``) and the x of the image-left lung's lateral wall
    (``wall``) for the findings that follow anatomy.
    """

    def __init__(self, n: int, draws: dict):
        t = (np.arange(n, dtype=np.float32) + 0.5) / n - 0.5
        x, y = np.meshgrid(t, t)
        c, s, zoom = np.cos(draws["angle"]), np.sin(draws["angle"]), draws["zoom"]
        dx, dy = draws["shift"]
        self.u = (c * x - s * y) / zoom + 0.5 - dx
        self.v = (s * x + c * y) / zoom + 0.5 - dy
        self.spots = draws["spots"]  # offsets of Infiltration's spots
        self.lungs = self.left = None
        self.wall = 0.0
        self.lung = (0.3, 0.5, 0.14, 0.3)  # image-left lung: centre x, y and half-width, height

    def gauss(self, cx, cy, sx, sy):
        return np.exp(-0.5 * (((self.u - cx) / sx) ** 2 + ((self.v - cy) / sy) ** 2))

    def radius(self, cx, cy, rx, ry, flare=0.0):
        """Elliptic radius (1 on the ellipse); ``flare`` > 0 widens it towards the bottom."""
        if flare:
            rx = rx * (1 + flare * np.clip((self.v - cy) / ry, -1, 1))
        return np.sqrt(((self.u - cx) / rx) ** 2 + ((self.v - cy) / ry) ** 2)

    def disk(self, cx, cy, rx, ry, edge=0.08, flare=0.0):
        """A soft-edged ellipse; ``flare`` > 0 widens it towards the bottom (lungs)."""
        return _sigmoid((1 - self.radius(cx, cy, rx, ry, flare)) / edge)

    def ray(self, px, py, angle, width):
        """A line of Gaussian profile (sd ``width``) from (px, py) towards ``angle``, ahead only."""
        c, s = np.cos(angle), np.sin(angle)
        du, dv = self.u - px, self.v - py
        return np.exp(-0.5 * ((c * dv - s * du) / width) ** 2) * _sigmoid((c * du + s * dv) / 0.01)


def _sigmoid(x):
    """A ramp with the logistic's slope at 0: as smooth as needed here, and cheap."""
    return np.clip(0.5 + 0.25 * x, 0.0, 1.0)


def _anatomy(seed: int, patient: int, female: bool) -> dict:
    """The patient's build: the same in every follow-up."""
    rng = _rng(seed, _STREAM_PATIENT, patient)
    return {
        "body_w": rng.uniform(0.38, 0.45) * (0.95 if female else 1.0),
        "lung_w": rng.uniform(0.125, 0.15),
        "lung_h": rng.uniform(0.28, 0.32),
        "lung_y": rng.uniform(0.46, 0.49),
        "heart": rng.uniform(0.92, 1.08),
        "diaphragm": rng.uniform(0.77, 0.8),
        "tissue": rng.uniform(0.5, 0.6),
        "rib_step": rng.uniform(0.075, 0.09),
        "rib_phase": rng.uniform(0, 2 * np.pi),
        "offsets": rng.normal(0, 0.012, (len(LABELS), 2)),
        "strength": rng.uniform(0.55, 1.1, len(LABELS)),
        "markings": rng.standard_normal((12, 12)).astype(np.float32),
    }


def _chest(cv: _Canvas, a: dict, heart_scale: float, lung_dark: float, drop: float):
    """Density of a normal chest (higher is brighter); sets the canvas' lung masks."""
    u, v = cv.u, cv.v
    body = cv.disk(0.5, 0.62, a["body_w"], 0.8, edge=0.06)
    dome = a["diaphragm"] + drop - 0.06 * np.cos((u - 0.5) * 5.0) ** 2
    below = _sigmoid((dome - v) / 0.008)
    h, cy = a["lung_h"] + drop / 2, a["lung_y"] + drop / 2
    w = a["lung_w"]
    left = cv.disk(0.5 - 0.035 - w, cy, w, h, 0.08, flare=0.3) * below
    right = cv.disk(0.5 + 0.035 + w, cy, w * 0.95, h, 0.08, flare=0.3) * below
    # The heart hides the lung behind it: same density as the mediastinum.
    hx, hy = 0.13 * heart_scale, 0.105 * heart_scale
    heart = cv.disk(0.545, 0.655 + drop / 2, hx, hy, 0.1)
    left, right = left * (1 - heart), right * (1 - heart)
    lungs = left + right
    cv.lungs, cv.left, cv.wall = lungs, left, 0.5 - 0.035 - 2 * w
    cv.lung = (0.5 - 0.035 - w, cy, w, h)
    d = 0.08 + a["tissue"] * body - (0.36 + lung_dark) * lungs
    d += 0.12 * np.exp(-(((u - 0.5) / 0.04) ** 2)) * body  # spine
    d += 0.05 * heart
    ribs = np.cos(2 * np.pi * (v + 0.9 * (u - 0.5) ** 2) / a["rib_step"] + a["rib_phase"])
    d += 0.035 * lungs * (0.5 + 0.5 * ribs)
    clavicle = np.exp(-(((v - 0.2 + 0.15 * np.abs(u - 0.5)) / 0.012) ** 2))
    d += 0.1 * clavicle * (np.abs(u - 0.5) < 0.28) * body
    return d


def _markings(a: dict, n: int) -> np.ndarray:
    """Smooth random lung markings, fixed for the patient."""
    img = Image.fromarray(a["markings"], "F").resize((n, n), Image.BICUBIC)
    return np.asarray(img)


def _lesions(cv: _Canvas, a: dict, found: dict, draws: dict) -> np.ndarray:
    """Density added by the localised findings in ``found`` (label -> strength).

    Each pattern is ``f(canvas, x, y, grow, strength)``: its place after the
    patient's and the image's jitter, a size factor and a strength factor.
    """
    d = np.zeros_like(cv.u)
    for label, s in found.items():
        if label not in _PLACES:
            continue
        k = LABELS.index(label)
        cx, cy = np.array(_PLACES[label]) + a["offsets"][k] + draws["jitter"][k]
        d += _PATTERNS[label](cv, cx, cy, draws["grow"][k], s)
    return d


def _mass(cv, cx, cy, g, s):
    # A round, well-defined opacity larger than 3 cm: uniform, with a sharp edge.
    return 0.34 * s * cv.disk(cx, cy, 0.07 * g, 0.068 * g, 0.03)


def _nodule(cv, cx, cy, g, s):
    # Small (under 3 cm), dense and well defined.
    return 0.45 * s * cv.disk(cx, cy, 0.03 * g, 0.03 * g, 0.1)


def _fibrosis(cv, cx, cy, g, s):
    # Reticular: a net of bright lines (mesh ~6 px, lines ~2 px wide at a 128 px input,
    # so it survives the downscaling) over a faint haze.
    a, b = (cv.u + cv.v) / 0.07, (cv.u - cv.v) / 0.07
    net = np.maximum(
        np.exp(-((np.sin(np.pi * a) / 0.6) ** 2)), np.exp(-((np.sin(np.pi * b) / 0.6) ** 2))
    )
    return 0.3 * s * cv.gauss(cx, cy, 0.055 * g, 0.05 * g) * (0.2 + 0.8 * net) * cv.lungs


def _edema(cv, cx, cy, g, s):
    # Bilateral perihilar haze ("bat wings"): the place and its mirror image.
    wing = cv.gauss(cx, cy, 0.04 * g, 0.065 * g) + cv.gauss(1 - cx, cy, 0.04 * g, 0.065 * g)
    return 0.2 * s * wing


def _pneumonia(cv, cx, cy, g, s):
    # Lobar airspace opacity: sharply bounded above by the horizontal fissure, fading below.
    top = _sigmoid((cv.v - cy + 0.045 * g) / 0.006)
    return 0.32 * s * top * cv.gauss(cx, cy, 0.075 * g, 0.09 * g) * cv.lungs


def _atelectasis(cv, cx, cy, g, s):
    # A plate-like horizontal band, slightly tilted.
    tilt = cv.v - cy - 0.15 * (cv.u - cx)
    band = np.exp(-((tilt / (0.016 * g)) ** 2)) * np.exp(-(((cv.u - cx) / 0.075) ** 2))
    return 0.3 * s * band


def _effusion(cv, cx, cy, g, s):
    # Fluid filling the base of the image-left lung, its meniscus rising laterally.
    level = cy - 0.13 * g - 0.6 * (cx + 0.05 - cv.u).clip(0, None)
    return 0.36 * s * cv.left * _sigmoid((cv.v - level) / 0.015)


def _pleural_thickening(cv, cx, cy, g, s):
    # A smooth band (about 1.5 cm) lining the lateral chest wall inside the image-left lung,
    # thicker and brighter than normal pleura, following the lung's curved border; cx holds
    # only the jitter.
    lx, ly, w, h = cv.lung
    r = cv.radius(lx + cx, ly, w, h, flare=0.3)
    band = _sigmoid((r - 0.68) / 0.015) * _sigmoid((1.02 - r) / 0.015)
    lateral = _sigmoid((lx + cx - 0.35 * w - cv.u) / 0.01)
    return 0.36 * s * band * lateral * cv.gauss(lx, cy, 1.0, 0.12 * g)


def _pneumothorax(cv, cx, cy, g, s):
    # Air without lung markings beyond the edge of the collapsed lung (dark),
    # with the thin visceral pleural line at that edge.
    r = np.sqrt(((cv.u - cx + 0.08 * g) / (0.08 * g)) ** 2 + ((cv.v - cy - 0.1) / 0.12) ** 2)
    upper = (cv.lungs - cv.left) * _sigmoid((cy + 0.12 - cv.v) / 0.02)
    outside = _sigmoid((r - 1) / 0.06) * upper
    line = np.exp(-(((r - 1) / 0.04) ** 2)) * upper
    return s * (0.2 * line - 0.26 * outside)


def _infiltration(cv, cx, cy, g, s):
    # Patchy: a handful of small ill-defined spots.
    spots = np.zeros_like(cv.u)
    for ox, oy in cv.spots * g:
        spots += cv.gauss(cx + ox, cy + oy, 0.018, 0.018)
    return 0.18 * s * spots


def _consolidation(cv, cx, cy, g, s):
    # An ill-defined airspace patch (its edge fades over a third of its size) with dark air
    # bronchograms: a branching airway from the hilum side, ~2 px wide at a 128 px input.
    patch = cv.disk(cx, cy, 0.07 * g, 0.06 * g, 0.2)
    px, py = cx - 0.04 * g, cy - 0.035 * g
    airway = sum(cv.ray(px, py, angle, 0.006) for angle in (0.25, 0.75, 1.25))
    return s * patch * (0.36 - 0.24 * np.minimum(airway, 1.0))


def _hernia(cv, cx, cy, g, s):
    # A round retrocardiac density holding gas above an air-fluid level.
    sac = cv.disk(cx, cy, 0.055 * g, 0.045 * g, 0.08)
    gas = sac * _sigmoid((cy - cv.v) / 0.004) * cv.disk(cx, cy, 0.045 * g, 0.035 * g, 0.1)
    return s * (0.24 * sac - 0.45 * gas)


_PATTERNS = {
    "Mass": _mass,
    "Nodule": _nodule,
    "Fibrosis": _fibrosis,
    "Edema": _edema,
    "Pneumonia": _pneumonia,
    "Atelectasis": _atelectasis,
    "Effusion": _effusion,
    "Pleural_Thickening": _pleural_thickening,
    "Pneumothorax": _pneumothorax,
    "Infiltration": _infiltration,
    "Consolidation": _consolidation,
    "Hernia": _hernia,
}


def _image_draws(seed: int, index: int) -> dict:
    """Everything random about one image, drawn in a fixed order whatever its findings."""
    rng = _rng(seed, _STREAM_IMAGE, index)
    return {
        "shift": rng.normal(0, 0.015, 2),
        "angle": rng.normal(0, 0.02),
        "zoom": rng.uniform(0.97, 1.03),
        "contrast": rng.uniform(0.9, 1.1),
        "brightness": rng.normal(0, 0.03),
        "jitter": rng.normal(0, 0.008, (len(LABELS), 2)),
        "grow": np.exp(rng.normal(0, 0.12, len(LABELS))),
        "strength": rng.uniform(0.75, 1.25, len(LABELS)),
        "spots": rng.normal(0, 0.04, (6, 2)),
        "noise": rng,  # the rest of the stream: pixel noise
    }


def _density(found, n: int, a: dict, draws: dict, view: str) -> np.ndarray:
    """Draw one image on an n x n grid (density: higher is brighter)."""
    cv = _Canvas(n, draws)
    # Strength: the patient's (same in every follow-up) times the image's.
    strength = {
        k: a["strength"][i] * draws["strength"][i] for i, k in enumerate(LABELS) if k in found
    }
    heart = a["heart"] * (1 + 0.32 * strength.get("Cardiomegaly", 0.0))
    if view == "AP":
        heart *= 1.08  # AP films magnify the heart, as real bedside films do
    emphysema = strength.get("Emphysema", 0.0)
    d = _chest(cv, a, heart, lung_dark=0.12 * emphysema, drop=0.04 * emphysema)
    d += 0.035 * cv.lungs * _markings(a, n)
    return d + _lesions(cv, a, strength, draws)


def render_image(
    findings=(),
    size: int = 1024,
    seed: int = 0,
    index: int = 0,
    patient: int = 1,
    view: str = "PA",
    gender: str = "M",
) -> np.ndarray:
    """Render one chest image as it would be written for these metadata.

    Args:
        findings: names from ``LABELS`` present in the image.
        size: width and height in pixels.
        seed: dataset seed.
        index: image number in the dataset (keys the image's random stream).
        patient: patient ID (keys the anatomy shared by the patient's images).
        view: ``"PA"`` or ``"AP"``.
        gender: ``"M"`` or ``"F"``.

    Returns:
        A ``uint8`` array of shape ``(size, size)``.
    """
    unknown = set(findings) - set(LABELS)
    if unknown:
        raise ValueError(f"unknown finding(s) {sorted(unknown)}; known: {', '.join(LABELS)}")
    n = min(size, _BASE)
    draws = _image_draws(seed, index)
    d = _density(set(findings), n, _anatomy(seed, patient, gender == "F"), draws, view)
    contrast = draws["contrast"] * (0.92 if view == "AP" else 1.0)  # bedside films are flatter
    gray = 255 * np.clip(contrast * (d - 0.35) + 0.35 + draws["brightness"], 0, 1)
    gray = gray.astype(np.float32)
    if n != size:
        gray = np.asarray(Image.fromarray(gray, "F").resize((size, size), Image.BICUBIC))
    # Pixel noise: what makes the PNG as large as a real one.
    gray = gray + NOISE_SIGMA * draws["noise"].standard_normal((size, size), dtype=np.float32)
    return np.clip(gray + 0.5, 0, 255).astype(np.uint8)


def encode_png(pixels: np.ndarray) -> bytes:
    """PNG bytes of an 8-bit grayscale array."""
    buf = io.BytesIO()
    Image.fromarray(pixels, "L").save(buf, format="PNG", compress_level=PNG_LEVEL)
    return buf.getvalue()


def _write_one(task: tuple) -> int:
    """Render and write one image atomically; returns its size in bytes."""
    path, findings, size, seed, index, patient, view, gender = task
    data = encode_png(render_image(findings, size, seed, index, patient, view, gender))
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)  # a killed run never leaves a truncated PNG behind
    return len(data)


def finding_mass(
    label: str,
    size: int = 1024,
    seed: int = 0,
    index: int = 0,
    patient: int = 1,
    view: str = "PA",
    gender: str = "M",
) -> np.ndarray:
    """What ``label`` alone adds to an image: ``|density with it - density without|``.

    Same arguments as :func:`render_image`; the result is on the drawing grid
    (``min(size, 256)`` square, before resizing to ``size``), float32.
    """
    n = min(size, _BASE)
    draws, a = _image_draws(seed, index), _anatomy(seed, patient, gender == "F")
    return np.abs(_density({label}, n, a, draws, view) - _density(set(), n, a, draws, view))


def finding_boxes(
    findings=(),
    size: int = 1024,
    seed: int = 0,
    index: int = 0,
    patient: int = 1,
    view: str = "PA",
    gender: str = "M",
) -> dict[str, tuple[float, float, float, float]]:
    """The box ``(x, y, w, h)``, in pixels of the stored image, of each ``BOXED`` finding.

    The box bounds the grid pixels where :func:`finding_mass` is at least
    ``BOX_LEVEL`` of its peak (the image bytes are not involved).
    """
    boxes = {}
    scale = size / min(size, _BASE)
    for label in (k for k in BOXED if k in findings):
        mass = finding_mass(label, size, seed, index, patient, view, gender)
        rows, cols = np.nonzero(mass >= BOX_LEVEL * mass.max()) if mass.max() > 0 else ((), ())
        if len(rows):
            x, y = cols.min(), rows.min()
            w, h = cols.max() + 1 - x, rows.max() + 1 - y
            boxes[label] = tuple(float(round(v * scale, 3)) for v in (x, y, w, h))
    return boxes


def _box_rows(task: tuple) -> list[tuple]:
    """The box list's rows of one image (a task as for :func:`_write_one`)."""
    path, findings, size, seed, index, patient, view, gender = task
    boxes = finding_boxes(findings, size, seed, index, patient, view, gender)
    return [(Path(path).name, label, *box, "", "", "") for label, box in boxes.items()]


def write_boxes(
    out: Path, meta: pd.DataFrame, is_test: np.ndarray, args: dict, workers: int
) -> int:
    """Write ``BBox_List_2017.csv`` (when missing) for the test images; return its row count."""
    if (out / BBOX_NAME).is_file():
        return max(0, len((out / BBOX_NAME).read_text().splitlines()) - 1)
    labels = meta[list(BOXED)].to_numpy().any(axis=1)
    tasks = [t for t in _tasks(out, meta, args, every=True) if is_test[t[4]] and labels[t[4]]]
    if workers > 1 and len(tasks) > 1:
        chunk = max(1, min(16, len(tasks) // (workers * 8)))
        with ProcessPoolExecutor(max_workers=min(workers, len(tasks))) as pool:
            rows = [r for rs in pool.map(_box_rows, tasks, chunksize=chunk) for r in rs]
    else:
        rows = [r for task in tasks for r in _box_rows(task)]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(BBOX_HEADER)
    writer.writerows(rows)
    _write_text(out / BBOX_NAME, buf.getvalue())
    return len(rows)


# --- the dataset on disk ------------------------------------------------------


def _check_count(n_images) -> None:
    if isinstance(n_images, bool) or not isinstance(n_images, int | np.integer) or n_images < 1:
        raise ValueError(f"n_images must be a positive integer, got {n_images!r}")


def _arguments(n_images, size, seed, test_fraction, workers) -> dict:
    """Validate the arguments; return the ones that determine the output."""
    _check_count(n_images)
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 32:
        raise ValueError(f"size must be an integer >= 32 pixels, got {size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not 0.0 <= float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction!r}")
    if workers is not None and (not isinstance(workers, int | np.integer) or workers < 1):
        raise ValueError(f"workers must be a positive integer or None, got {workers!r}")
    return {
        "generator": "chexlib.synth",
        "format": FORMAT_VERSION,
        "n_images": int(n_images),
        "size": int(size),
        "seed": int(seed),
        "test_fraction": float(test_fraction),
    }


def _claim(out: Path, args: dict) -> None:
    """Make ``out`` ours: new or empty, or a synth output of the same arguments.

    Raises:
        FileExistsError: ``out`` holds anything else; nothing is touched.
    """
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        _check_manifest(out, args)
        for stale in (out / "images").glob("*.tmp"):  # left by a killed run
            stale.unlink()
    else:
        out.mkdir(parents=True, exist_ok=True)
        _write_text(out / MANIFEST, json.dumps(args, indent=2, sort_keys=True) + "\n")
    (out / "images").mkdir(exist_ok=True)


def _check_manifest(out: Path, args: dict) -> None:
    manifest = out / MANIFEST
    refuse = f"refusing to write into {out}; choose a new or empty directory, or delete it first"
    if not manifest.is_file():
        raise FileExistsError(
            f"{out} is not empty and has no {MANIFEST}, so it is not a synth output: {refuse}"
        )
    try:
        old = json.loads(manifest.read_text())
    except (OSError, ValueError) as err:
        raise FileExistsError(f"{manifest} is unreadable ({err}): {refuse}") from None
    if old != args:
        diffs = [
            f"{k}={old.get(k)!r} on disk vs {args.get(k)!r} asked"
            for k in sorted(set(old) | set(args))
            if old.get(k) != args.get(k)
        ]
        raise FileExistsError(
            f"{out} holds a synth dataset made with other arguments ({'; '.join(diffs)}): {refuse}"
        )


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_tables(out: Path, meta: pd.DataFrame, is_test: np.ndarray) -> None:
    """Write the CSV and the two split lists (only those missing: they are deterministic)."""
    if not (out / CSV_NAME).is_file():
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(CSV_HEADER)
        for row in meta[list(CSV_COLUMNS)].itertuples(index=False, name=None):
            writer.writerow((*row, ""))  # the real rows end with a comma too
        _write_text(out / CSV_NAME, buf.getvalue())
    names = meta["Image Index"].to_numpy()
    for list_name, chosen in ((TRAIN_VAL_LIST, ~is_test), (TEST_LIST, is_test)):
        if not (out / list_name).is_file():
            _write_text(out / list_name, "".join(f"{n}\n" for n in sorted(names[chosen])))


def _tasks(out: Path, meta: pd.DataFrame, args: dict, every: bool = False) -> list[tuple]:
    """One task per image not yet on disk (so an interrupted run resumes), or per image."""
    tasks = []
    labels = meta[list(LABELS)].to_numpy().astype(bool)
    cols = ("Image Index", "Patient ID", "View Position", "Patient Gender")
    for index, (name, patient, view, gender) in enumerate(meta[list(cols)].itertuples(index=False)):
        path = out / "images" / name
        if every or not path.is_file():
            findings = tuple(k for k, on in zip(LABELS, labels[index], strict=True) if on)
            tasks.append(
                (str(path), findings, args["size"], args["seed"], index, int(patient), view, gender)
            )
    return tasks


def _render_all(tasks: list[tuple], workers: int, progress: bool) -> None:
    if not tasks:
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=len(tasks), desc="synth", unit="img", disable=not progress)
    with bar:
        if workers == 1 or len(tasks) <= 1:
            for task in tasks:
                _write_one(task)
                bar.update()
            return
        chunk = max(1, min(16, len(tasks) // (workers * 8)))
        with ProcessPoolExecutor(max_workers=min(workers, len(tasks))) as pool:
            for _ in pool.map(_write_one, tasks, chunksize=chunk):
                bar.update()


def generate(
    out_dir: str | Path,
    n_images: int = 2000,
    size: int = 1024,
    seed: int = 0,
    workers: int | None = None,
    test_fraction: float = 0.2,
    progress: bool = True,
) -> dict:
    """Write a dataset in the NIH ChestX-ray14 layout (see the module docstring).

    Rerunning with the same arguments only renders the images still missing,
    so an interrupted run resumes and a finished one returns at once.

    Args:
        out_dir: folder to create or fill; must be new, empty, or a synth
            output of the same arguments.
        n_images: number of images (and CSV rows).
        size: width and height of every PNG in pixels (NIH: 1024).
        seed: seed of everything drawn; same arguments give the same bytes.
        workers: processes rendering images (default: ``os.cpu_count()``);
            does not change the output.
        test_fraction: fraction of images, as whole patients, in test_list.txt.
        progress: show a progress bar.

    Returns:
        A summary: image, patient and split counts, No Finding fraction,
        bytes on disk, images rendered by this call, rows of the box list
        (``boxes``), and timings.

    Raises:
        ValueError: an argument is out of range.
        FileExistsError: ``out_dir`` holds something else (nothing is touched).
    """
    start = time.perf_counter()
    args = _arguments(n_images, size, seed, test_fraction, workers)
    workers = int(workers or os.cpu_count() or 1)
    out = Path(out_dir)
    _claim(out, args)
    meta = sample_metadata(args["n_images"], args["seed"])
    is_test = split_by_patient(meta, args["test_fraction"], args["seed"])
    write_tables(out, meta, is_test)
    tasks = _tasks(out, meta, args)
    render_start = time.perf_counter()
    _render_all(tasks, workers, progress)
    render_seconds = time.perf_counter() - render_start
    boxes = write_boxes(out, meta, is_test, args, workers)
    summary = _summary(out, meta, is_test, args, len(tasks), workers, start, render_seconds)
    return {**summary, "boxes": boxes, "seconds": round(time.perf_counter() - start, 3)}


def _summary(out, meta, is_test, args, rendered, workers, start, render_seconds) -> dict:
    total = sum((out / "images" / n).stat().st_size for n in meta["Image Index"])
    patients = meta["Patient ID"]
    return {
        "out_dir": str(out),
        "images": len(meta),
        "patients": int(patients.nunique()),
        "train_val_images": int((~is_test).sum()),
        "test_images": int(is_test.sum()),
        "test_patients": int(patients[is_test].nunique()),
        "no_finding": round(float((meta["Finding Labels"] == NO_FINDING).mean()), 4),
        "size": args["size"],
        "seed": args["seed"],
        "bytes": int(total),
        "mean_image_kb": round(total / len(meta) / 1024, 1),
        "rendered": rendered,
        "already_present": len(meta) - rendered,
        "workers": workers,
        "render_seconds": round(render_seconds, 3),
        "images_per_second": round(rendered / render_seconds, 2) if rendered else None,
        "seconds": round(time.perf_counter() - start, 3),
    }


# --- command line -------------------------------------------------------------


def add_arguments(parser) -> None:
    parser.add_argument("out_dir", help="folder to write (new, empty, or an earlier synth output)")
    parser.add_argument("--images", type=int, default=2000, help="number of images (default 2000)")
    parser.add_argument(
        "--size", type=int, default=1024, help="image width and height in pixels (default 1024)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed; same arguments give the same bytes (default 0)"
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="rendering processes (default: all cores)"
    )
    parser.add_argument(
        "--test-fraction",
        type=float,
        default=0.2,
        help="fraction of images in test_list.txt (default 0.2)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args) -> int:
    """``chexlib synth OUT_DIR``: generate (or finish) a dataset and print its summary."""
    try:
        summary = generate(
            args.out_dir,
            n_images=args.images,
            size=args.size,
            seed=args.seed,
            workers=args.workers,
            test_fraction=args.test_fraction,
            progress=not args.no_progress,
        )
    except (FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    width = max(map(len, summary))
    for key, value in summary.items():
        print(f"{key:<{width}}  {value}")
    return 0
