"""The metadata of the generated dataset: patients, follow-ups, findings, views and splits.

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

Everything is drawn from streams addressed by (seed, key)
(:func:`seeded_stream`): the metadata from one, the split from another, so
:mod:`chexlib.synth.image` can key each image's own streams the same way.
"""

from __future__ import annotations

from statistics import NormalDist

import numpy as np
import pandas as pd

from chexlib.data.metadata import LABELS, NO_FINDING

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


def seeded_stream(seed: int, *key: int) -> np.random.Generator:
    """An independent stream per (seed, key): like SeedSequence.spawn, but addressable."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


# The first key of each stream: what it draws (the image model uses the last two).
STREAM_META, STREAM_SPLIT, STREAM_PATIENT, STREAM_IMAGE = range(4)


def check_count(n_images) -> None:
    """Raise ValueError unless ``n_images`` is a positive integer."""
    if isinstance(n_images, bool) or not isinstance(n_images, int | np.integer) or n_images < 1:
        raise ValueError(f"n_images must be a positive integer, got {n_images!r}")


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
    check_count(n_images)
    rng = seeded_stream(seed, STREAM_META)
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
    order = seeded_stream(seed, STREAM_SPLIT).permutation(len(sizes))
    target, count, chosen = test_fraction * len(meta), 0, []
    for pid, n in zip(sizes.index[order], sizes.to_numpy()[order], strict=True):
        if abs(count + n - target) < abs(count - target):
            chosen.append(pid)
            count += n
    return meta["Patient ID"].isin(chosen).to_numpy()
