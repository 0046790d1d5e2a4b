"""A test-only import shim that lets `import timm` work beside the pinned CPU torch, which has no torchvision.

Why: timm 1.0.x imports torchvision at import time (`timm/layers/create_norm.py` does
`from torchvision.ops.misc import FrozenBatchNorm2d`, `timm/data` imports datasets and transforms),
while VisionTransformer never uses it. PyPI's torchvision for torch 2.13.0 is a CUDA build that fails
to import beside the CPU build (`operator torchvision::nms does not exist`), and a matching CPU
build is not on PyPI. So, for the tests only: `import_timm()` answers every `torchvision.*` import
with an empty module whose attributes are placeholder classes (calling one raises), imports timm,
then removes the shim again, so that nothing imported later (transformers checks whether
torchvision is installed) sees a torchvision. timm's own code runs unchanged. docs/design.md
("timm beside the CPU torch") says the same.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

PACKAGE = "torchvision"


class _Placeholder(type):
    """A class standing for any torchvision name: attributes are placeholders too, instances cannot be made."""

    def __getattr__(cls, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _placeholder(f"{cls.__qualname__}.{name}")

    def __call__(cls, *args, **kwargs):
        raise RuntimeError(f"{cls.__qualname__}: torchvision is not installed (test shim for importing timm)")


def _placeholder(name: str) -> type:
    return _Placeholder(name, (), {"__qualname__": name})


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname == PACKAGE or fullname.startswith(PACKAGE + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []

        def attribute(name: str):
            if name.startswith("__"):
                raise AttributeError(name)
            return _placeholder(f"{spec.name}.{name}")

        module.__getattr__ = attribute
        return module

    def exec_module(self, module):
        pass


def import_timm():
    """`timm` imported with the shim in place, and the shim gone again afterwards."""
    if "timm" in sys.modules:
        return sys.modules["timm"]
    if importlib.util.find_spec(PACKAGE) is not None:  # a real torchvision: no shim
        return importlib.import_module("timm")
    finder = _Finder()
    sys.meta_path.insert(0, finder)
    try:
        timm = importlib.import_module("timm")
        importlib.import_module("timm.models.vision_transformer")
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if n == PACKAGE or n.startswith(PACKAGE + ".")]:
            del sys.modules[name]
    return timm
