"""chexlib.explain.gradcam: scores on hand-made heatmaps, Grad-CAM of a trained tiny run, the CLI, notebook 06."""

from __future__ import annotations

import json
import shutil
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from chexlib.data.metadata import LABELS
from chexlib.explain import gradcam

# --- scores on hand-made heatmaps and boxes ---------------------------------------------


def test_box_mask_takes_the_pixels_whose_centres_are_inside():
    mask = gradcam.box_mask((1.0, 2.0, 3.0, 2.0), (6, 8))
    assert mask.sum() == 6 and mask[2:4, 1:4].all()
    assert gradcam.box_mask((0.6, 0.6, 0.8, 0.8), (4, 4)).sum() == 0  # holds no pixel centre


def test_pointing_game_on_a_known_heatmap():
    heat = np.zeros((10, 10))
    heat[2, 3] = 1.0
    heat[7, 7] = 0.9
    assert gradcam.peak(heat) == (2, 3)
    assert gradcam.pointing_hit(heat, (3, 2, 1, 1))  # x=3, y=2: exactly the peak's pixel
    assert gradcam.pointing_hit(heat, (0, 0, 5, 5))
    assert not gradcam.pointing_hit(heat, (6, 6, 3, 3))  # holds the runner-up only
    assert not gradcam.pointing_hit(np.zeros((10, 10)), (0, 0, 10, 10))  # nothing pointed at


def test_iou_of_the_thresholded_heatmap_with_the_box():
    heat = np.zeros((10, 10))
    heat[2:6, 2:6] = 1.0  # 16 pixels above half the maximum
    heat[8, 8] = 0.4  # below half: not in the mask
    assert gradcam.heat_iou(heat, (2, 2, 4, 2)) == pytest.approx(8 / 16)
    assert gradcam.heat_iou(heat, (2, 2, 4, 4)) == pytest.approx(1.0)
    assert gradcam.heat_iou(heat, (2, 2, 4, 4), threshold=0.3) == pytest.approx(16 / 17)
    assert gradcam.heat_iou(heat, (7, 0, 3, 3)) == 0.0
    assert gradcam.heat_iou(np.zeros((4, 4)), (0, 0, 2, 2)) == 0.0


def test_boxes_scale_from_stored_pixels_to_the_model_input():
    assert gradcam.scale_box((512, 256, 100, 50), (1024, 1024), 128) == (64, 32, 12.5, 6.25)
    assert gradcam.scale_box((10, 10, 20, 20), (200, 100), 50) == (5, 2.5, 10, 5)


def test_summary_averages_findings_with_equal_weight():
    scores = pd.DataFrame(
        {
            "finding": ["Mass"] * 3 + ["Nodule"],
            "hit": [True, True, False, False],
            "iou": [0.5, 0.3, 0.1, 0.0],
            "box_fraction": [0.1, 0.1, 0.1, 0.02],
        }
    )
    s = gradcam.summarize(scores)
    assert s["boxes"] == 4 and s["findings_with_boxes"] == 2
    assert s["hit_rate"] == pytest.approx((2 / 3 + 0) / 2)
    assert s["hit_rate_pooled"] == pytest.approx(0.5)
    assert s["mean_iou"] == pytest.approx((0.3 + 0.0) / 2)
    assert s["hit_rate_chance"] == pytest.approx(0.06)
    assert s["per_finding"]["Mass"]["boxes"] == 3
    table = gradcam.finding_table(s)
    assert list(table.index) == ["Mass", "Nodule", "mean over findings"]
    assert gradcam.summarize(scores.iloc[:0])["hit_rate"] is None


def test_reads_nih_box_list_with_its_spelling(tmp_path):
    (tmp_path / gradcam.BBOX_NAME).write_text(
        "Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
        "00013118_008.png,Atelectasis,225.08,547.02,86.78,79.19,,,\n"
        "00014716_007.png,Infiltrate,686.1,422.3,82.1,127.1,,,\n"
    )
    boxes = gradcam.read_boxes(tmp_path)
    assert list(boxes.columns) == ["image", "finding", "x", "y", "w", "h"]
    assert list(boxes["finding"]) == ["Atelectasis", "Infiltration"]
    assert boxes.loc[0, "w"] == pytest.approx(86.78)
    assert gradcam.read_boxes(tmp_path / "nothing") is None
    (tmp_path / gradcam.BBOX_NAME).write_text(
        "Image Index,Finding Label,Bbox [x,y,w,h],,,\na.png,Cat,1,2,3,4,,,\n"
    )
    with pytest.raises(gradcam.ExplainError, match="unknown finding"):
        gradcam.read_boxes(tmp_path)


