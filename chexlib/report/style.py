"""One colour per meaning, shared by every figure of the study (no TensorFlow here).

Pipelines, inputs, the synthetic ceiling and published numbers each keep their
colour across figures, so a reader who learned "orange is naive" in one figure
can read the next without its legend.
"""

from __future__ import annotations

PIPELINE_COLORS = {"naive": "#d95f02", "optimized": "#1b9e77"}
INPUT_COLORS = {
    "raw PNG": "#7570b3",
    "png-records": "#e7298a",
    "compact-records": "#66a61e",
    "records": "#a6761d",
}
SYNTHETIC_COLOR = "#666666"  # the synthetic-data ceiling
THEIRS_COLOR = "#000000"  # published numbers (the poster, CheXNet), always marked "theirs"
TARGET_COLOR = "#e41a1c"  # thresholds of the verdicts
