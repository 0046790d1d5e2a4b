"""What a checkpoint's own config says about its inputs and classes: the preprocessing (resize, crop, filter, mean,
std) of timm's pretrained_cfg or Hugging Face's preprocessor_config.json, expressed as the server's Preprocessing
(engine/manifest.py) at the model's input size; the class names of a file, an ImageFolder or config.id2label."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from engine.manifest import INTERPOLATIONS
from model.errors import ExportError

PIL_FILTERS = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}  # Image.Resampling


@dataclass(frozen=True)
class Recipe:
    """The preprocessing a checkpoint's own config asks for, at the model's input size."""
    origin: str  # the file or config it was read from
    resize_shorter: int = 0
    interpolation: str = "bilinear"
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    notes: tuple[str, ...] = ()


def _filter(name: str, notes: list[str]) -> str:
    if name in INTERPOLATIONS:
        return name
    notes.append(f"interpolation {name!r} is not one of {', '.join(INTERPOLATIONS)}: bilinear instead")
    return "bilinear"


def timm_recipe(cfg: dict, size: int) -> Recipe:
    """timm's pretrained_cfg: interpolation, mean, std, and with crop_mode 'center' (its default) the shorter side
    resized to floor(size / crop_pct) before the centre crop, as timm's eval transform does."""
    notes: list[str] = []
    crop_pct, mode = cfg.get("crop_pct") or 0.875, cfg.get("crop_mode") or "center"  # timm's DEFAULT_CROP_PCT
    if mode == "center":
        shorter = math.floor(size / crop_pct)
    else:
        shorter = 0
        notes.append(f"crop_mode {mode!r} is not a centre crop: images are resized straight to {size}x{size}")
    mean, std = cfg.get("mean"), cfg.get("std")
    return Recipe("timm pretrained_cfg", shorter, _filter(cfg.get("interpolation") or "bilinear", notes),
                  tuple(mean) if mean else None, tuple(std) if std else None, tuple(notes))


def timm_config(model: nn.Module, checkpoint: Path | None) -> dict:
    """The pretrained_cfg of a timm hub folder's config.json beside the checkpoint, else the architecture's own."""
    beside = checkpoint.parent / "config.json" if checkpoint else None
    if beside and beside.is_file():
        cfg = json.loads(beside.read_text()).get("pretrained_cfg")
        if isinstance(cfg, dict):
            return cfg
    return dict(getattr(model, "pretrained_cfg", None) or {})


def _edge(value, key: str):
    """An HF size entry: an int, or a dict's `key` (height, width, shortest_edge)."""
    return value if isinstance(value, int) else (value or {}).get(key)


def hugging_face_recipe(folder: Path, size: int) -> Recipe | None:
    """preprocessor_config.json's resize, crop, filter and normalisation at the model's input size `size`, or None
    when the folder has none. The server computes (pixel / 255 - mean) / std, so do_rescale's factor folds into them."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return None
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"cannot read {path}: {e}") from None
    notes: list[str] = []
    resample = cfg.get("resample", 2)
    interpolation = _filter(PIL_FILTERS.get(resample, str(resample)), notes)
    resize, crop = cfg.get("size"), cfg.get("crop_size") if cfg.get("do_center_crop") else None
    shortest = _edge(resize, "shortest_edge")
    if crop is not None:  # resize, then a centre crop of crop_size
        final = _edge(crop, "height") or size
        before = shortest or min(_edge(resize, "height") or final, _edge(resize, "width") or final)
        if not shortest:
            notes.append(f"resized to {before}x{before} then cropped: recorded as the shorter side to {before}, "
                         "the same for square images")
    elif shortest and cfg.get("crop_pct") and shortest < 384:  # ConvNeXt's: shorter side to shortest / crop_pct, crop
        final, before = shortest, int(shortest / cfg["crop_pct"])
    elif shortest and cfg.get("crop_pct"):  # ConvNeXt's at 384 and up: warped to shortest x shortest
        final, before = shortest, 0
    elif shortest:
        final, before = shortest, shortest
    else:  # straight to height x width
        final, before = _edge(resize, "height") or size, 0
    if final != size:
        notes.append(f"it gives {final}x{final} images, the model takes {size}x{size}: scaled to fit")
        before = round(before * size / final)
    # HF feeds (pixel * r - m) / s, r the rescale factor (1 without rescaling); the server (pixel / 255 - mean) / std
    scale = 255 * (cfg.get("rescale_factor", 1 / 255) if cfg.get("do_rescale", True) else 1.0)
    if cfg.get("do_normalize", True):
        mean, std = cfg.get("image_mean"), cfg.get("image_std")
    else:
        mean, std = [0.0], [1.0]
    if mean is None or std is None:
        return Recipe("preprocessor_config.json", before, interpolation, notes=tuple(notes))
    mean, std = ([v] if isinstance(v, (int, float)) else v for v in (mean, std))
    return Recipe("preprocessor_config.json", before, interpolation, tuple(m / scale for m in mean),
                  tuple(v / scale for v in std), tuple(notes))


def hugging_face_labels(model: nn.Module) -> list[str] | None:
    """config.id2label in index order, unless it is transformers' default LABEL_i."""
    id2label = getattr(getattr(model, "config", None), "id2label", None) or {}
    names = [str(id2label[i]) for i in sorted(id2label, key=int)]
    return None if not names or names == [f"LABEL_{i}" for i in range(len(names))] else names


def read_labels(path: Path) -> list[str]:
    """One class name a line (trailing blank lines ignored)."""
    try:
        lines = path.read_text().rstrip("\n").split("\n")
    except OSError as e:
        raise ExportError(f"--labels {path}: {e.strerror or e}") from None
    return [line.strip() for line in lines]


def labels_from(folder: Path) -> list[str]:
    """The sub-folder names of an ImageFolder (one sub-folder per class), sorted; hidden ones skipped."""
    if not folder.is_dir():
        raise ExportError(f"--labels-from {folder}: not a folder")
    names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise ExportError(f"--labels-from {folder}: no sub-folders (one per class) in it")
    return names