def test_config_validates():
    with pytest.raises(gradcam.ExplainError, match="run must name"):
        gradcam.ExplainConfig(data="d")
    with pytest.raises(gradcam.ExplainError, match="threshold"):
        gradcam.ExplainConfig(run="r", data="d", threshold=1.5)


def test_find_run_looks_inside_a_stage_folder(tmp_path):
    run = tmp_path / "learning" / "abc123" / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "params.json").write_text("{}")
    (run / "checkpoints" / "latest.json").write_text("{}")
    assert gradcam.find_run(run) == run
    assert gradcam.find_run(run.parent) == run
    assert gradcam.find_run(tmp_path / "learning") == run
    other = tmp_path / "learning" / "def456" / "run"
    other.mkdir(parents=True)
    (other / "params.json").write_text("{}")
    (other / "checkpoints").mkdir()
    (other / "checkpoints" / "latest.json").write_text("{}")
    with pytest.raises(gradcam.ExplainError, match="2 trained runs"):
        gradcam.find_run(tmp_path / "learning")
    assert gradcam.find_run(tmp_path / "learning" / "def*") == other
    with pytest.raises(gradcam.ExplainError, match="2 folders match"):
        gradcam.find_run(tmp_path / "learning" / "*")


# --- Grad-CAM of a real trained run ------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(synth_dir, tmp_path_factory):
    """The tiny test CNN trained 2 epochs at 64 px on the suite's generated set (with boxes)."""
    from chexlib.train.config import TrainConfig
    from chexlib.train.recipe import train

    out = tmp_path_factory.mktemp("explain") / "run"
    config = TrainConfig(
        data=str(synth_dir),
        out=str(out),
        model="tiny",
        image_size=64,
        batch_size=16,
        epochs=2,
        warmup_epochs=0,
        learning_rate=2e-3,
        evaluate=False,
        verbose=0,
        throughput_warmup_steps=1,
        throughput_window_steps=1,
    )
    train(config)
    return out


def test_synth_dir_has_boxes_for_the_explained_images(synth_dir):
    boxes = gradcam.read_boxes(synth_dir)
    assert boxes is not None and len(boxes) > 0


def test_heatmaps_have_the_input_shape_and_real_values(tiny_run, synth_dir):
    from chexlib.data.metadata import load_metadata

    net, params = gradcam.load_run_model(tiny_run)
    assert (params["model"], params["image_size"]) == ("tiny", 64)
    assert gradcam.last_conv_layer(net) == "tiny_relu3"
    chosen = gradcam.select_images(load_metadata(synth_dir), gradcam.read_boxes(synth_dir), 4)
    gray, x, stored = gradcam.load_images(chosen["path"], 64, "tiny")
    assert gray.shape == (4, 64, 64) and gray.dtype == np.uint8 and stored[0] == (128, 128)
    maps, probs = gradcam.heatmaps(net, x, [0, 2, 4])
    assert maps.shape == (4, 3, 64, 64) and probs.shape == (4, len(LABELS))
    assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1 + 1e-6
    lit = [m for m in maps.reshape(12, 64, 64) if m.max() > 0]
    assert lit and all(np.isclose(m.max(), 1.0) for m in lit)
    assert all(m.std() > 0.01 and (m > 0.5).mean() < 0.9 for m in lit)  # not flat
    assert np.allclose(probs, np.asarray(net(x, training=False)), atol=1e-5)
    # Grad-CAM computed here on its own (a tape on the layer and the class's output) agrees
    # for every class, the dark ones too (all of a class's evidence negative: a zero map)
    n = len(LABELS)
    every, _ = gradcam.heatmaps(net, x, list(range(n)))
    ours = np.stack([_independent_gradcam(net, x, "tiny_relu3", k) for k in range(n)], axis=1)
    np.testing.assert_allclose(every, ours, atol=1e-4)
    np.testing.assert_allclose(every[:, [0, 2, 4]], maps, atol=1e-6)  # any choice of classes
    # each map is its own class's: any other class lit in the same image has another map
    lit = ours.reshape(4, n, -1).max(axis=2) > 0
    pairs = [
        (i, a, b) for i in range(4) for a in np.flatnonzero(lit[i]) for b in np.flatnonzero(lit[i])
    ]
    pairs = [(i, a, b) for i, a, b in pairs if a != b]
    assert len(pairs) >= 4  # classes lit together: the check below means something
    for i, a, b in pairs:
        assert np.abs(every[i, a] - ours[i, b]).max() > 0.1, (i, LABELS[a], LABELS[b])


