"""manifest.json: what `make export` wrote and how to use it. Read by the server, written by model/export.py."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from server.errors import ConfigError

MANIFEST = "manifest.json"
INFERENCE_MODEL = "inference.onnx"
TRAINING_MODEL = "training_model.onnx"
EVAL_MODEL = "eval_model.onnx"
OPTIMIZER_MODEL = "optimizer_model.onnx"
CHECKPOINT = "checkpoint"
ARTIFACT_FILES = (INFERENCE_MODEL, TRAINING_MODEL, EVAL_MODEL, OPTIMIZER_MODEL, CHECKPOINT)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Preprocessing:
    height: int
    width: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True)
class QkvLayout:
    """Where a fused qkv projection sits: rows [0, inner) are q, [inner, 2 inner) k, the rest v."""

    name: str
    block: int
    heads: int
    dim_head: int


@dataclass(frozen=True)
class Manifest:
    folder: Path
    raw: dict

    @classmethod
    def load(cls, folder: Path) -> "Manifest":
        folder = Path(folder)
        path = folder / MANIFEST
        if not path.is_file():
            raise ConfigError(f"{path} not found: run `make export` (or python -m model.export) first")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        manifest = cls(folder, raw)
        manifest.verify_files()
        return manifest

    def verify_files(self) -> None:
        """Every artifact exists and has the sha256 the export recorded."""
        for name in ARTIFACT_FILES:
            path = self.folder / name
            if not path.is_file():
                raise ConfigError(f"artifact {path} is missing: re-run the export")
            expected = self.raw["files"][name]
            if sha256(path) != expected:
                raise ConfigError(f"artifact {path} does not match the sha256 in {MANIFEST}: re-run the export")

    def path(self, name: str) -> Path:
        return self.folder / name

    @property
    def name(self) -> str:
        return self.raw["name"]

    @property
    def input_name(self) -> str:
        return self.raw["input"]["name"]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """(-1, C, H, W): -1 is the dynamic batch axis."""
        return tuple(self.raw["input"]["shape"])

    @property
    def output_name(self) -> str:
        return self.raw["output"]["name"]

    @property
    def class_names(self) -> list[str]:
        return list(self.raw["class_names"])

    @property
    def num_classes(self) -> int:
        return len(self.raw["class_names"])

    @property
    def preprocessing(self) -> Preprocessing:
        p = self.raw["preprocessing"]
        return Preprocessing(p["height"], p["width"], p["channels"], tuple(p["mean"]), tuple(p["std"]))

    @property
    def parameters(self) -> list[dict]:
        """[{name, shape, trainable}] in model order."""
        return list(self.raw["parameters"])

    @property
    def trainable(self) -> list[str]:
        return [p["name"] for p in self.raw["parameters"] if p["trainable"]]

    @property
    def qkv(self) -> list[QkvLayout]:
        return [QkvLayout(**a) for a in self.raw["attention"]]
