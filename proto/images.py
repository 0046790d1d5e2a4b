"""Encoded image -> model input: the one decoder of the server (Predict, TrainStep, EvalStep of encoded files) and
the client (fit, evaluate, predict of a folder), so both turn the same file into the same pixels.

A model's preprocessing record (engine.manifest.Preprocessing, the proto's vitserve.v1.Preprocessing, or the dict
GetModelInfo gives the client) says how: `Recipe.of(record)` reads it once. Then, per image:

1. **open**: Pillow reads the header; more than MAX_IMAGE_PIXELS is refused before anything is decoded (a
   decompression bomb). The first frame of an animation is used. An 8-bit grey or RGB PNG already in the
   model's channel count is decoded by libspng instead (pixels(): the same samples, a fifth of the time).
2. **mode**: the pixels become the model's L (1 channel) or RGB (3 channels):
   - 8-bit modes (1, L, P, RGB, CMYK, YCbCr, HSV, ...) by Pillow's own conversion, as before, RGB to L by
     ITU-R 601-2 luma and L to RGB by copying the grey into the three channels;
   - alpha (RGBA, LA, PA, RGBa, a palette or L/RGB with a transparent colour) is **dropped**: the colour under a
     transparent pixel is kept, as torchvision's ImageFolder loader (convert("RGB")) keeps it, so training on a
     folder and predicting its files see the pixels torchvision would;
   - 16-bit grey (I;16, I;16B, I;16L) and 32-bit integer grey (I, as Pillow opens some 16-bit files) are
     16-bit samples, scaled by 255 / 65535 without rounding; I values outside [0, 65535] are refused;
   - float grey (F): values in [0, 1] are scaled by 255, values in [0, 255] are taken as they are; NaN, Inf
     or a wider range are refused;
   - a mode Pillow cannot convert (LAB, ...) is refused, naming it.
3. **size**: resize_shorter 0 resizes straight to height x width; N > 0 resizes so that the shorter side is N
   (the longer side N * long / short, truncated, as torchvision's Resize(N)), then crops height x width from the
   centre (zeros where the image is smaller). `interpolation` is the Pillow filter: nearest, bilinear, bicubic
   or lanczos. An image of the target size is not resampled. Small 8-bit images of one size are resized
   together by proto/resample.py, to the bytes Pillow gives each (to_inputs); the others by Pillow.
4. **values**: (pixel / 255 - mean) / std per channel, float32 (c, h, w).

Every problem is one ImageError whose message names the image (a file path, or "image 3" of a request) and the
reason. numpy, Pillow and pyspng only: the client ships with it.
"""
from __future__ import annotations

import io
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyspng
from PIL import Image, UnidentifiedImageError

from proto import resample

MAX_IMAGE_PIXELS = 4096 * 4096  # an encoded image larger than this is refused before decoding (decompression bombs)
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS

INTERPOLATIONS = {"nearest": Image.Resampling.NEAREST, **resample.FILTERS}  # the record's name -> Pillow's filter
READ_CHUNK = 1 << 16  # read_file's first read: one read for a small image; a larger read size costs a large
# allocation per file (1 MiB: 12 µs a 16x16 PNG against 2.6)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_COLOUR_TYPES = {"L": 0, "RGB": 2}  # IHDR colour type of 8-bit grey and RGB samples
BATCH_RESIZE_SAMPLES = 2048  # images of up to this many samples (h * w * c) are resized many at once
# (proto/resample.py): a 16x16 grey one in 3.5 µs against Pillow's 23; at 32x32x3 the two are even, and beyond
# it Pillow's loops in C win (64x64x3 -> 32x32: 54 µs against 170)
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
SIXTEEN_BIT_MAX = 65535.0


class ImageError(ValueError):
    """An image that cannot become model input: `source` names it (a file, "image 3"), `reason` says why."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


def without_reprs(error: BaseException) -> str:
    """The first line of an error's message with Python object reprs (`<_io.BytesIO object at 0x...>`) taken out."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", text).strip() or type(error).__name__


