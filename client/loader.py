"""Batches of decoded images, made in worker threads ahead of the caller, so that a server never waits on the
client's decoding.

`Loader.batches(order)` cuts `order` into batches and keeps up to `prefetch` of them being decoded by a pool of
`workers` threads (a bounded queue of futures: Pillow and numpy release the GIL while they work) while the caller
sends the previous ones. Each image goes through proto/images.py, the server's own decoder. Without augmentation
the decoded images are kept (up to `cache_mb`), so later epochs decode nothing. With it, every epoch draws a new
random resized crop and horizontal flip per image from a generator seeded by (seed, epoch, image), so a run is
the same whatever the threads do.

A file that cannot be decoded is skipped: recorded in `skipped` (path -> reason) once, left out of later epochs,
and its batch goes on smaller. With `strict` the first one raises its ImageError instead.
"""
from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from proto.images import ImageError, Recipe, open_image, read_file, to_input

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
        self._lock = threading.Lock()
        self._bad: set[int] = set()
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

    def batches(self, order: np.ndarray | None = None, start: int = 0, epoch: int = 0) -> Iterator[Batch]:
        """The batches of `order` (default: the files in their order) from batch `start` on, decoded ahead."""
        order = np.arange(len(self.paths)) if order is None else np.asarray(order)
        chunks = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        pending: deque[Future] = deque()
        try:
            for number in range(start, len(chunks)):
                pending.append(self._pool.submit(self._load, number, chunks[number], epoch))
                if len(pending) >= self.prefetch:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:  # the caller stopped early: what was not started never runs
                future.cancel()

    def _load(self, number: int, indices: np.ndarray, epoch: int) -> Batch:
        images, kept = [], []
        for i in indices:
            i = int(i)
            if self._cache is not None and self._cached[i]:
                images.append(self._cache[i])
                kept.append(i)
                continue
            with self._lock:
                if i in self._bad:
                    continue
            try:
                x = self._decode(i, epoch)
            except ImageError as e:
                if self.strict:
                    raise
                with self._lock:
                    self._bad.add(i)
                    self.skipped.setdefault(self.paths[i], e.reason)
                continue
            if self._cache is not None:
                self._cache[i] = x
                self._cached[i] = True
            images.append(x)
            kept.append(i)
        stacked = np.stack(images) if images else np.empty((0, *self.recipe.shape), np.float32)
        return Batch(number, stacked, self.labels[kept], [self.paths[i] for i in kept])

    def _decode(self, i: int, epoch: int) -> np.ndarray:
        path = self.paths[i]
        image = open_image(read_file(path), str(path), self.recipe.mode)
        if not self.augment:
            return to_input(image, self.recipe)
        rng = np.random.default_rng([self.seed, epoch, i])
        x = to_input(image, self.recipe, box=random_resized_crop(*image.size, rng))
        return np.ascontiguousarray(x[:, :, ::-1]) if rng.random() < 0.5 else x
