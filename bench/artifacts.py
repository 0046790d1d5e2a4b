"""Exported models for the benchmark, cached under bench/.cache/ (git-ignored) and reused across runs.

A cache entry is `<cache>/<preset>-<key>/<preset>/`. The key hashes every file that shapes an
export: each .py under model/ (the torch model and the exporter) and engine/ (the manifest, the
graph fusion applied to the exported inference model, the engines the export check runs), by path
and content, plus the torch / onnx / onnxruntime-training-cpu versions. A change to any of them
exports again. Exports run as `python -m model.export` (seed 0), the command users run, so the
vit-tiny export doubles as the export workload's measurement.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = ROOT / "bench" / ".cache"
KEY_FOLDERS = ("model", "engine")  # every .py beneath them goes into the cache key
KEY_PACKAGES = ("torch", "onnx", "onnxruntime-training-cpu")


def key_files() -> list[Path]:
    """The files the cache key hashes, sorted by path relative to the repository."""
    return sorted((f for folder in KEY_FOLDERS for f in (ROOT / folder).rglob("*.py")),
                  key=lambda f: f.relative_to(ROOT).as_posix())


def cache_key() -> str:
    """12 hex digits of a SHA-256 over key_files() (path and bytes of each) and the KEY_PACKAGES versions."""
    from importlib.metadata import PackageNotFoundError, version

    digest = hashlib.sha256()
    for f in key_files():
        digest.update(f.relative_to(ROOT).as_posix().encode() + b"\0")
        digest.update(f.read_bytes())
    for package in KEY_PACKAGES:
        try:
            digest.update(f"{package}={version(package)}".encode())
        except PackageNotFoundError:  # another ORT build (the CUDA one): still part of the key by name
            digest.update(package.encode())
    return digest.hexdigest()[:12]


def run_export(preset: str, out: Path) -> dict:
    """`python -m model.export --preset P --out OUT`; returns {'wall_s', 'export_s' (the manifest's), 'folder'}."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "model.export", "--preset", preset, "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"export of {preset} failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    from engine.manifest import Manifest

    folder = out / preset
    return {"wall_s": wall, "export_s": Manifest.load(folder).export_seconds, "folder": folder}


class ArtifactCache:
    def __init__(self, root: Path = DEFAULT_CACHE):
        self.root = Path(root)
        self.key = cache_key()

    def folder(self, preset: str) -> Path:
        return self.root / f"{preset}-{self.key}" / preset

    def has(self, preset: str) -> bool:
        from engine.errors import ConfigError
        from engine.manifest import Manifest

        try:
            Manifest.load(self.folder(preset))
            return True
        except ConfigError:
            return False

    def adopt(self, preset: str, folder: Path) -> Path:
        """Move a freshly exported folder into the cache (replacing stale entries of the preset)."""
        target = self.folder(preset)
        for old in self.root.glob(f"{preset}-*"):
            shutil.rmtree(old, ignore_errors=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(folder), str(target))
        return target

    def ensure(self, preset: str) -> Path:
        if not self.has(preset):
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=self.root, prefix=f".export-{preset}-") as tmp:
                self.adopt(preset, run_export(preset, Path(tmp))["folder"])
        return self.folder(preset)


def initial_weights(folder: Path) -> dict[str, np.ndarray]:
    """Every parameter of the export's checkpoint (the weights the server starts from), by PyTorch name."""
    from onnxruntime.capi import _pybind_state as C

    state = C.load_checkpoint(str(Path(folder) / "checkpoint"))
    return {n: state.get_parameter(n).data.numpy().copy() for n in state.parameter_names()}


def torch_model(preset: str, folder: Path):
    """The preset's PyTorch ViT holding exactly the exported weights (strict load: every name must match)."""
    import torch

    from model.vit import PRESETS, build

    model = build(PRESETS[preset])
    weights = initial_weights(folder)
    model.load_state_dict({n: torch.from_numpy(w) for n, w in weights.items()}, strict=True)
    return model


def threads() -> int:
    """The cores this process may use: the thread count given to PyTorch (ONNX Runtime's default uses them all)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