@dataclass(frozen=True)
class Recipe:
    """A preprocessing record, read once: what every image of one model goes through."""
    height: int
    width: int
    channels: int
    mean: np.ndarray  # float32 (c, 1, 1)
    std: np.ndarray  # float32 (c, 1, 1)
    resize_shorter: int = 0
    interpolation: str = "bilinear"

    @classmethod
    def of(cls, record: Any) -> Recipe:
        """From the Preprocessing record (proto/records/model.py; ModelInfo.preprocessing), vitserve.v1.Preprocessing or a dict.
        A record written before resize_shorter and interpolation existed (or a proto leaving them unset)
        resizes straight, bilinear."""
        if isinstance(record, Recipe):
            return record
        get = record.get if isinstance(record, Mapping) else lambda name, default=None: getattr(record, name, default)
        channels = int(get("channels"))
        if channels not in (1, 3):
            raise ValueError(f"preprocessing: channels must be 1 or 3, got {channels}")
        interpolation = get("interpolation", "") or "bilinear"
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"preprocessing: interpolation must be one of {', '.join(INTERPOLATIONS)}, "
                             f"got {interpolation!r}")
        return cls(height=int(get("height")), width=int(get("width")), channels=channels,
                   mean=np.asarray(get("mean"), dtype=np.float32).reshape(-1, 1, 1),
                   std=np.asarray(get("std"), dtype=np.float32).reshape(-1, 1, 1),
                   resize_shorter=int(get("resize_shorter", 0) or 0), interpolation=interpolation)

    @property
    def mode(self) -> str:
        return "L" if self.channels == 1 else "RGB"

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.channels, self.height, self.width


def open_image(blob: bytes, source: str, mode: str) -> Image.Image:
    """Encoded bytes -> a decoded Pillow image in `mode` ("L" or "RGB"), or in "F" (one channel, 0..255 floats)
    for 16-bit, 32-bit and float images. ImageError names `source` and the reason."""
    try:
        with Image.open(io.BytesIO(blob)) as image:  # lazy: only the header is read here
            if image.width * image.height > MAX_IMAGE_PIXELS:  # refuse before decoding (Pillow only warns
                raise Image.DecompressionBombError  # below twice its own limit: a memory DoS)
            image.load()
            return _converted(image, source, mode)
    except Image.DecompressionBombError:
        raise ImageError(source, f"larger than {MAX_IMAGE_PIXELS} pixels") from None
    except UnidentifiedImageError:
        raise ImageError(source, f"cannot be decoded as an image ({len(blob)} bytes): "
                                 "not a format Pillow reads") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        if isinstance(e, ImageError):
            raise
        raise ImageError(source, f"cannot be decoded as an image ({len(blob)} bytes): {without_reprs(e)}") from None


def _converted(image: Image.Image, source: str, mode: str) -> Image.Image:
    """The decoded image in `mode`, or "F" for the modes of more than 8 bits (see the module's rules)."""
    if image.mode in SIXTEEN_BIT or image.mode == "I":
        samples = np.asarray(image, dtype=np.float64)
        if image.mode == "I" and samples.size and (samples.min() < 0 or samples.max() > SIXTEEN_BIT_MAX):
            raise ImageError(source, f"32-bit integer pixels span [{samples.min():g}, {samples.max():g}], outside "
                                     f"the 16-bit range [0, 65535] this decoder reads them in")
        return Image.fromarray((samples * (255.0 / SIXTEEN_BIT_MAX)).astype(np.float32), mode="F")
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float32)
        if not np.isfinite(values).all():
            raise ImageError(source, "float pixels include NaN or Inf")
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if low < 0 or high > 255:
            raise ImageError(source, f"float pixels span [{low:g}, {high:g}], neither [0, 1] nor [0, 255]")
        return Image.fromarray(values * 255.0 if high <= 1 else values, mode="F")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # the palette's colours (P -> RGB would warn), alpha dropped below
    try:
        return image.convert(mode) if image.mode != mode else image
    except ValueError:  # Pillow: conversion from LAB to RGB not supported, ...
        raise ImageError(source, f"image mode {image.mode} cannot be converted to {mode}") from None


Decoded = np.ndarray | Image.Image  # pixels(): libspng's array, or Pillow's image where Pillow decoded it


def pixels(blob: bytes, source: str, mode: str) -> Decoded:
    """Encoded bytes -> the image decoded at its own size in `mode`. 8-bit grey and RGB PNGs of the model's
    channel count are decoded by libspng (pyspng) into a uint8 array, (h, w) or (h, w, 3): ~5 µs for a small PNG
    against Pillow's ~30, the same samples (PNG is lossless). Everything else, and a PNG libspng refuses, is
    Pillow's image (open_image: "L", "RGB", or "F" for the modes of more than 8 bits), whose message names the
    problem; it stays a Pillow image, as Pillow sizes it (a 500x375 JPEG to an array and back cost 270 µs).
    ImageError names `source`."""
    fast = _png_pixels(blob, mode)
    return fast if fast is not None else open_image(blob, source, mode)


