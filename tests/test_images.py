"""proto/images.py, the one image decoder of the server and the client: every mode converts or is refused with a
reason naming the file, sizes and crops follow the preprocessing record, and the 8-bit images Predict took before
give exactly the pixels they gave then."""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from client import ViTClient
from engine.manifest import Preprocessing
from proto import vitserve_pb2 as pb
from proto import images, resample
from proto.images import (ImageError, Recipe, decode, decode_batch, decode_file, image_size, pixels, read_file,
                          to_inputs)

GREY = {"height": 8, "width": 8, "channels": 1, "mean": [0.5], "std": [0.25]}
COLOUR = {"height": 8, "width": 8, "channels": 3, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def encoded(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def reference(blob: bytes, record: dict) -> np.ndarray:
    """What the server's decoder did before it moved to proto/images.py: convert, resize (bilinear), normalize."""
    with Image.open(io.BytesIO(blob)) as image:
        image = image.convert("L" if record["channels"] == 1 else "RGB")
        if image.size != (record["width"], record["height"]):
            image = image.resize((record["width"], record["height"]), Image.Resampling.BILINEAR)
        pixels = np.asarray(image, dtype=np.float32).reshape(record["height"], record["width"], -1).transpose(2, 0, 1)
    mean = np.asarray(record["mean"], dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(record["std"], dtype=np.float32).reshape(-1, 1, 1)
    return (pixels / 255.0 - mean) / std


def normalized(pixels: np.ndarray, record: dict) -> np.ndarray:
    """(c, h, w) pixels on the 0..255 scale, normalized as the record says."""
    mean = np.asarray(record["mean"], dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(record["std"], dtype=np.float32).reshape(-1, 1, 1)
    return (pixels.astype(np.float32) / 255.0 - mean) / std


# ---------------------------------------------------------------- Predict's inputs keep their pixels

@settings(max_examples=60, deadline=None)
@given(mode=st.sampled_from(["L", "RGB", "RGBA", "LA", "P", "1", "CMYK"]), width=st.integers(1, 40),
       height=st.integers(1, 40), colour=st.booleans(), fmt=st.sampled_from(["PNG", "TIFF", "BMP"]),
       seed=st.integers(0, 2 ** 16))
def test_eight_bit_images_decode_exactly_as_before(mode, width, height, colour, fmt, seed):
    """Any 8-bit mode, any size, either target: the same float32 pixels as the decoder Predict used before."""
    channels = {"L": 1, "RGB": 3, "RGBA": 4, "LA": 2, "P": 1, "1": 1, "CMYK": 4}[mode]
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    image = Image.fromarray(array[:, :, 0] if channels == 1 else array, mode={"P": "L", "1": "L"}.get(mode, mode))
    if mode == "P":
        image = image.convert("P")
    elif mode == "1":
        image = image.convert("1")
    if mode == "CMYK" or (fmt == "BMP" and mode == "LA"):
        fmt = "TIFF"  # what those formats cannot hold
    blob = encoded(image, fmt)
    record = COLOUR if colour else GREY
    np.testing.assert_array_equal(decode(blob, Recipe.of(record), "x"), reference(blob, record))


def test_the_server_decodes_through_the_same_function(running):
    """Predict of encoded files and Predict of the client's decode of the same files give the same logits."""
    rng = np.random.default_rng(3)
    blobs = [encoded(Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8))) for h, w in ((8, 8), (13, 5))]
    with ViTClient(running.address) as client:
        info = client.model_info()
        files = client.predict(blobs, return_logits=True)
        tensors = client.predict(decode_batch(blobs, info.preprocessing), return_logits=True)
    np.testing.assert_array_equal(files.logits, tensors.logits)


def test_a_record_is_read_from_the_manifest_the_proto_or_a_dict_alike():
    blob = encoded(Image.new("RGB", (11, 7), (200, 40, 9)))
    manifest = Preprocessing(height=8, width=8, channels=3, mean=tuple(COLOUR["mean"]), std=tuple(COLOUR["std"]))
    proto = pb.Preprocessing(height=8, width=8, channels=3, mean=COLOUR["mean"], std=COLOUR["std"])
    first = decode(blob, Recipe.of(manifest), "x")
    np.testing.assert_array_equal(first, decode(blob, Recipe.of(COLOUR), "x"))
    np.testing.assert_allclose(first, decode(blob, Recipe.of(proto), "x"), rtol=1e-6)  # proto floats are float32
    assert Recipe.of({**GREY, "interpolation": ""}).interpolation == "bilinear"  # proto3's unset string


# ---------------------------------------------------------------- modes beyond 8 bits, alpha, palettes

def test_a_16_bit_png_is_scaled_from_65535_not_clipped(tmp_path):
    samples = np.array([[0, 257, 32768, 65535]] * 4, dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(samples).save(path)
    with Image.open(path) as check:
        assert check.mode == "I;16"
    record = {**GREY, "height": 4, "width": 4}
    expected = normalized((samples * (255 / 65535)).astype(np.float32)[None], record)
    np.testing.assert_allclose(decode_file(path, Recipe.of(record)), expected, rtol=1e-6)
    colour = decode_file(path, Recipe.of({**COLOUR, "height": 4, "width": 4}))
    assert colour.shape == (3, 4, 4) and np.ptp(colour[:, 0, 3] * np.array(COLOUR["std"]) + COLOUR["mean"]) < 1e-6


def test_32_bit_integer_and_float_images(tmp_path):
    record = Recipe.of({**GREY, "height": 1, "width": 2})
    wide = Image.fromarray(np.array([[-5, 70000]], dtype=np.int32), mode="I")
    with pytest.raises(ImageError) as err:
        decode(encoded(wide, "TIFF"), record, "wide.tif")
    assert str(err.value) == ("wide.tif: 32-bit integer pixels span [-5, 70000], outside the 16-bit range "
                              "[0, 65535] this decoder reads them in")
    unit = Image.fromarray(np.array([[0.0, 1.0]], dtype=np.float32), mode="F")
    np.testing.assert_allclose(decode(encoded(unit, "TIFF"), record, "u"), normalized(np.array([[[0, 255]]]), GREY))
    byte_scale = Image.fromarray(np.array([[0.0, 200.0]], dtype=np.float32), mode="F")
    np.testing.assert_allclose(decode(encoded(byte_scale, "TIFF"), record, "b"),
                               normalized(np.array([[[0, 200]]]), GREY))
    for values, reason in (([0.5, np.nan], "float pixels include NaN or Inf"),
                           ([-1.0, 300.0], "float pixels span [-1, 300], neither [0, 1] nor [0, 255]")):
        with pytest.raises(ImageError) as err:
            decode(encoded(Image.fromarray(np.array([values], dtype=np.float32), mode="F"), "TIFF"), record, "f.tif")
        assert str(err.value) == f"f.tif: {reason}"


def test_alpha_is_dropped_and_a_transparent_palette_keeps_its_colours():
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 90, 0  # red 90 under a fully transparent pixel
    out = decode(encoded(Image.fromarray(rgba, "RGBA")), Recipe.of(COLOUR), "a.png")
    np.testing.assert_allclose(out[:, 0, 0], normalized(np.array([90, 0, 0])[:, None, None], COLOUR)[:, 0, 0])
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 30, 60, 90] + [0] * 762)
    blob = encoded(palette, transparency=bytes([0, 0] + [255] * 254))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # P -> RGB straight would warn about its transparency
        out = decode(blob, Recipe.of(COLOUR), "p.png")
    np.testing.assert_allclose(out[:, 3, 3], normalized(np.array([30, 60, 90])[:, None, None], COLOUR)[:, 0, 0],
                               rtol=1e-6)
    grey_alpha = np.zeros((8, 8, 2), dtype=np.uint8)
    grey_alpha[..., 0] = 77
    out = decode(encoded(Image.fromarray(grey_alpha, "LA")), Recipe.of(GREY), "la.png")
    np.testing.assert_allclose(out, normalized(np.full((1, 8, 8), 77), GREY))


def test_cmyk_jpeg_converts_and_a_mode_without_conversion_is_refused():
    cmyk = encoded(Image.new("CMYK", (9, 6), (0, 255, 255, 0)), "JPEG", quality=100)
    red = decode(cmyk, Recipe.of(COLOUR), "c.jpg") * np.array(COLOUR["std"])[:, None, None] + \
        np.array(COLOUR["mean"])[:, None, None]
    assert red.shape == (3, 8, 8) and red[0].min() > 0.9 and red[1:].max() < 0.1
    with pytest.raises(ImageError) as err:
        decode(encoded(Image.new("LAB", (4, 4)), "TIFF"), Recipe.of(GREY), "lab.tif")
    assert str(err.value) == "lab.tif: image mode LAB cannot be converted to L"


# ---------------------------------------------------------------- bad files

def test_a_file_larger_than_the_first_read_is_read_whole(tmp_path):
    """read_file reads 64 KiB first and the rest in further reads: a noisy 200x200 RGB PNG is ~120 KB."""
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (200, 200, 3), dtype=np.uint8))
    blob = encoded(image)
    assert len(blob) > images.READ_CHUNK
    (tmp_path / "big.png").write_bytes(blob)
    assert read_file(tmp_path / "big.png") == blob
    np.testing.assert_array_equal(decode_file(tmp_path / "big.png", Recipe.of(COLOUR)), reference(blob, COLOUR))


