"""Batches of decoded images, made in worker threads ahead of the caller, so that a server never waits on the
client's decoding (on a machine the client shares with the server, the decoding still takes CPU time the server
could use: docs/fit.md, Throughput).

`Loader.batches(order)` cuts `order` into batches and keeps up to `prefetch` of them being decoded by a pool of
`workers` threads (a bounded queue of futures: Pillow and numpy release the GIL while they work) while the caller
sends the previous ones. The pass starts decoding when it is created, not when its first batch is asked for, so
a caller can create it before calls that keep the server busy (fit does, before its start-up and end-of-epoch
checkpoints) and find its first batch decoded. Each image goes through proto/images.py, the server's own decoder.
Without augmentation the decoded images are kept (up to `cache_mb`), so later epochs decode nothing: a batch whose
images are all kept is gathered in the caller's thread with one indexing copy when it is asked for, as a loop over
decoded tensors gathers it, rather than handed over by a worker thread (which would wake up and take the GIL
while the caller's call is in flight). With augmentation, every epoch draws a new random resized crop and
horizontal flip per image from a generator seeded by (seed, epoch, image), so a run is the same whatever the
threads do.

A file that cannot be decoded is skipped: recorded in `skipped` (path -> reason) once, left out of later epochs,
and its batch goes on smaller. With `strict` the first one raises its ImageError instead.
"""
from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from proto.images import Decoded, ImageError, Recipe, image_size, pixels, read_file, to_inputs

CROP_SCALE = (0.08, 1.0)  # torchvision's RandomResizedCrop defaults: area fraction and aspect ratio range
CROP_RATIO = (3 / 4, 4 / 3)


@dataclass
class Batch:
    number: int  # its place in the epoch's order (0-based)
    images: np.ndarray  # float32 (b, c, h, w); b may be below the batch size (skipped files) or even 0
    labels: np.ndarray  # int64 (b,)
    paths: list[Path]