def _independent_gradcam(net, x, layer: str, k: int) -> np.ndarray:
    """Grad-CAM of class ``k`` by the paper's recipe, with a tape on the model itself:
    weights = mean over space of d output_k / d activations, cam = ReLU(sum_c weights_c
    A_c), upsampled with chexlib's matrix (tested on its own below), ReLU (the cubic
    kernel's undershoot), divided by its maximum.

    The model's output is sigmoid(logit): its gradient is the logit's times
    p (1 - p) > 0, the same for every cell of an image, which the division by the
    maximum removes; so this equals Grad-CAM of the logit, as the module computes it.
    """
    import tensorflow as tf

    probe = tf.keras.Model(net.inputs, [net.get_layer(layer).output, net.output])
    with tf.GradientTape() as tape:
        acts, out = probe(tf.constant(x), training=False)
        score = tf.reduce_sum(out[:, k])  # each image's output depends on its own input only
    grads = tape.gradient(score, acts).numpy().astype(np.float64)
    acts = acts.numpy().astype(np.float64)
    weights = grads.mean(axis=(1, 2), keepdims=True)
    cam = np.maximum((weights * acts).sum(axis=-1), 0.0)  # [B, h, w]
    (r0, rstep), (c0, cstep) = gradcam.feature_grid(gradcam.cam_model(net, layer))
    size = x.shape[1]
    rows = gradcam.upsampling_matrix(cam.shape[1], size, r0, rstep)
    cols = gradcam.upsampling_matrix(cam.shape[2], size, c0, cstep)
    up = np.maximum(np.einsum("yh,bhw,xw->byx", rows, cam, cols), 0.0)
    top = up.max(axis=(1, 2), keepdims=True)
    return np.divide(up, top, out=np.zeros_like(up), where=top > 0)


@pytest.mark.parametrize("kernel", gradcam.UPSAMPLING)
def test_upsampling_puts_each_cell_at_its_centre(kernel):
    m = gradcam.upsampling_matrix(4, 64, 15.5, 16.0, kernel)  # the tiny CNN's 4 x 4 map at 64 px
    assert m.shape == (64, 4) and np.allclose(m.sum(axis=1), 1.0)
    assert all(m[15 + 16 * j, j] == 1.0 for j in range(4))  # pixels 15, 31, ...: not 8, 24, ...
    assert m[39, 1] == pytest.approx(m[39, 2])  # halfway (a plain resize centres cell 2 at 40)
    assert np.allclose(m[:16, 0], 1.0)  # constant before the first centre, as tf.image.resize


def test_a_bicubic_peak_can_fall_between_cell_centres():
    # Two neighbouring strong cells, the right one a little stronger: the evidence lies
    # between their centres. Bilinear can only point at a centre; bicubic points between.
    cells = np.array([0.0, 0.2, 0.9, 1.0, 0.2, 0.0, 0.0, 0.0])
    peaks = {
        k: int(np.argmax(gradcam.upsampling_matrix(8, 128, 15.5, 16.0, k) @ cells))
        for k in gradcam.UPSAMPLING
    }
    assert peaks["bilinear"] == 15 + 16 * 3  # the stronger cell's centre, pixel 63
    assert 47 < peaks["bicubic"] < 63  # between the two centres
    flat = gradcam.upsampling_matrix(8, 128, 15.5, 16.0, "bicubic") @ np.ones(8)
    assert np.allclose(flat, 1.0)  # a constant map stays constant
    with pytest.raises(gradcam.ExplainError, match="upsampling"):
        gradcam.upsampling_matrix(8, 128, 15.5, 16.0, "nearest")


