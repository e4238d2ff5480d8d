"""chexlib.pipeline.builders: one preprocessing path, naive == optimized, sharding, shuffling, service."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from PIL import Image

from chexlib.data.metadata import LABELS
from chexlib.data.png import read_grayscale
from chexlib.pipeline import builders, config, decode
from chexlib.pipeline import sources as pipeline_sources

SIZE = 48  # model input side: small keeps the tests fast
BATCH = 8


@pytest.fixture(scope="module")
def png_records(synth_dir, tmp_path_factory):
    from chexlib.records import convert

    out = tmp_path_factory.mktemp("records") / "png"
    convert.convert(synth_dir, out, variant="png", images_per_shard=16, workers=2, progress=False)
    return out


@pytest.fixture(scope="module")
def compact_records(synth_dir, tmp_path_factory):
    from chexlib.records import convert

    out = tmp_path_factory.mktemp("records") / "compact"
    convert.convert(
        synth_dir, out, variant="compact", size=64, images_per_shard=16, workers=2, progress=False
    )
    return out


@pytest.fixture(scope="module")
def sources(synth_metadata, png_records, compact_records):
    """name -> keyword arguments of build_dataset selecting that source."""
    return {
        "raw": {"source": "raw", "metadata": synth_metadata},
        "png": {"source": "records", "records_dir": png_records},
        "compact": {"source": "records", "records_dir": compact_records},
    }


def build(spec, split="train", **kw):
    kw = {"batch_size": BATCH, "image_size": SIZE, **kw}
    return builders.build_dataset(
        spec["source"],
        split,
        metadata=spec.get("metadata"),
        records_dir=spec.get("records_dir"),
        **kw,
    )


def collect(ds, batches=None):
    """(names, images, labels) of a dataset built with return_names=True."""
    names, images, labels = [], [], []
    for i, (x, y, n) in enumerate(ds):
        if batches is not None and i >= batches:
            break
        names += [s.decode() for s in n.numpy()]
        images.append(x.numpy())
        labels.append(y.numpy())
    return names, np.concatenate(images), np.concatenate(labels)


def split_names(md, split):
    return md.loc[md["split"] == split, "image"].tolist()


# --- the one preprocessing path --------------------------------------------------


@pytest.mark.parametrize(
    "model,keras_module", [("densenet121", "densenet"), ("resnet50", "resnet50")]
)
def test_normalisation_matches_keras_applications(model, keras_module):
    gray = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 1), dtype=np.uint8)
    ours = builders.normalize(tf.constant(gray), model).numpy()
    preprocess = getattr(tf.keras.applications, keras_module).preprocess_input
    theirs = preprocess(np.repeat(gray, 3, axis=-1).astype(np.float32))
    assert ours.shape == (SIZE, SIZE, 3) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    assert (
        builders.normalization_for(model)
        == {"densenet": "torch", "resnet50": "caffe"}[keras_module]
    )


def test_normalised_once_not_twice():
    """White is far from 0 after normalisation (dividing by 255 twice would squash it)."""
    white = tf.fill([SIZE, SIZE, 1], tf.constant(255, tf.uint8))
    assert float(tf.reduce_min(builders.normalize(white, "densenet121"))) > 2.0
    assert float(tf.reduce_min(builders.normalize(white, "resnet50"))) > 100.0


def test_an_image_already_at_the_model_size_passes_through_unchanged():
    gray = np.random.default_rng(1).integers(0, 256, (SIZE, SIZE, 1), dtype=np.uint8)
    # static shape: decided while tracing; dynamic shape (decoded raw records): tf.cond
    np.testing.assert_array_equal(decode.resize_gray(tf.constant(gray), SIZE).numpy(), gray)
    dynamic = tf.function(
        lambda g: decode.resize_gray(g, SIZE),
        input_signature=[tf.TensorSpec([None, None, 1], tf.uint8)],
    )
    np.testing.assert_array_equal(dynamic(tf.constant(gray)).numpy(), gray)
    larger = np.repeat(np.repeat(gray, 2, axis=0), 2, axis=1)  # another size is resized
    assert dynamic(tf.constant(larger)).shape == (SIZE, SIZE, 1)


def test_normalising_a_batch_equals_normalising_each_image():
    batch = np.random.default_rng(2).integers(0, 256, (3, SIZE, SIZE, 1), dtype=np.uint8)
    whole = builders.normalize(tf.constant(batch), "resnet50").numpy()
    assert whole.shape == (3, SIZE, SIZE, 3) and whole.dtype == np.float32
    for i in range(3):
        np.testing.assert_array_equal(
            whole[i], builders.normalize(tf.constant(batch[i]), "resnet50")
        )


def test_the_per_batch_half_on_a_batch_equals_preprocess_image_on_each_image():
    # the optimized pipeline's vectorized step and the one path the docs describe agree
    rng = np.random.default_rng(3)
    grays = rng.integers(0, 256, (4, 2 * SIZE, 2 * SIZE, 1), dtype=np.uint8)
    seeds = [tf.constant([7, i], tf.int64) for i in range(4)]
    halves = [
        builders.parse_element(tf.constant(g), SIZE, True, s)
        for g, s in zip(grays, seeds, strict=True)
    ]
    flips = tf.stack([flip for _, flip in halves])
    assert 0 < int(tf.reduce_sum(tf.cast(flips, tf.int32))) < 4  # some flipped, some not
    batch = builders.parse_batch(
        tf.stack([small for small, _ in halves]), flips, "densenet121", True
    )
    for i in range(4):
        one = builders.preprocess_image(grays[i], SIZE, "densenet121", training=True, seed=seeds[i])
        np.testing.assert_array_equal(batch[i].numpy(), one.numpy())


def _png(array, mode=None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def _layouts(rng) -> dict[str, bytes]:
    gray = rng.integers(0, 256, (40, 56), dtype=np.uint8)
    rgba = np.dstack([gray, gray, gray, np.full_like(gray, 255)])
    return {
        "L": _png(gray),
        "RGB grey": _png(np.dstack([gray] * 3)),
        "RGB colour": _png(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)),
        "RGBA": _png(rgba),
        "16-bit": _png(rng.integers(0, 65536, (40, 56), dtype=np.uint16)),
    }


def test_single_channel_decode_matches_pil_for_every_layout():
    from chexlib.data.png import decode_grayscale

    for layout, data in _layouts(np.random.default_rng(1)).items():
        ours = decode.decode_png_gray(tf.constant(data)).numpy()
        pil = decode_grayscale(data)
        assert ours.shape == pil.shape + (1,), layout
        assert np.abs(ours[..., 0].astype(int) - pil).max() <= 1, layout


def test_raw_pipeline_reads_rgb_rgba_and_16_bit_files(tmp_path):
    rows = []
    for i, (layout, data) in enumerate(_layouts(np.random.default_rng(2)).items()):
        path = tmp_path / f"{i:08d}_000.png"
        path.write_bytes(data)
        rows.append(
            {
                "image": path.name,
                "path": str(path),
                "split": "val",
                "layout": layout,
                **{k: i % 2 for k in LABELS},
            }
        )
    md = pd.DataFrame(rows)
    names, images, labels = collect(
        builders.build_dataset(
            "raw", "val", metadata=md, batch_size=2, image_size=SIZE, return_names=True
        )
    )
    assert names == md["image"].tolist()
    assert images.dtype == np.uint8 and images.shape[1:] == (SIZE, SIZE, 1)  # grey levels
    for row, image, label in zip(rows, images, labels, strict=True):
        # exactly the one preprocessing path on TensorFlow's decode of the file (the
        # pipeline's own decoder, libspng for 8-bit grey, gives identical pixels)
        tf_decoded = decode.decode_png_gray(tf.io.read_file(row["path"]))
        np.testing.assert_array_equal(
            image, builders.preprocess_image(tf_decoded, SIZE).numpy(), err_msg=row["layout"]
        )
        # against PIL's decode (chexlib.data.png: what validate and convert check), in grey
        # levels. L, grey RGB and opaque RGBA store the grey values themselves: identical.
        # Colour (luma) and 16-bit (scaled to 8 bits) decode up to 1 level apart, libpng's
        # rounding against PIL's (test_single_channel_decode_matches_pil_for_every_layout);
        # the resize then rounds half to even, and a difference of exactly 1 on a half
        # level (x.5 against x+1.5) becomes 2: at most 2 levels, never 3.
        pil = builders.preprocess_image(read_grayscale(row["path"]), SIZE).numpy()
        apart = np.abs(image.astype(int) - pil.astype(int)).max()
        assert apart <= (2 if row["layout"] in ("RGB colour", "16-bit") else 0), row["layout"]
        assert label.tolist() == [row["Atelectasis"]] * len(LABELS)


# --- naive and optimized: same elements ----------------------------------------------


@pytest.mark.parametrize("name", ["raw", "png", "compact"])
def test_naive_and_optimized_yield_identical_pairs(sources, synth_metadata, name):
    spec = sources[name]
    naive = collect(build(spec, "val", pipeline="naive", return_names=True))
    optimized = collect(build(spec, "val", pipeline="optimized", return_names=True))
    assert naive[0] == optimized[0]
    np.testing.assert_array_equal(naive[1], optimized[1])
    np.testing.assert_array_equal(naive[2], optimized[2])
    expected = synth_metadata.set_index("image").loc[naive[0], list(LABELS)].to_numpy(np.float32)
    np.testing.assert_array_equal(naive[2], expected)


@pytest.mark.parametrize("name", ["raw", "compact"])
def test_training_elements_are_evaluation_elements_up_to_a_flip(sources, name):
    spec = sources[name]
    reference = dict(
        zip(*collect(build(spec, "train", training=False, return_names=True))[:2], strict=True)
    )
    names, images, _ = collect(build(spec, "train", return_names=True), batches=4)
    flipped = 0
    for n, image in zip(names, images, strict=True):
        same = np.array_equal(image, reference[n])
        mirrored = np.array_equal(image, reference[n][:, ::-1])
        assert same or mirrored, n
        flipped += mirrored and not same
    assert 0 < flipped < len(names)  # flips happen, not always


def test_static_shapes_and_dtypes(sources):
    for spec in sources.values():
        train = build(spec, "train").element_spec
        assert train[0].shape == (BATCH, SIZE, SIZE, 1) and train[0].dtype == tf.uint8
        assert train[1].shape == (BATCH, len(LABELS)) and train[1].dtype == tf.float32
        evaluation = build(spec, "val").element_spec
        assert evaluation[0].shape.as_list() == [None, SIZE, SIZE, 1]
        assert evaluation[1].shape.as_list() == [None, len(LABELS)]


# --- evaluation order, shuffling, sharding ----------------------------------------------


def test_evaluation_visits_every_image_once_in_order(sources, synth_metadata):
    expected = split_names(synth_metadata, "train")
    ds = build(sources["raw"], "train", training=False, return_names=True)
    names, images, _ = collect(ds)
    assert names == expected
    sizes = [int(x.shape[0]) for x, _, _ in ds]
    assert sum(sizes) == len(expected) and sizes[-1] == (len(expected) % BATCH or BATCH)
    for name in ("png", "compact"):
        names = collect(build(sources[name], "train", training=False, return_names=True))[0]
        assert sorted(names) == sorted(expected) and len(set(names)) == len(names)


def test_shuffling_only_in_training(sources, synth_metadata):
    spec = sources["raw"]
    order = split_names(synth_metadata, "train")
    n = len(order) // BATCH
    eval_a = collect(build(spec, "train", training=False, return_names=True))[0]
    eval_b = collect(build(spec, "train", training=False, return_names=True, seed=5))[0]
    assert eval_a == eval_b == order
    train = [
        collect(build(spec, "train", seed=s, deterministic=True, return_names=True), batches=n)[0]
        for s in (0, 0, 1)
    ]
    assert train[0] == train[1]  # seeded: reproducible
    assert train[0] != train[2]  # another seed, another order
    assert train[0] != order[: len(train[0])]
    assert set(train[0]) <= set(order)


@pytest.mark.parametrize(
    "name,split,shards",
    [
        ("raw", "train", 3),  # file list sharded
        ("png", "train", 3),  # per file: 6 shard files >= 3 workers
        ("compact", "val", 2),  # per record: 1 shard file < 2 workers
    ],
)
def test_sharding_gives_disjoint_covering_subsets(sources, synth_metadata, name, split, shards):
    spec = sources[name]
    parts = [
        collect(
            build(spec, split, training=False, num_shards=shards, shard_index=i, return_names=True)
        )[0]
        for i in range(shards)
    ]
    seen = [n for part in parts for n in part]
    assert len(seen) == len(set(seen))  # disjoint
    assert sorted(seen) == sorted(split_names(synth_metadata, split))  # covering
    for i, part in enumerate(parts):
        assert pipeline_sources.count_examples(
            spec["source"],
            split,
            metadata=spec.get("metadata"),
            records_dir=spec.get("records_dir"),
            num_shards=shards,
            shard_index=i,
        ) == len(part)
        # the training dataset of a worker reads the same part
        trained = collect(
            build(
                spec,
                split,
                training=True,
                num_shards=shards,
                shard_index=i,
                batch_size=2,
                return_names=True,
            ),
            batches=4,
        )[0]
        assert set(trained) <= set(part)


def test_record_sharding_uses_files_when_there_are_enough(png_records):
    files = pipeline_sources.record_files(png_records, "train")
    assert len(files) >= 3
    mine = collect(
        build(
            {"source": "records", "records_dir": png_records},
            "train",
            training=False,
            num_shards=3,
            shard_index=1,
            return_names=True,
        )
    )[0]
    from_files = [
        e["image/filename"].numpy().decode()
        for f in files[1::3]
        for e in tf.data.TFRecordDataset(f).map(builders._parse_record)
    ]
    assert mine == from_files


# --- options of the two pipelines --------------------------------------------------


def test_naive_switches_off_tensorflows_automatic_parallelism(sources):
    naive = build(sources["raw"], pipeline="naive").options()
    assert naive.experimental_optimization.map_parallelization is False
    assert naive.experimental_optimization.inject_prefetch is False
    assert naive.threading.max_intra_op_parallelism is None  # TensorFlow's default
    optimized = build(sources["raw"]).options()
    assert optimized.experimental_slack is True and optimized.deterministic is False
    assert optimized.threading.max_intra_op_parallelism == 1  # the official recipe
    assert build(sources["raw"], "val").options().deterministic is True


def test_every_ablation_step_is_a_switch(sources):
    for step in config.steps_for("records"):
        ds = build(sources["compact"], **config.without_steps(step))
        assert ds.element_spec[0].shape == (BATCH, SIZE, SIZE, 1)
    assert set(config.steps_for("raw")) < set(config.steps_for("records"))
    with pytest.raises(ValueError, match="unknown step"):
        config.without_steps("warp-drive")


# --- cache, synthetic data, errors -----------------------------------------------------


def test_cache_gives_the_same_images(sources, tmp_path):
    spec = sources["raw"]
    plain = collect(build(spec, "val", return_names=True))
    for cache in ("memory", str(tmp_path / "cache")):
        ds = build(spec, "val", cache=cache, return_names=True)
        for _ in range(2):  # second pass reads the cache
            cached = collect(ds)
            assert cached[0] == plain[0]
            np.testing.assert_array_equal(cached[1], plain[1])
    train = build(spec, "train", cache="memory")
    it = iter(train)
    for _ in range(20):  # several epochs of the 87-image split
        assert next(it)[0].shape == (BATCH, SIZE, SIZE, 1)


def test_synthetic_dataset_is_one_repeated_batch():
    ds = builders.synthetic_dataset(4, SIZE, seed=3)
    a, b = [x for x, _ in ds.take(2)]
    assert a.shape == (4, SIZE, SIZE, 1) and a.dtype == tf.uint8
    np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_bad_arguments_have_clear_errors(sources, synth_metadata, tmp_path):
    with pytest.raises(ValueError, match="data_service is for training"):
        build(sources["raw"], "val", data_service="grpc://localhost:1")
    with pytest.raises(ValueError, match="unknown split"):
        build(sources["raw"], "holdout")
    with pytest.raises(ValueError, match="unknown source"):
        builders.build_dataset("hdf5", "train", metadata=synth_metadata)
    with pytest.raises(ValueError, match="shard_index"):
        build(sources["raw"], num_shards=2, shard_index=2)
    with pytest.raises(ValueError, match="needs records_dir"):
        builders.build_dataset("records", "train")
    with pytest.raises(FileNotFoundError, match="manifest"):
        builders.build_dataset("records", "train", records_dir=tmp_path)
    with pytest.raises(ValueError, match="model"):
        builders.normalization_for("vgg16")


# --- the tf.data service ------------------------------------------------------------------


@pytest.mark.slow
def test_reading_through_a_local_tf_data_service(sources, synth_metadata):
    from conftest import call_within  # a test helper, not a module of this folder

    from chexlib.pipeline.dataservice import start_local_service

    train = set(split_names(synth_metadata, "train"))
    # each server process has 120 s to start; each read through them below has 120 s
    # (a few seconds here), after which the service is stopped and the test fails
    with start_local_service(n_workers=2, timeout=120) as service:
        assert (
            service.address.startswith("grpc://localhost:") and len(service.worker_addresses) == 2
        )
        ds = call_within(
            120,
            "the dispatcher to register the raw pipeline",
            lambda: build(sources["raw"], data_service=service.address, return_names=True),
            on_timeout=service.stop,
        )
        assert ds.element_spec[0].shape == (BATCH, SIZE, SIZE, 1)
        names = call_within(
            120,
            "an epoch of batches from the service's 2 workers",
            lambda: collect(ds, batches=len(train) // BATCH)[0],
            on_timeout=service.stop,
        )
        assert set(names) <= train and len(names) == len(train) // BATCH * BATCH
        # Not asserted: few repeats. The training stream repeats, and each worker's
        # shuffle buffer (a whole split's size) and prefetched batches take names of
        # the next epoch while the other worker finishes this one, so repeats in one
        # epoch's worth of names depend on timing (a CI run saw 56 distinct of 72).
        x, y = call_within(
            120,
            "a batch of the compact pipeline in parallel_epochs mode",
            lambda: next(
                iter(
                    build(
                        sources["compact"],
                        data_service=service.address,
                        data_service_mode="parallel_epochs",
                    )
                )
            ),
            on_timeout=service.stop,
        )
        assert x.shape == (BATCH, SIZE, SIZE, 1) and y.shape == (BATCH, len(LABELS))


@pytest.mark.slow
def test_chexlib_data_service_command_serves_a_pipeline(sources):
    """`chexlib data-service local` prints the dispatcher address a pipeline then reads through."""
    import contextlib
    import os
    import subprocess
    import sys

    from conftest import OutputLines, call_within, kill_tree  # test helpers

    cmd = [sys.executable, "-m", "chexlib.cli.main", "data-service", "local", "--workers", "1"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
    )
    output = OutputLines(proc, name="chexlib data-service local")
    try:
        # it waits up to 120 s for each of its 2 servers to start, then prints the address
        first = output.next(300, "the line with the dispatcher's address")
        assert first is not None, f"it ended (exit {proc.poll()}) without printing an address"
        assert first.startswith("tf.data service: dispatcher grpc://"), first
        address = first.split()[3].rstrip(",")
        x, _ = call_within(
            120,
            f"a batch read through the service at {address}",
            lambda: next(iter(build(sources["compact"], data_service=address))),
            on_timeout=lambda: kill_tree(proc),
        )
        assert x.shape == (BATCH, SIZE, SIZE, 1)
    finally:
        if proc.poll() is None:
            proc.terminate()  # SIGTERM stops its dispatcher and worker too
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
            if proc.poll() is None:
                kill_tree(proc)  # SIGTERM did not stop it: the assert below fails
    assert proc.returncode == 0, f"SIGTERM did not stop it cleanly: exit {proc.returncode}"


def test_cache_name_follows_labels_and_image_files(synth_dir, tmp_path):
    """A file cache holds labels too: changed labels or a replaced image select a new cache."""
    import os
    import shutil

    from chexlib.data.metadata import load_metadata

    data = tmp_path / "data"
    shutil.copytree(synth_dir, data)  # images of our own to replace
    md, cache = load_metadata(data), tmp_path / "cache"

    def caches() -> set[str]:
        return {p.name.split(".")[0] for p in cache.iterdir()}

    def val(metadata):
        return collect(
            build(
                {"source": "raw", "metadata": metadata}, "val", cache=str(cache), return_names=True
            )
        )

    names, images, labels = val(md)
    assert val(md)[2].tolist() == labels.tolist() and len(caches()) == 1  # the cache is reused

    edited = md.copy()
    row = edited.index[edited["image"] == names[0]][0]
    edited.loc[row, LABELS[0]] = 1 - edited.loc[row, LABELS[0]]
    _, _, new_labels = val(edited)
    assert new_labels[0, 0] == 1 - labels[0, 0]  # the new label, not the cached one
    np.testing.assert_array_equal(new_labels[1:], labels[1:])
    assert len(caches()) == 2

    path = edited.loc[row, "path"]
    Image.fromarray(255 - read_grayscale(path)).save(path)  # replaced: new pixels
    _, replaced, _ = val(edited)
    assert not np.array_equal(replaced[0], images[0]) and len(caches()) == 3
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched only
    val(edited)
    assert len(caches()) == 4