def image_size(image: Decoded) -> tuple[int, int]:
    """(width, height) of a decoded image."""
    return image.size if isinstance(image, Image.Image) else (image.shape[1], image.shape[0])


def _png_pixels(blob: bytes, mode: str) -> np.ndarray | None:
    """libspng's pixels for a PNG whose header says 8-bit grey ("L") or 8-bit RGB ("RGB"), as `mode` asks;
    None for any other image (gamma and transparency chunks are not applied, as Pillow does not apply them
    either)."""
    if len(blob) < 33 or not blob.startswith(PNG_SIGNATURE) or blob[12:16] != b"IHDR":
        return None
    width, height = int.from_bytes(blob[16:20], "big"), int.from_bytes(blob[20:24], "big")
    if blob[24] != 8 or blob[25] != PNG_COLOUR_TYPES[mode] or width * height > MAX_IMAGE_PIXELS:
        return None
    try:
        return pyspng.load(blob)
    except (RuntimeError, ValueError):  # corrupt or truncated: Pillow says what is wrong, or reads it
        return None


def to_inputs(images: list[Decoded], recipe: Recipe, boxes: list | None = None) -> np.ndarray:
    """Decoded images (pixels()) -> float32 (n, c, h, w) model input: resized or cropped as the recipe says, then
    (pixel / 255 - mean) / std. `boxes[i]` (left, top, right, bottom), when given and not None, resizes that
    region of image i straight to height x width instead (a random resized crop)."""
    batch = np.empty((len(images), *recipe.shape), dtype=np.float32)
    groups: dict[tuple, list[np.ndarray]] = {}  # small 8-bit images by size -> their arrays
    members: dict[tuple, list[int]] = {}  # ... and their places in the batch
    for i, image in enumerate(images):
        small = _small_array(image) if boxes is None or boxes[i] is None else None
        if small is None:
            batch[i] = _pillow_sized(image, recipe, None if boxes is None else boxes[i])
        else:
            groups.setdefault(small.shape, []).append(small)
            members.setdefault(small.shape, []).append(i)
    for shape, arrays in groups.items():
        sized = _batch_sized(np.stack(arrays), recipe)
        if sized is None:
            for i, array in zip(members[shape], arrays):
                batch[i] = _pillow_sized(array, recipe)
        else:
            batch[members[shape]] = sized
    batch /= 255.0
    batch -= recipe.mean
    batch /= recipe.std
    return batch


def _small_array(image: Decoded) -> np.ndarray | None:
    """The uint8 array of an 8-bit image of at most BATCH_RESIZE_SAMPLES samples, which _batch_sized may size
    with others of its size; None for any other image."""
    if isinstance(image, Image.Image):
        if image.mode not in ("L", "RGB") or image.width * image.height * len(image.mode) > BATCH_RESIZE_SAMPLES:
            return None
        return np.asarray(image)
    return image if image.dtype == np.uint8 and image.size <= BATCH_RESIZE_SAMPLES else None


def _batch_sized(stack: np.ndarray, recipe: Recipe) -> np.ndarray | None:
    """uint8 (n, h, w[, c]) images of one size -> uint8 (n, c, height, width) as Pillow would size each one
    (proto/resample.py); None where that module cannot promise Pillow's bytes (then Pillow sizes them)."""
    if recipe.interpolation == "nearest":
        return None
    stack = stack[:, None] if stack.ndim == 3 else stack.transpose(0, 3, 1, 2)
    height, width = stack.shape[2:]
    if recipe.resize_shorter > 0:
        size = _shorter_side_size(width, height, recipe.resize_shorter)
        resized = resample.resize(np.ascontiguousarray(stack), *size, recipe.interpolation)
        return None if resized is None else _center_cropped(resized, recipe.width, recipe.height)
    return resample.resize(np.ascontiguousarray(stack), recipe.width, recipe.height, recipe.interpolation)