@pytest.mark.parametrize("kernel", gradcam.UPSAMPLING)
def test_a_peak_on_the_border_plateau_is_its_cell_centre(kernel):
    m = gradcam.upsampling_matrix(4, 64, 15.5, 16.0, kernel)  # the tiny CNN's map at 64 px
    cells = np.array([1.0, 0.6, 0.3, 0.1])  # the first cell strongest, on both axes
    heat = np.outer(m @ cells, m @ cells)
    assert gradcam.pointing_hit(heat, (8, 8, 16, 16))  # a box around cell (0, 0)'s centre
    assert gradcam.peak(heat) == (15, 15)
    last = np.outer(m @ cells[::-1], m @ cells[::-1])  # the last cell strongest
    assert gradcam.peak(last) == (63, 63)  # its centre, 15.5 + 3 x 16: the last pixel


@pytest.mark.parametrize("size,layer", [(64, ""), (128, "tiny_relu2")])
def test_feature_grid_is_where_the_receptive_fields_are(size, layer):
    # TensorFlow's 'same' stride-2 convolutions pad after the image: each one moves the
    # grid half an input pixel; measured here as the middle of the pixels a cell sees.
    import tensorflow as tf

    from chexlib.train.models import build_model

    cams = gradcam.cam_model(build_model("tiny", size), layer)
    (r0, rstep), (c0, cstep) = gradcam.feature_grid(cams)
    # the model takes uint8 grey: follow the gradient to its first layer's float output
    after_input = tf.keras.Model(cams.get_layer("gray_to_backbone").output, cams.outputs[0])
    x = tf.random.normal([4, size, size, 3], seed=0)
    with tf.GradientTape() as tape:
        tape.watch(x)
        features = after_input(x, training=False)
        j = features.shape[1] // 2
        picked = tf.reduce_sum(features[:, j, j, :])
    seen = tf.reduce_sum(tf.abs(tape.gradient(picked, x)), axis=(0, 3)).numpy() > 0
    rows, cols = np.nonzero(seen.any(axis=1))[0], np.nonzero(seen.any(axis=0))[0]
    assert rstep == cstep == size / features.shape[1]
    assert (rows.min() + rows.max() + 1) / 2 == r0 + j * rstep
    assert (cols.min() + cols.max() + 1) / 2 == c0 + j * cstep


@pytest.mark.parametrize("model,layer", [("densenet121", "relu"), ("resnet50", "conv5_block3_out")])
def test_the_last_convolutional_block_of_the_real_models(model, layer):
    from chexlib.train.models import build_model

    net = build_model(model, 64)
    assert gradcam.last_conv_layer(net) == layer
    x = np.random.default_rng(0).standard_normal((1, 64, 64, 3)).astype(np.float32)
    maps, _ = gradcam.heatmaps(net, x, [3])
    assert maps.shape == (1, 1, 64, 64) and np.isfinite(maps).all()


