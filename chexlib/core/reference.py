"""Published numbers we compare with, in one place, each marked with its source.

All of these are *theirs* (from ``../shared/REFERENCE.md``, which cites the
papers, the poster and the benchmark pages); figures and tables that show them
say so. Nothing here is measured by chexlib.
"""

from __future__ import annotations

# Rajpurkar et al. 2017 (CheXNet), official NIH test split.
CHEXNET_TEST_AUROC = {
    "Atelectasis": 0.809, "Cardiomegaly": 0.925, "Effusion": 0.864, "Infiltration": 0.735,
    "Mass": 0.868, "Nodule": 0.780, "Pneumonia": 0.768, "Pneumothorax": 0.889,
    "Consolidation": 0.790, "Edema": 0.888, "Emphysema": 0.937, "Fibrosis": 0.805,
    "Pleural_Thickening": 0.806, "Hernia": 0.916,
}  # fmt: skip
CHEXNET_MEAN_AUROC = 0.841

# Vasudev et al., SC'19 poster, on their own 10 % validation split.
POSTER_VAL_AUROC = {
    "Atelectasis": 0.816, "Cardiomegaly": 0.876, "Effusion": 0.890, "Infiltration": 0.673,
    "Mass": 0.823, "Nodule": 0.716, "Pneumonia": 0.833, "Pneumothorax": 0.695,
    "Consolidation": 0.799, "Edema": 0.871, "Emphysema": 0.893, "Fibrosis": 0.785,
    "Pleural_Thickening": 0.751, "Hernia": 0.833,
}  # fmt: skip
POSTER_MEAN_AUROC = 0.804

# The poster: DenseNet121, FP32, TFRecords, images/s in total on V100 GPUs.
POSTER_THROUGHPUT = {
    1: 185.12, 2: 315.26, 3: 421.85, 4: 589.36, 8: 1116.99, 12: 1527.60, 16: 1912.82,
}  # fmt: skip
# The poster: TFRecords (full-size PNG bytes) over raw PNG files, % images/s, 4 GPUs.
POSTER_RECORDS_GAIN = {"resnet50": 8.39, "densenet121": 13.1}
POSTER_RECORDS_GAIN_SETUP = "4 V100s"  # where the poster measured that gain
POSTER_HARDWARE = "poster: PowerEdge C4140, 4x V100 per node, TF 1.12, Horovod 0.16.4"
POSTER_NODE = {"gpus": 4, "cores": 40, "name": "the poster's node (4x V100, 40 cores)"}
BIG_NODE = {"gpus": 8, "cores": 112, "name": "an 8-GPU node with 112 cores"}

# Per-GPU training images/s used by the feeding projection, with their source.
# DenseNet121 is taken as 0.88x ResNet-50 where only ResNet-50 is published
# (timm's training benchmark, AMP, 224 px: 730 vs 826 images/s on one RTX 3090).
DENSENET_PER_RESNET = 730 / 826
_DLE = "NVIDIA DeepLearningExamples, PyTorch ResNet-50 v1.5 (21.03)"
GPU_RATES = [
    # gpu, precision, model, images/s, source
    ("V100", "FP32", "densenet121", 185.12, "the poster (TF 1.12, its own pipeline)"),
    ("V100", "FP32", "resnet50", 367.0, _DLE + ", V100-16GB"),
    ("V100", "AMP", "resnet50", 1200.0, _DLE + ", V100-16GB"),
    ("A100", "TF32", "resnet50", 938.0, _DLE + ", A100-80GB"),
    ("A100", "AMP", "resnet50", 2470.0, _DLE + ", A100-80GB"),
]
# No published per-GPU H100 training rate for ResNet-50 or DenseNet121 was found
# (MLPerf publishes time to train, not a per-GPU rate); the projection says so.
MISSING_RATES = {"H100": "no published per-GPU training rate found for ResNet-50 or DenseNet121"}

# For the scaling projection (chexlib.report.allreduce_model).
# The poster's weak-scaling efficiency, as it states it (images/s(N) / (N x images/s(1))).
POSTER_EFFICIENCY = {4: 0.796, 16: 0.646}
POSTER_BATCH_PER_GPU = 64  # the poster's local batch per Horovod rank
# The poster's interconnect: EDR InfiniBand, 4x links at 100 Gbit/s (InfiniBand Trade
# Association's EDR data rate).
POSTER_LINK = {"name": "EDR InfiniBand", "gbit_per_s": 100.0}
# Gradients allreduced per step = trainable parameters with chexlib's 14-label head:
# Keras Applications' totals with their 1000-class top (keras.io/api/applications:
# DenseNet121 8,062,504, ResNet50 25,636,712), minus that top (1024 or 2048 x 1000 + 1000),
# minus the BatchNorm moving statistics (not trained: 83,648 and 53,120), plus Dense(14).
MODEL_PARAMS = {
    "densenet121": 8_062_504 - 1_025_000 - 83_648 + (1024 * 14 + 14),  # 6,968,206
    "resnet50": 25_636_712 - 2_049_000 - 53_120 + (2048 * 14 + 14),  # 23,563,278
}