def test_unreadable_corrupt_and_non_image_files_are_one_error_naming_the_file(tmp_path):
    recipe = Recipe.of(GREY)
    good = encoded(Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)))
    cases = {
        "notes.txt": (b"hello, not an image\n", "cannot be decoded as an image (20 bytes): not a format Pillow reads"),
        "truncated.png": (good[:-30], f"cannot be decoded as an image ({len(good) - 30} bytes): image file is truncated"),
        "empty.png": (b"", "cannot be decoded as an image (0 bytes): not a format Pillow reads"),
    }
    for name, (data, reason) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ImageError) as err:
            decode_file(tmp_path / name, recipe)
        assert str(err.value) == f"{tmp_path / name}: {reason}"
    with pytest.raises(ImageError) as err:
        decode_file(tmp_path / "missing.png", recipe)
    assert str(err.value) == f"{tmp_path / 'missing.png'}: cannot be read: No such file or directory"
    with pytest.raises(ImageError) as err:
        decode_batch([good, b"GIF89a"], GREY)
    assert str(err.value) == "image 1: cannot be decoded as an image (6 bytes): not a format Pillow reads"


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # making the test image
def test_the_decompression_bomb_limit_holds():
    with pytest.raises(ImageError) as err:
        decode(encoded(Image.new("L", (4097, 4096))), Recipe.of(GREY), "big.png")
    assert str(err.value) == "big.png: larger than 16777216 pixels"


