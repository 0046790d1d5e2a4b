"""Exported models for the benchmark, cached under bench/.cache/ (git-ignored) and reused across runs.

A cache entry is `<cache>/<preset>-<key>/<preset>/`. The key hashes every file that shapes an
export: each .py under model/ (the torch model and the exporter) and engine/ (the manifest, the
graph fusion applied to the exported inference model, the engines the export check runs), by path
and content, plus the torch / onnx / onnxruntime-training-cpu versions. A change to any of them
exports again. Exports run as `python -m model.export` (seed 0), the command users run, so the
vit-tiny export doubles as the export workload's measurement.

Besides the presets, MODELS names models exported with `--model module:Class --kwargs JSON` (timm's ViT-S/16
at 224 for the trainer comparison); their cache key adds the model's spec and the files that define it.
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

# Models beyond model.vit's presets, exported with --model/--kwargs (bench/timm_vit.py imports timm through the
# tests' torchvision shim). name -> the export's --model, its constructor's kwargs and the files that shape it.
MODELS = {
    "vit-s16-224": {
        "model": "bench.timm_vit:VisionTransformer",
        "kwargs": {"img_size": 224, "patch_size": 16, "embed_dim": 384, "depth": 12, "num_heads": 6,
                   "num_classes": 10},
        "files": ("bench/timm_vit.py", "tests/torchvision_shim.py"),
        "title": "timm ViT-S/16 224",
    },
}


def input_spec(name: str) -> tuple[int, int, int]:
    """(channels, image size, classes) of a preset or a MODELS entry."""
    if name in MODELS:
        k = MODELS[name]["kwargs"]
        return k.get("in_chans", 3), k["img_size"], k["num_classes"]
    from model.vit import PRESETS

    c = PRESETS[name]
    return c.channels, c.image_size, c.num_classes


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


def export_command(name: str, out: Path) -> list[str]:
    """The `python -m model.export` command line of a preset or a MODELS entry."""
    import json

    if name in MODELS:
        spec = MODELS[name]
        what = ["--model", spec["model"], "--kwargs", json.dumps(spec["kwargs"]), "--name", name]
    else:
        what = ["--preset", name]
    return [sys.executable, "-m", "model.export", *what, "--out", str(out)]


def run_export(preset: str, out: Path) -> dict:
    """`python -m model.export --preset P --out OUT` (or a MODELS entry's --model/--kwargs); returns
    {'wall_s', 'export_s' (the manifest's), 'folder'}."""
    started = time.perf_counter()
    proc = subprocess.run(export_command(preset, out), cwd=ROOT, capture_output=True, text=True)
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
        self.exported: dict[str, dict] = {}  # what ensure() exported in this run: name -> run_export's wall_s etc.

    def entry_key(self, name: str) -> str:
        """The cache key; for a MODELS entry with its spec and files (by content) hashed in too."""
        if name not in MODELS:
            return self.key
        import json

        spec = MODELS[name]
        digest = hashlib.sha256(self.key.encode() + json.dumps([spec["model"], spec["kwargs"]], sort_keys=True).encode())
        for f in spec["files"]:
            digest.update(f.encode() + b"\0" + (ROOT / f).read_bytes())
        return digest.hexdigest()[:12]

    def folder(self, preset: str) -> Path:
        return self.root / f"{preset}-{self.entry_key(preset)}" / preset

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
                result = run_export(preset, Path(tmp))
                self.adopt(preset, result["folder"])
                self.exported[preset] = {"wall_s": round(result["wall_s"], 1), "export_s": result["export_s"]}
        return self.folder(preset)


def initial_weights(folder: Path) -> dict[str, np.ndarray]:
    """Every parameter of the export's checkpoint (the weights the server starts from), by PyTorch name."""
    from onnxruntime.capi import _pybind_state as C

    state = C.load_checkpoint(str(Path(folder) / "checkpoint"))
    return {n: state.get_parameter(n).data.numpy().copy() for n in state.parameter_names()}


def torch_model(preset: str, folder: Path):
    """The preset's (or MODELS entry's) PyTorch model holding exactly the exported weights (strict load: every
    name must match)."""
    import torch

    if preset in MODELS:
        from model.export import construct, load_class

        model = construct(load_class(MODELS[preset]["model"]), MODELS[preset]["kwargs"])
    else:
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