def test_cli_writes_overlays_scores_and_summary(tiny_run, synth_dir, tmp_path):
    from chexlib.cli.main import main

    out = tmp_path / "explained"
    argv = ["explain", str(tiny_run), "--data", str(synth_dir), "--images", "6", "--out", str(out)]
    assert main(argv) == 0
    summary = json.loads((out / gradcam.SUMMARY_JSON).read_text())
    assert (
        summary["images"] == 6 and summary["model"] == "tiny" and summary["layer"] == "tiny_relu3"
    )
    scores = pd.read_csv(out / gradcam.LOCALIZATION_CSV)
    assert list(scores.columns) == list(gradcam.SCORE_COLUMNS)
    boxes = gradcam.read_boxes(synth_dir)
    chosen = set(pd.read_csv(out / gradcam.HEATMAPS_CSV)["image"])
    assert len(chosen) == 6 and len(scores) == boxes["image"].isin(chosen).sum() == summary["boxes"]
    assert summary["boxes"] > 0 and 0 < summary["hit_rate_chance"] < 1
    peaks = scores[["peak_x", "peak_y"]].dropna()  # a flat-zero map has none (a miss)
    assert ((peaks >= 0) & (peaks < 64)).all().all()
    _check_hit_rate(summary, scores)
    heat = pd.read_csv(out / gradcam.HEATMAPS_CSV)
    assert heat["boxed"].sum() == len(scores) and (heat.groupby("image").size() >= 3).all()
    with Image.open(out / heat["overlay"].iloc[0]) as img:
        assert img.mode == "RGB" and img.size == (256, 256)
    assert main(["explain", str(tiny_run / "nowhere"), "--data", str(synth_dir)]) == 2

    # The tiny run points at none of synth's small boxes (a hit rate of 0, which a
    # miscount would give too). So once more with boxes it can hit: half-images (right or
    # bottom half, alternating), finding k on the first 1 + k % 6 of six test images (so
    # findings weigh unequally). A flat-zero map has no peak written (a miss by the
    # module's rule; NaN compares false below), so the peak alone decides every hit.
    data = tmp_path / "data"
    shutil.copytree(synth_dir, data)
    from chexlib.data.metadata import load_metadata

    meta = load_metadata(data)
    names = sorted(meta.loc[meta["split"] == "test", "image"])[:6]
    with Image.open(meta.set_index("image").loc[names[0], "path"]) as img:
        side = img.size[0]  # synth's images are square
    half = [(side // 2, 0, side // 2, side), (0, side // 2, side, side // 2)]  # x, y, w, h
    rows = [
        (name, finding, *half[(i + k) % 2])
        for k, finding in enumerate(LABELS)
        for i, name in enumerate(names[: 1 + k % 6])
    ]
    pd.DataFrame(rows, columns=["Image Index", "Finding Label", "x", "y", "w", "h"]).to_csv(
        data / gradcam.BBOX_NAME, index=False
    )
    out = tmp_path / "halves"
    assert main(["explain", str(tiny_run), "--data", str(data), "--out", str(out)]) == 0
    summary = json.loads((out / gradcam.SUMMARY_JSON).read_text())
    scores = pd.read_csv(out / gradcam.LOCALIZATION_CSV)
    assert summary["images"] == 6 and len(scores) == len(rows) == summary["boxes"]
    _check_hit_rate(summary, scores)
    assert 0 < scores["hit"].sum() < len(scores)  # hits and misses to count
    # findings weigh equally: not the pooled rate (else the check above could not tell)
    assert summary["hit_rate"] != pytest.approx(summary["hit_rate_pooled"])


def _check_hit_rate(summary: dict, scores: pd.DataFrame) -> None:
    """The summary's hit rates again, from the peaks and boxes written in localization.csv.

    A hit: the peak pixel's centre lies in the box (both in model input pixels); each
    finding's rate, then their mean (equal weight), and the pooled rate over all boxes.
    """
    cx, cy = scores["peak_x"] + 0.5, scores["peak_y"] + 0.5
    hits = (
        (scores["box_x"] <= cx)
        & (cx < scores["box_x"] + scores["box_w"])
        & (scores["box_y"] <= cy)
        & (cy < scores["box_y"] + scores["box_h"])
    )
    assert hits.tolist() == scores["hit"].tolist()
    rates = [Fraction(int(h.sum()), len(h)) for _, h in hits.groupby(scores["finding"])]
    assert summary["findings_with_boxes"] == len(rates)
    # exact fractions against the module's float means: equal up to float rounding; one
    # hit more or less moves a rate by at least 1 / (findings x boxes), far above 1e-12
    assert summary["hit_rate"] == pytest.approx(float(sum(rates) / len(rates)), rel=1e-12)
    assert summary["hit_rate_pooled"] == pytest.approx(hits.sum() / len(hits), rel=1e-12)


@pytest.mark.slow
def test_explain_notebook_records_the_score(tiny_run, synth_dir, tmp_path):
    from chexlib.study.notebook import run_notebook

    out = tmp_path / "nb"
    params = {
        "RUN_DIR": str(tiny_run.parent),
        "DATA_DIR": str(synth_dir),
        "IMAGES": 4,
        "OUTPUT_DIR": str(out),
    }
    run_notebook("06_explain", out / "06_explain.ipynb", params)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 4 and "hit_rate" in metrics and "per_finding" in metrics
    assert json.loads((out / "params.json").read_text())["images"] == 4
    assert (out / "overlays.png").stat().st_size > 0 and (out / gradcam.LOCALIZATION_CSV).is_file()
