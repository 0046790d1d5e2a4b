"""Which PyTorch classifier `--model` names, built from its real package: `module:Class` with JSON kwargs (a Hugging
Face class from its config class), or `timm:NAME` (timm.create_model). Nothing is downloaded."""
from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import torch

from model.errors import ExportError

CHANNEL_KWARGS = ("channels", "num_channels", "in_chans", "in_channels")  # vit-pytorch, Hugging Face, timm, ...
IMAGE_SIZE_KWARGS = ("image_size", "img_size")
TIMM = "timm:"  # --model timm:NAME builds timm.create_model(NAME, pretrained=False, **kwargs)


def load_class(spec: str):
    """'package.module:Class' -> the class.

    A package whose __init__ imports optional extras (vit-pytorch's imports torchvision)
    still has leaf modules that import fine on their own: if importing the package
    fails, load the leaf module's file alone.
    """
    module_name, _, class_name = spec.partition(":")
    if not class_name:
        raise ExportError(f"--model must look like module:Class, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        top, *middle = module_name.split(".")
        found = importlib.util.find_spec(top)  # finds a top-level package without running it
        if found is None or not found.submodule_search_locations or not middle:
            raise ExportError(f"cannot import {module_name}: {error}") from None
        path = Path(list(found.submodule_search_locations)[0]).joinpath(*middle[:-1], middle[-1] + ".py")
        if not path.is_file():
            raise ExportError(f"cannot import {module_name}: {error}") from None
        leaf = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(leaf)
        try:
            leaf.loader.exec_module(module)
        except ImportError as leaf_error:  # the leaf needs the missing package too (timm's needs torchvision)
            raise ExportError(f"cannot import {module_name}: {leaf_error}") from None
    if not hasattr(module, class_name):
        raise ExportError(f"{module_name} has no {class_name}")
    return getattr(module, class_name)


def construct(cls, kwargs: dict) -> torch.nn.Module:
    """An instance of `cls` from JSON kwargs. A Hugging Face model (it has a `config_class`) gets its config built
    from them; a model whose forward returns an output object is made to return that object's `logits`."""
    config_class = getattr(cls, "config_class", None)
    try:
        model = cls(config_class(**kwargs)) if config_class is not None else cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ExportError(f"cannot build {cls.__name__} from --kwargs: {e}") from None
    model.register_forward_hook(logits_only)
    return model


def logits_only(module, inputs, output):
    """Forward hook: the logits tensor of an output object (transformers' ImageClassifierOutput), else the output."""
    return output.logits if not isinstance(output, torch.Tensor) and hasattr(output, "logits") else output


def is_hugging_face(cls) -> bool:
    return getattr(cls, "config_class", None) is not None and hasattr(cls, "from_pretrained")


def create_timm(name: str, kwargs: dict) -> torch.nn.Module:
    """timm.create_model(name, pretrained=False, **kwargs): the architecture, randomly initialised, with its
    pretrained_cfg (the preprocessing its published weights expect)."""
    try:
        import timm
    except ImportError as e:  # timm 1.0 imports torchvision (docs/design.md#timm-beside-the-cpu-torch)
        raise ExportError(f"cannot import timm: {e}") from None
    if "pretrained" in kwargs:
        raise ExportError("timm models are built with pretrained=False: give the weights with --pretrained FILE")
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except Exception as e:  # noqa: BLE001 - an unknown name or a bad kwarg is one line for the user
        raise ExportError(f"timm cannot create {name}: {str(e).strip().splitlines()[0] if str(e).strip() else e!r}") \
            from None


def kwarg(kwargs: dict, names: tuple[str, ...]):
    """The first of `names` that `kwargs` gives, else None."""
    return next((kwargs[k] for k in names if k in kwargs), None)