def random_resized_crop(width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a crop of CROP_SCALE of the area and CROP_RATIO aspect, as torchvision's
    RandomResizedCrop.get_params draws it (ten tries, then the centre crop of the nearest allowed aspect)."""
    area = width * height
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*CROP_SCALE)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    ratio = width / height
    if ratio < CROP_RATIO[0]:
        w, h = width, int(round(width / CROP_RATIO[0]))
    elif ratio > CROP_RATIO[1]:
        w, h = int(round(height * CROP_RATIO[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


class Loader:
    def __init__(self, paths: Sequence[Path], labels: np.ndarray, recipe: Recipe, batch_size: int, *,
                 workers: int = 2, prefetch: int = 4, augment: bool = False, seed: int = 0, strict: bool = False,
                 cache_mb: float = 1024, skipped: dict[Path, str] | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"the batch size must be at least 1, got {batch_size}")
        self.paths = list(paths)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.recipe = recipe
        self.batch_size = batch_size
        self.prefetch = max(prefetch, 1)
        self.augment = augment
        self.seed = seed
        self.strict = strict
        self.skipped = skipped if skipped is not None else {}
        self._lock = threading.Lock()  # `skipped`, which the caller may share between loaders
        self._bad = np.zeros(len(self.paths), dtype=bool)  # files that could not be decoded: never tried again
        self._pool = ThreadPoolExecutor(max(workers, 1), thread_name_prefix="vitserve-decode")
        size = len(self.paths) * int(np.prod(recipe.shape)) * 4
        self._cache = None if augment or size > cache_mb * 2 ** 20 else np.empty((len(self.paths), *recipe.shape),
                                                                              np.float32)
        self._cached = np.zeros(len(self.paths), dtype=bool)

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def batch_count(self, n: int | None = None) -> int:
        return math.ceil((len(self.paths) if n is None else n) / self.batch_size)

    def batches(self, order: np.ndarray | None = None, start: int = 0, epoch: int = 0) -> Batches:
        """The batches of `order` (default: the files in their order) from batch `start` on; the first `prefetch`
        of them start decoding now."""
        return Batches(self, np.arange(len(self.paths)) if order is None else np.asarray(order), start, epoch)

    def _ready(self, indices: np.ndarray) -> bool:
        """Whether every image of `indices` is kept decoded or known to be skipped: nothing left to decode."""
        return self._cache is not None and bool((self._cached[indices] | self._bad[indices]).all())

    def _gather(self, number: int, indices: np.ndarray) -> Batch:
        """The batch of images that are kept decoded (the skipped ones left out): one indexing copy."""
        kept = indices[~self._bad[indices]]
        return Batch(number, self._cache[kept], self.labels[kept], [self.paths[i] for i in kept])

    def _load(self, number: int, indices: np.ndarray, epoch: int) -> Batch:
        """Decode what `indices` needs (in a worker thread) and assemble its batch, the skipped files left out:
        each file is decoded on its own, then the batch is sized and normalised at once (proto/images.py
        to_inputs: small images of one size in one go)."""
        images, boxes, flips, kept = [], [], [], []
        todo = indices[~self._bad[indices]]
        if self._cache is not None:
            todo = todo[~self._cached[todo]]
        for i in todo.tolist():
            try:
                image, box, flip = self._decode(i, epoch)
            except ImageError as e:
                if self.strict:
                    raise
                with self._lock:
                    self._bad[i] = True
                    self.skipped.setdefault(self.paths[i], e.reason)
                continue
            images.append(image)
            boxes.append(box)
            flips.append(flip)
            kept.append(i)
        inputs = to_inputs(images, self.recipe, boxes if self.augment else None)
        for j in np.flatnonzero(flips):
            inputs[j] = inputs[j][:, :, ::-1]
        if self._cache is not None:
            self._cache[kept] = inputs
            self._cached[kept] = True
            return self._gather(number, indices)
        return Batch(number, inputs, self.labels[kept], [self.paths[i] for i in kept])

    def _decode(self, i: int, epoch: int) -> tuple[Decoded, tuple[int, int, int, int] | None, bool]:
        """File i's pixels at its own size (proto/images.py pixels), and with augmentation its random resized crop
        box and horizontal flip in `epoch`, drawn from a generator seeded by (seed, epoch, i): the same whichever
        thread draws them."""
        path = str(self.paths[i])
        image = pixels(read_file(path), path, self.recipe.mode)
        if not self.augment:
            return image, None, False
        rng = np.random.default_rng([self.seed, epoch, i])
        box = random_resized_crop(*image_size(image), rng)
        return image, box, bool(rng.random() < 0.5)


class Batches:
    """One pass of a Loader over `order` from batch `start` on, in order (an iterator of Batch).

    Created by Loader.batches, it queues its first `prefetch` batches at once: decoded by the loader's threads, or,
    when every image of a batch is kept decoded already, gathered in the caller's thread when that batch is asked
    for. Each batch taken queues the next. `close()` (or leaving a `with` block) cancels the decoding not started;
    a pass dropped without it is cancelled when its loader closes."""

    def __init__(self, loader: Loader, order: np.ndarray, start: int, epoch: int) -> None:
        self.loader, self.start, self.epoch = loader, start, epoch
        size = loader.batch_size
        self._chunks = [order[i:i + size] for i in range(0, len(order), size)]
        self._next = start
        self._pending: deque[tuple[int, np.ndarray, Future | None]] = deque()
        self._queue()

    def __iter__(self) -> Batches:
        return self

    def __enter__(self) -> Batches:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _queue(self) -> None:
        loader = self.loader
        while len(self._pending) < loader.prefetch and self._next < len(self._chunks):
            number, indices = self._next, self._chunks[self._next]
            future = None if loader._ready(indices) else loader._pool.submit(loader._load, number, indices,
                                                                             self.epoch)
            self._pending.append((number, indices, future))
            self._next += 1

    def __next__(self) -> Batch:
        if not self._pending:
            raise StopIteration
        number, indices, future = self._pending.popleft()
        self._queue()
        if future is None:
            return self.loader._gather(number, indices)
        try:
            return future.result()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Cancel the batches whose decoding has not started (the ones being decoded finish, into the cache)."""
        for _, _, future in self._pending:
            if future is not None:
                future.cancel()
        self._pending.clear()
        self._next = len(self._chunks)
