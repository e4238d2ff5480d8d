"""The images of the generated dataset: a chest, its planted findings, and their boxes.

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

NIH publishes radiologists' boxes for some test images
(``BBox_List_2017.csv``, x, y, w, h in pixels of the 1024 px image). Here
every finding drawn at a place (``BOXED``: the localised patterns and the
heart of Cardiomegaly; not Emphysema, which darkens both lungs) gets the
box of its own pattern: the finding is drawn alone, as the difference it
makes to the image's density, and the box bounds the pixels where that
difference is at least ``BOX_LEVEL`` of its peak, in pixels of the stored
image (:func:`finding_boxes`). Edema's box spans both of its wings.

An image depends only on its arguments: its draws come from streams keyed by
(seed, patient) and (seed, image number)
(:func:`chexlib.synth.metadata.seeded_stream`).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from chexlib.data.metadata import LABELS
from chexlib.synth.metadata import STREAM_IMAGE, STREAM_PATIENT, seeded_stream

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
    rng = seeded_stream(seed, STREAM_PATIENT, patient)
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
    rng = seeded_stream(seed, STREAM_IMAGE, index)
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


# --- boxes --------------------------------------------------------------------


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