@settings(max_examples=40, deadline=None)
@given(data=st.binary(max_size=300))
def test_any_bytes_decode_to_finite_pixels_or_an_image_error(data):
    try:
        out = decode(data, Recipe.of(COLOUR), "blob")
    except ImageError as e:
        assert str(e).startswith("blob: ")
    else:
        assert out.shape == (3, 8, 8) and np.isfinite(out).all()


# ---------------------------------------------------------------- size: straight resize or shorter side + crop

@settings(max_examples=40, deadline=None)
@given(width=st.integers(1, 60), height=st.integers(1, 60), shorter=st.integers(4, 20),
       interpolation=st.sampled_from(["nearest", "bilinear", "bicubic", "lanczos"]))
def test_resize_shorter_then_center_crop(width, height, shorter, interpolation):
    """Shorter side N, the longer N * long / short truncated (torchvision's Resize(N)), then the centre 8x8
    (torchvision's CenterCrop rounding; zeros where N < 8), with the record's Pillow filter."""
    array = np.random.default_rng(width * 100 + height).integers(0, 256, (height, width), dtype=np.uint8)
    record = {**GREY, "resize_shorter": shorter, "interpolation": interpolation}
    filt = getattr(Image.Resampling, interpolation.upper())
    image = Image.fromarray(array)
    if min(width, height) != shorter:
        long = int(shorter * max(width, height) / min(width, height))
        image = image.resize((shorter, long) if width <= height else (long, shorter), filt)
    w, h = image.size
    left, top = int(round((w - 8) / 2.0)), int(round((h - 8) / 2.0))
    expected = np.asarray(image.crop((left, top, left + 8, top + 8)), dtype=np.float32)[None]
    np.testing.assert_array_equal(decode(encoded(Image.fromarray(array)), Recipe.of(record), "x"),
                                  normalized(expected, GREY))


FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
           "lanczos": Image.Resampling.LANCZOS}


