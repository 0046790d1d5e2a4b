"""Pillow's resize of 8-bit images (bilinear, bicubic, lanczos), for many small images of one size at once, to the
same bytes `Image.resize` gives each of them.

Why: a 16x16 image costs about 20 µs in Pillow's Python wrappers (`fromarray`, `resize`, `asarray`) for well
under a microsecond of arithmetic, and `fit`'s first epoch on a small-image dataset decodes thousands of them
on the cores the server trains on (docs/fit.md, Throughput). Here a batch of 64 of them costs about 2 µs an
image.

How, in Pillow's own terms (its libImaging/Resample.c, 8 bits a channel):
- each output pixel is a weighted sum of the input pixels under the filter, the filter stretched by the scale
  when shrinking (antialiasing), its weights normalised to sum to 1 and then rounded to fixed point with 22
  fractional bits;
- the sum starts at half a unit, is shifted down 22 bits and clipped to 0..255;
- the horizontal pass runs first (when the width changes) and is rounded to 8 bits before the vertical one
  (when the height changes).
A pass adds one tap at a time over every row of every image (numpy, int64: exact, as Pillow's int sums are). Per
pixel that is the arithmetic Pillow does, in numpy's loops rather than Pillow's; what it saves is Pillow's cost
per image, which is why images.py sends only small images this way.
tests/test_images.py checks these bytes against Pillow's for every size and filter it draws.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from PIL import Image

PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed point for 8-bit images: two bits spare for the filters' overshoot
SUPPORTS = {"bilinear": 1.0, "bicubic": 2.0, "lanczos": 3.0}  # the filters' radius at scale 1
FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
           "lanczos": Image.Resampling.LANCZOS}  # the same filters in Pillow


def _kernel(interpolation: str, x: float) -> float:
    """The filter at x, written as Pillow writes it so that every double comes out the same."""
    if interpolation == "bilinear":
        x = -x if x < 0.0 else x
        return 1.0 - x if x < 1.0 else 0.0
    if interpolation == "bicubic":
        a = -0.5
        x = -x if x < 0.0 else x
        if x < 1.0:
            return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
        if x < 2.0:
            return (((x - 5) * x + 8) * x - 4) * a
        return 0.0
    if -3.0 <= x < 3.0:  # lanczos: sinc(x) * sinc(x / 3)
        return _sinc(x) * _sinc(x / 3)
    return 0.0


def _sinc(x: float) -> float:
    if x == 0.0:
        return 1.0
    x = x * math.pi
    return math.sin(x) / x


@lru_cache(maxsize=64)
def weights(in_size: int, out_size: int, interpolation: str) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's taps for resizing in_size pixels to out_size: (indices, fixed), both (out_size, taps). Output
    pixel j is sum(input[indices[j]] * fixed[j]) in fixed point; rows with fewer taps are padded with weight 0
    (cached, read-only: a dataset has few sizes)."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = SUPPORTS[interpolation] * filterscale
    reciprocal = 1.0 / filterscale  # Pillow multiplies by it rather than divide
    rows = []
    for j in range(out_size):
        center = (j + 0.5) * scale
        first = max(int(center - support + 0.5), 0)  # int() truncates toward zero, as C's cast does
        count = min(int(center + support + 0.5), in_size) - first
        taps = [_kernel(interpolation, (x + first - center + 0.5) * reciprocal) for x in range(count)]
        total = 0.0
        for w in taps:  # summed in Pillow's order
            total += w
        taps = [w / total if total != 0.0 else w for w in taps]
        rows.append((first, [int(w * (1 << PRECISION_BITS) + (0.5 if w >= 0 else -0.5)) for w in taps]))
    width = max(len(fixed) for _, fixed in rows)
    indices = np.zeros((out_size, width), dtype=np.intp)
    fixed = np.zeros((out_size, width), dtype=np.int64)
    for j, (first, taps) in enumerate(rows):
        indices[j, :len(taps)] = np.arange(first, first + len(taps))
        fixed[j, :len(taps)] = taps
    indices.setflags(write=False)
    fixed.setflags(write=False)
    return indices, fixed


def _pass(pixels: np.ndarray, taps: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """One pass along the last axis: uint8 (..., n_in) -> uint8 (..., n_out), a tap at a time over every row."""
    indices, fixed = taps
    sums = np.full((*pixels.shape[:-1], indices.shape[0]), 1 << (PRECISION_BITS - 1), dtype=np.int64)
    for k in range(indices.shape[1]):
        sums += pixels[..., indices[:, k]] * fixed[:, k]
    sums >>= PRECISION_BITS  # an arithmetic shift: the floor, as C's >> of a negative int
    return np.clip(sums, 0, 255).astype(np.uint8)


def _horizontal(pixels: np.ndarray, width: int, interpolation: str) -> np.ndarray:
    """(n, c, h, w) -> (n, c, h, width)."""
    return _pass(pixels, weights(pixels.shape[3], width, interpolation))


def _vertical(pixels: np.ndarray, height: int, interpolation: str) -> np.ndarray:
    """(n, c, h, w) -> (n, c, height, w)."""
    columns = np.ascontiguousarray(pixels.transpose(0, 1, 3, 2))
    return np.ascontiguousarray(_pass(columns, weights(pixels.shape[2], height, interpolation)).transpose(0, 1, 3, 2))


def _resized(pixels: np.ndarray, width: int, height: int, interpolation: str, vertical_first: bool) -> np.ndarray:
    if vertical_first:
        if pixels.shape[2] != height:
            pixels = _vertical(pixels, height, interpolation)
        return _horizontal(pixels, width, interpolation) if pixels.shape[3] != width else pixels
    if pixels.shape[3] != width:
        pixels = _horizontal(pixels, width, interpolation)
    return _vertical(pixels, height, interpolation) if pixels.shape[2] != height else pixels


PROBES = 3  # random images tried before a size is declared one whose two orders cannot be told apart


@lru_cache(maxsize=256)
def pass_order(channels: int, h: int, w: int, height: int, width: int, interpolation: str) -> bool | None:
    """Which order Pillow runs the two passes in for this resize: False horizontal first, True vertical first,
    None when this module cannot reproduce Pillow's bytes for it (then the caller uses Pillow).

    Pillow chooses the order itself, and that changed between versions (13.0.0 runs about a third of random
    two-pass resizes vertical first; its source up to August 2026 always ran the horizontal pass first), and
    the pass rounded to 8 bits first decides the last bit of some pixels. So Pillow is asked: a random image is resized by Pillow and by both orders here, once per
    size, filter and channel count."""
    rng = np.random.default_rng(h * 7919 + w)
    for _ in range(PROBES):
        probe = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
        image = Image.fromarray(probe[:, :, 0] if channels == 1 else probe)
        expected = np.asarray(image.resize((width, height), FILTERS[interpolation])).reshape(height, width, channels)
        expected = expected.transpose(2, 0, 1)[None]
        source = np.ascontiguousarray(probe.transpose(2, 0, 1)[None])
        matches = [np.array_equal(_resized(source, width, height, interpolation, first), expected)
                   for first in (False, True)]
        if matches == [True, False]:
            return False
        if matches == [False, True]:
            return True
        if matches == [False, False]:
            return None
    return None  # both orders matched every probe: not told apart, so not trusted


def resize(pixels: np.ndarray, width: int, height: int, interpolation: str) -> np.ndarray | None:
    """uint8 (n, c, h, w) -> uint8 (n, c, height, width), image by image the bytes Pillow's resize gives; None
    where that cannot be promised for this size (pass_order)."""
    n, c, h, w = pixels.shape
    if (h, w) == (height, width):
        return pixels
    if h == height or w == width:  # one pass: no order to choose
        return _resized(pixels, width, height, interpolation, False)
    order = pass_order(c, h, w, height, width, interpolation)
    return None if order is None else _resized(pixels, width, height, interpolation, order)
