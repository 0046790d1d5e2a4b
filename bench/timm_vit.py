"""timm's VisionTransformer for the benchmark's third trainer comparison (ViT-S/16 at 224, bench/artifacts.py MODELS).

timm imports torchvision, which has no CPU build for the pinned torch on PyPI: tests/torchvision_shim.py
lets timm import without it (loaded here by its path, so no other package named `tests` can stand in for it).
`python -m model.export --model bench.timm_vit:VisionTransformer --kwargs '{...}'` exports it like any
module:Class, and bench.artifacts.torch_model builds the eager reference from the same class.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SHIM = Path(__file__).resolve().parent.parent / "tests" / "torchvision_shim.py"


def _import_timm():
    spec = importlib.util.spec_from_file_location("vitserve_torchvision_shim", SHIM)
    shim = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = shim
    spec.loader.exec_module(shim)
    return shim.import_timm()


_import_timm()
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

__all__ = ["VisionTransformer", "SHIM"]