def _center_cropped(stack: np.ndarray, width: int, height: int) -> np.ndarray:
    """The centre width x height of (n, c, h, w), rounded as torchvision's CenterCrop; zeros outside the image."""
    h, w = stack.shape[2:]
    if (h, w) == (height, width):
        return stack
    left, top = _crop_origin(w, h, width, height)
    out = np.zeros((*stack.shape[:2], height, width), dtype=stack.dtype)
    rows, cols = slice(max(top, 0), min(top + height, h)), slice(max(left, 0), min(left + width, w))
    out[:, :, rows.start - top:rows.stop - top, cols.start - left:cols.stop - left] = stack[:, :, rows, cols]
    return out


def _pillow_sized(image: Decoded, recipe: Recipe, box: tuple[float, float, float, float] | None = None
                  ) -> np.ndarray:
    """One decoded image -> float32 (c, height, width) on the 0..255 scale, sized by Pillow."""
    picture = image if isinstance(image, Image.Image) else Image.fromarray(image)
    size = (recipe.width, recipe.height)
    resample_filter = INTERPOLATIONS[recipe.interpolation]
    if box is not None:
        picture = picture.resize(size, resample_filter, box=box)
    elif recipe.resize_shorter > 0:
        shorter = _shorter_side_size(*picture.size, recipe.resize_shorter)
        if shorter != picture.size:
            picture = picture.resize(shorter, resample_filter)
        picture = _center_crop(picture, size)
    elif picture.size != size:
        picture = picture.resize(size, resample_filter)
    values = np.asarray(picture, dtype=np.float32)
    if values.ndim == 2:
        values = values[:, :, None]
    if values.shape[2] != recipe.channels:  # an "F" image for an RGB model: the grey in every channel
        values = np.repeat(values, recipe.channels, axis=2)
    return values.transpose(2, 0, 1)


def _shorter_side_size(width: int, height: int, shorter: int) -> tuple[int, int]:
    """(width, height) with the shorter side `shorter`, the longer one scaled alike and truncated (torchvision's
    Resize(int)); the size itself when its shorter side is `shorter` already."""
    short, long = min(width, height), max(width, height)
    if short == shorter:
        return width, height
    new_long = int(shorter * long / short)
    return (shorter, new_long) if width <= height else (new_long, shorter)


def _center_crop(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The centre `size` (width, height), rounded as torchvision's CenterCrop; zeros outside the image."""
    left, top = _crop_origin(*image.size, *size)
    return image if image.size == size else image.crop((left, top, left + size[0], top + size[1]))


def _crop_origin(width: int, height: int, crop_width: int, crop_height: int) -> tuple[int, int]:
    """(left, top) of a centred crop, rounded as torchvision's CenterCrop; negative where the image is smaller."""
    return int(round((width - crop_width) / 2.0)), int(round((height - crop_height) / 2.0))


def decode(blob: bytes, recipe: Recipe, source: str) -> np.ndarray:
    """Encoded bytes -> float32 (c, h, w) model input; ImageError names `source`."""
    return to_inputs([pixels(blob, source, recipe.mode)], recipe)[0]


def read_file(path: str | os.PathLike) -> bytes:
    """A file's bytes; a file that cannot be read is an ImageError naming it."""
    try:
        fd = os.open(path, os.O_RDONLY)  # not open().read(): 2.6 µs a small file here against its 7 (fit reads
    except OSError as e:  # thousands, on the cores the server trains on)
        raise ImageError(str(path), f"cannot be read: {e.strerror or without_reprs(e)}") from None
    try:
        data = os.read(fd, READ_CHUNK)
        if len(data) < READ_CHUNK:  # a regular file reads short only at its end
            return data
        chunks = [data]
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as e:  # a folder (EISDIR), an I/O error
        raise ImageError(str(path), f"cannot be read: {e.strerror or without_reprs(e)}") from None
    finally:
        os.close(fd)


def decode_file(path: str | os.PathLike, recipe: Recipe) -> np.ndarray:
    """An image file -> float32 (c, h, w) model input; ImageError names the file."""
    return decode(read_file(path), recipe, str(path))


def decode_batch(blobs: list[bytes], record: Any) -> np.ndarray:
    """Encoded images -> float32 (b, c, h, w); the first bad one is an ImageError naming it "image <i>"."""
    recipe = Recipe.of(record)
    return to_inputs([pixels(blob, f"image {i}", recipe.mode) for i, blob in enumerate(blobs)], recipe)