@settings(max_examples=80, deadline=None)
@given(height=st.integers(1, 70), width=st.integers(1, 70), out_height=st.integers(1, 70),
       out_width=st.integers(1, 70), channels=st.sampled_from([1, 3]), interpolation=st.sampled_from(list(FILTERS)),
       edges=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_the_batch_resize_gives_pillows_bytes_or_declines(height, width, out_height, out_width, channels,
                                                            interpolation, edges, seed):
    """proto/resample.py resizes three images at once to exactly the bytes Pillow's resize gives each, or
    returns None (then Pillow does it). `edges`: black and white only, where the filters overshoot most."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (3, height, width, channels), dtype=np.uint8)
    if edges:
        images = (images > 127).astype(np.uint8) * 255
    out = resample.resize(np.ascontiguousarray(images.transpose(0, 3, 1, 2)), out_width, out_height, interpolation)
    if out is None:
        return
    for image, got in zip(images, out):
        pillow = Image.fromarray(image[:, :, 0] if channels == 1 else image)
        expected = np.asarray(pillow.resize((out_width, out_height), FILTERS[interpolation]))
        np.testing.assert_array_equal(got, expected.reshape(out_height, out_width, channels).transpose(2, 0, 1))


@pytest.mark.parametrize("interpolation", list(FILTERS))
@pytest.mark.parametrize("channels", [1, 3])
def test_the_batch_resize_takes_the_usual_sizes(interpolation, channels):
    """The sizes datasets of small images come in are resized here, not handed back to Pillow: a 2x reduction,
    224 -> 32 style reductions, enlargements, one side only."""
    for height, width, out_height, out_width in [(16, 16, 8, 8), (32, 32, 28, 28), (28, 28, 32, 32),
                                                 (64, 48, 32, 32), (8, 8, 16, 16), (16, 12, 16, 8)]:
        images = np.zeros((2, channels, height, width), np.uint8)
        assert resample.resize(images, out_width, out_height, interpolation) is not None, (height, width)


def test_8_bit_grey_and_rgb_pngs_are_read_by_libspng_and_other_images_by_pillow():
    grey = np.random.default_rng(0).integers(0, 256, (5, 7), dtype=np.uint8)
    colour = np.random.default_rng(1).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(images._png_pixels(encoded(Image.fromarray(grey)), "L"), grey)
    np.testing.assert_array_equal(images._png_pixels(encoded(Image.fromarray(colour)), "RGB"), colour)
    pillow_only = [(encoded(Image.fromarray(grey)), "RGB"),  # a channel conversion: Pillow's luma / copy rules
                   (encoded(Image.fromarray(colour)), "L"),
                   (encoded(Image.fromarray(grey.astype(np.uint16) * 257)), "L"),  # 16-bit
                   (encoded(Image.fromarray(colour).convert("P")), "RGB"),  # palette
                   (encoded(Image.fromarray(colour).convert("RGBA")), "RGB"),
                   (encoded(Image.fromarray(grey), "JPEG"), "L")]
    for blob, mode in pillow_only:
        assert images._png_pixels(blob, mode) is None
        assert image_size(pixels(blob, "x", mode)) == (7, 5)
    truncated = encoded(Image.fromarray(grey))[:-30]
    assert images._png_pixels(truncated, "L") is None  # libspng refuses it: Pillow names the problem
    with pytest.raises(ImageError, match="image file is truncated"):
        pixels(truncated, "x", "L")


def test_interpolation_picks_the_filter_and_a_bad_one_is_refused():
    array = np.random.default_rng(1).integers(0, 256, (16, 16), dtype=np.uint8)
    blob = encoded(Image.fromarray(array))
    nearest = decode(blob, Recipe.of({**GREY, "interpolation": "nearest"}), "x")
    expected = np.asarray(Image.fromarray(array).resize((8, 8), Image.Resampling.NEAREST), dtype=np.float32)[None]
    np.testing.assert_array_equal(nearest, normalized(expected, GREY))
    assert not np.array_equal(nearest, decode(blob, Recipe.of(GREY), "x"))
    with pytest.raises(ValueError) as err:
        Recipe.of({**GREY, "interpolation": "cubic"})
    assert str(err.value) == ("preprocessing: interpolation must be one of nearest, bilinear, bicubic, lanczos, "
                              "got 'cubic'")


def test_a_box_resizes_that_region_straight(tmp_path: Path):
    array = np.arange(256, dtype=np.uint8).reshape(16, 16)
    image = pixels(encoded(Image.fromarray(array)), "x", "L")
    out = to_inputs([image], Recipe.of({**GREY, "resize_shorter": 12}), boxes=[(0, 0, 8, 8)])[0]
    np.testing.assert_array_equal(out, normalized(array[:8, :8][None].astype(np.float32), GREY))
