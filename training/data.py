"""Training data for the loop: a resumable, world-size independent sampler and face image sets.

The sampler defines the data order once for the whole job, not per rank: epoch `e` is a
permutation of the data set drawn from (seed, e), and optimizer step `t` of that epoch consumes
the global batch `perm[t*G : (t+1)*G]` with G = batch_size x world_size x grad_accum_steps. Micro-
batch `m` of rank `r` is chunk `m*W + r` of that global batch. So

    - the position in the data is (epoch, samples consumed), meaningful on any world size;
    - two runs with the same global batch G see the same samples at every step, whether G is
      2 ranks x 4 images or 1 rank x 2 accumulated micro-batches x 4 images;
    - augmentation is decided by a per-sample seed drawn with the permutation (`with_seeds`), so
      it does not depend on workers, ranks or where a run was resumed.

The last incomplete global batch of an epoch is dropped (every rank needs the same batch size).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


class GlobalBatchSampler(Sampler):
    """Yields this rank's sample indices (or `(index, seed)` pairs) for the rest of an epoch.

    Use with `DataLoader(batch_size=batch_size, drop_last=True, sampler=...)`. Call
    `set_position(epoch, samples_consumed)` before iterating each epoch.

    Args:
        num_items: data set size.
        batch_size: samples per rank per micro-batch.
        rank, world_size: this process and the number of data-parallel processes.
        grad_accum_steps: micro-batches per optimizer step.
        seed: data-order seed (shared by all ranks).
        shuffle: permute each epoch (False: data set order, for debugging).
        with_seeds: yield `(index, seed)` so the data set can draw augmentations from `seed`.
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        grad_accum_steps: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        with_seeds: bool = False,
    ) -> None:
        self.num_items = num_items
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.grad_accum_steps = grad_accum_steps
        self.seed = seed
        self.shuffle = shuffle
        self.with_seeds = with_seeds
        self.epoch = 0
        self.start_step = 0
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"{num_items} samples are fewer than one global batch of {self.samples_per_step} "
                f"(batch_size {batch_size} x {world_size} ranks x {grad_accum_steps} accumulation steps)"
            )

    @property
    def samples_per_step(self) -> int:
        """Global batch G: samples consumed by one optimizer step over all ranks."""
        return self.batch_size * self.world_size * self.grad_accum_steps

    @property
    def steps_per_epoch(self) -> int:
        return self.num_items // self.samples_per_step

    def set_position(self, epoch: int, samples_consumed: int = 0) -> None:
        """Start epoch `epoch` after `samples_consumed` samples (rounded down to whole global batches)."""
        step, rest = divmod(samples_consumed, self.samples_per_step)
        if rest:
            warnings.warn(
                f"resuming {samples_consumed} samples into epoch {epoch}, which is not a whole number of global "
                f"batches of {self.samples_per_step}; repeating the last {rest} samples",
                stacklevel=2,
            )
        self.epoch, self.start_step = epoch, min(step, self.steps_per_epoch)

    def order(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(permutation, per-sample augmentation seeds) of epoch `epoch`, identical on every rank."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.num_items, generator=gen) if self.shuffle else torch.arange(self.num_items)
        seeds = torch.randint(0, 2**31 - 1, (self.num_items,), generator=gen)
        return perm, seeds

    def __iter__(self) -> Iterator[int | tuple[int, int]]:
        perm, seeds = self.order(self.epoch)
        B, W = self.batch_size, self.world_size
        for step in range(self.start_step, self.steps_per_epoch):
            for micro in range(self.grad_accum_steps):
                start = step * self.samples_per_step + (micro * W + self.rank) * B
                for pos in range(start, start + B):
                    yield (int(perm[pos]), int(seeds[pos])) if self.with_seeds else int(perm[pos])

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.grad_accum_steps * self.batch_size


# -- face images -------------------------------------------------------------------------------------
class FaceTrainImages(Dataset):
    """Aligned training crops from a source, with seeded horizontal flips.

    Items are looked up by `(index, seed)` (from `GlobalBatchSampler(with_seeds=True)`) and are
    `(image (3, 112, 112) uint8, label int64)`. The task normalises on the device.

    Args:
        source: "synthetic" (`SyntheticFaces`), "recordio" (`RecordDataset`) or "image_folder".
        items: the underlying data set object (see `open_face_source`).
        hflip: flip when the sample's seed is odd.
    """

    def __init__(self, source: str, items: object, num_classes: int, length: int, hflip: bool = True) -> None:
        self.source = source
        self.items = items
        self.num_classes = num_classes
        self.length = length
        self.hflip = hflip

    def __len__(self) -> int:
        return self.length

    def _read(self, index: int) -> tuple[torch.Tensor, int]:
        if self.source == "synthetic":
            image, label = self.items[index]
            return image, int(label)
        if self.source == "recordio":
            array, label = self.items.read_image(index)  # (112, 112, 3) uint8 RGB
        else:
            path, label = self.items.samples[index]
            array = _read_image_file(path)
        return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1), int(label)  # (3, H, W)

    def __getitem__(self, item: tuple[int, int] | int) -> tuple[torch.Tensor, torch.Tensor]:
        index, seed = item if isinstance(item, tuple) else (item, 0)
        image, label = self._read(index)
        if self.hflip and seed % 2:
            image = image.flip(-1)
        return image.contiguous(), torch.tensor(label, dtype=torch.int64)


def _read_image_file(path: Path, size: int = 112) -> np.ndarray:
    from lvface_mm.data import decode_image

    array = decode_image(Path(path).read_bytes(), str(path))
    if array.shape[:2] != (size, size):
        raise ValueError(f"{path}: image is {array.shape[1]}x{array.shape[0]}, expected an aligned {size}x{size} crop "
                         "(align faces first, e.g. with `lvface-mm pack`)")
    return array


def open_face_source(source: str, path: str | None, synthetic: object, hflip: bool) -> FaceTrainImages:
    """Open the training images of a `DataConfig` (source, path, synthetic config)."""
    if source == "synthetic":
        from lvface_mm.data.synthetic import SyntheticFaces

        faces = SyntheticFaces(synthetic)
        return FaceTrainImages(source, faces, faces.num_classes, len(faces), hflip)
    if path is None:
        raise ValueError(f"data.source {source!r} needs data.path")
    if source == "recordio":
        from lvface_mm.data import RecordDataset

        records = RecordDataset(path)
        return FaceTrainImages(source, records, int(records.num_classes), len(records), hflip)
    if source == "image_folder":
        from lvface_mm.data import list_identity_folder

        folder = list_identity_folder(path)
        return FaceTrainImages(source, folder, folder.num_classes, len(folder), hflip)
    raise ValueError(f"unknown data source {source!r}; expected synthetic, recordio or image_folder")


__all__ = ["FaceTrainImages", "GlobalBatchSampler", "open_face_source"]
