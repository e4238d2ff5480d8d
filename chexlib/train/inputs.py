"""The data one Horovod rank trains and evaluates on: its shard of each split.

Every rank reads the files (or records) of its own shard (``num_shards`` =
ranks, ``shard_index`` = rank; the pipeline shards by file before shuffling),
and all ranks take the same number of steps per epoch, the smallest shard
over the batch size, since every step is an allreduce. Each epoch's order and
flips depend only on (seed, epoch) (:func:`epoch_seed`), so a resumed run
repeats what an uninterrupted run would have done. ``--paired-synthetic``
interleaves windows of real and synthetic batches (:func:`paired_with_synthetic`).
"""

from __future__ import annotations

import numpy as np

from chexlib.data.metadata import load_metadata
from chexlib.train.config import TrainConfig
from chexlib.train.models import PIPELINE_MODEL


def epoch_seed(seed: int, epoch: int) -> int:
    """The data seed of one epoch: a function of (seed, epoch) only, so resume repeats it."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0] & 0x7FFFFFFF)


class RankData:
    """The datasets and split sizes one Horovod rank uses."""

    def __init__(self, config: TrainConfig, rank: int, size: int):

        self.config, self.rank, self.size = config, rank, size
        self.metadata = None
        if config.data and config.source == "raw":
            self.metadata = load_metadata(config.data, val_fraction=config.val_fraction)
        self.common = {
            "metadata": self.metadata,
            "records_dir": config.records if config.source == "records" else None,
            "pipeline": config.pipeline,
            "batch_size": config.batch_size,
            "image_size": config.image_size,
            "model": PIPELINE_MODEL[config.model],
            "num_shards": size,
            "shard_index": rank,
        }
        self.has_data = not config.synthetic or bool(config.data or config.records)
        # scored each epoch: real data only (with --paired-synthetic, half the steps are not)
        self.evaluated = (
            config.evaluate and self.has_data and not (config.synthetic or config.paired_synthetic)
        )

    def steps_per_epoch(self) -> int:
        """Steps every rank takes per epoch: the smallest shard / batch (then the cap)."""
        import horovod.tensorflow as hvd_tf

        if not self.has_data:
            return int(self.config.steps_per_epoch)
        # Horovod: all ranks must take the same number of steps (each step is an allreduce).
        shards = hvd_tf.allgather_object(self.shard_size("train"))
        steps = min(shards) // self.config.batch_size
        if steps < 1:
            raise ValueError(
                f"train split: the smallest rank shard has {min(shards)} images, fewer than "
                f"--batch-size {self.config.batch_size}; lower the batch size or the ranks"
            )
        return min(steps, self.config.steps_per_epoch or steps)

    def split_size(self, split: str) -> int:
        """Images in ``split`` (all ranks together)."""
        return self.shard_size(split, num_shards=1, shard_index=0)

    def shard_size(
        self, split: str, num_shards: int | None = None, shard_index: int | None = None
    ) -> int:
        """Images of ``split`` one rank reads per pass (default: this rank)."""
        # here: it loads TensorFlow; importing this module does not
        from chexlib.pipeline import sources

        n = self.size if num_shards is None else num_shards
        i = self.rank if shard_index is None else shard_index
        # the pipeline's own rule (and the manifest's counts for records)
        return sources.count_examples(
            self.config.source,
            split,
            metadata=self.metadata,
            records_dir=self.common["records_dir"],
            num_shards=n,
            shard_index=i,
        )

    def train(self, epoch: int, untimed: int | None = None):
        """Training batches of one epoch; order and flips depend on (seed, epoch) only.

        Args:
            epoch: 0-based epoch of the run.
            untimed: with ``--paired-synthetic``, the steps at the start of this
                epoch that are not timed (:func:`chexlib.train.callbacks.untimed_steps`).
        """
        # here: it loads TensorFlow; importing this module does not
        from chexlib.pipeline import builders

        if self.config.synthetic:
            return builders.synthetic_dataset(
                self.config.batch_size, self.config.image_size, seed=self.config.seed
            )
        real = builders.build_dataset(
            self.config.source,
            "train",
            training=True,
            seed=epoch_seed(self.config.seed, epoch),
            deterministic=True if self.config.deterministic else None,
            data_service=self.config.data_service,
            **self.common,
        )
        if not self.config.paired_synthetic:
            return real
        return paired_with_synthetic(real, self.config, untimed)

    def evaluation(self, split: str):
        """Every image of this rank's part of ``split`` once (the last batch may be smaller)."""
        # here: it loads TensorFlow; importing this module does not
        from chexlib.pipeline import builders

        return builders.build_dataset(self.config.source, split, training=False, **self.common)


def paired_with_synthetic(real, config: TrainConfig, untimed: int | None = None):
    """Untimed steps from ``real``, then windows alternating ``real`` / synthetic.

    Window k after the untimed steps (``throughput_window_steps`` steps each) is
    real for even k and synthetic for odd k. The throughput callback restarts its
    windows at each epoch after the same number of untimed steps
    (:func:`chexlib.train.callbacks.untimed_steps`; default: the run's first epoch,
    ``max(1, throughput_warmup_steps)``), so its windows pair up with these.
    Adjacent windows share the machine's state of the moment, which cancels
    the slow drifts that make separate runs differ by 10 % or more here.
    """
    import tensorflow as tf

    # here: it loads TensorFlow; importing this module does not
    from chexlib.pipeline import builders

    synthetic = builders.synthetic_dataset(config.batch_size, config.image_size, seed=config.seed)
    w = config.throughput_window_steps
    if untimed is None:
        untimed = max(1, config.throughput_warmup_steps)
    warmup = tf.data.Dataset.from_tensors(tf.constant(0, tf.int64)).repeat(untimed)
    pairs = tf.data.Dataset.from_tensor_slices(tf.constant([0] * w + [1] * w, tf.int64)).repeat()
    return tf.data.Dataset.choose_from_datasets([real, synthetic], warmup.concatenate(pairs))
