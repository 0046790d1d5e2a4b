"""Pretrained weights into the model the export builds, and what the checkpoint says about its inputs and classes.

A checkpoint is a Hugging Face folder (config.json + model.safetensors, what `save_pretrained` writes; loaded by
`from_pretrained`) or one state_dict file (.safetensors, or .pt/.pth/.bin from `torch.save`). Every tensor of the
model must come from it, same name and shape, except the classification head when `--num-classes` replaces it;
a mismatch is one ExportError naming the first tensors that differ. What was loaded, what is new and what the
checkpoint held that the model did not take is the LoadReport. Only local files are read: nothing is downloaded.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from model.classes import (CHANNEL_KWARGS, IMAGE_SIZE_KWARGS, TIMM, construct, create_timm, is_hugging_face, kwarg,
                           load_class, logits_only)
from model.errors import ExportError
from model.recipes import Recipe, hugging_face_labels, hugging_face_recipe, timm_config, timm_recipe
from model.vit import DEFAULT_PRESET, PRESETS, build

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # what save_pretrained and timm's hub folders hold
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
WRAPPERS = ("state_dict", "model", "module")  # training checkpoints keep the state_dict under one of these
SHOWN = 3  # differences named in a mismatch's one line


@dataclass
class LoadReport:
    """Which of the model's tensors came from the checkpoint, which are new, which checkpoint tensors went unused."""
    checkpoint: str
    loaded: list[str]
    new: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)

    def as_source(self) -> dict:
        """For the manifest's source: the loaded tensors by count (every model tensor that is not new)."""
        return {"checkpoint": self.checkpoint, "loaded": len(self.loaded), "new": self.new, "unused": self.unused}

    def lines(self) -> list[str]:
        return [f"loaded {len(self.loaded)} tensors from {self.checkpoint}",
                f"new (initialised here, not loaded): {', '.join(self.new) or 'none'}",
                f"unused (checkpoint tensors not loaded): {', '.join(self.unused) or 'none'}"]


# ---------------------------------------------------------------- reading a checkpoint

def checkpoint_path(path: Path) -> Path:
    """`path` itself, or for a folder without config.json's Hugging Face use its one weights file (timm's hub folders)."""
    if not path.exists():
        raise ExportError(f"--pretrained {path}: no such file or folder (nothing is downloaded: give a local path)")
    if path.is_dir():
        found = [path / f for f in WEIGHT_FILES if (path / f).is_file()]
        if not found:
            raise ExportError(f"--pretrained {path}: the folder holds none of {', '.join(WEIGHT_FILES)}")
        return found[0]
    return path


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file, or of a torch.save'd state_dict (also one wrapped in a training checkpoint's
    {"state_dict": ...} or saved from DataParallel with `module.` prefixes)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        if path.suffix not in TORCH_SUFFIXES:
            raise ExportError(f"--pretrained {path}: expected a Hugging Face folder or a .safetensors, "
                              f"{', '.join(TORCH_SUFFIXES)} file")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except ExportError:
        raise
    except Exception as e:  # noqa: BLE001 - a corrupt or foreign file is one line for the user
        raise ExportError(f"cannot read checkpoint {path}: {_first_line(e)}") from None
    while isinstance(state, dict) and not _all_tensors(state):
        wrapped = next((state[k] for k in WRAPPERS if isinstance(state.get(k), dict)), None)
        if wrapped is None:
            break
        state = wrapped
    if not isinstance(state, dict) or not state or not _all_tensors(state):
        raise ExportError(f"checkpoint {path} holds no state_dict (a dict of tensor names to tensors)")
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def _all_tensors(state: dict) -> bool:
    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ---------------------------------------------------------------- the head

def head_modules(model: nn.Module, num_classes: int) -> list[str]:
    """The classification head's module paths: timm's get_classifier(), else the last nn.Linear that produces the
    model's `num_classes` outputs."""
    paths = {id(m): n for n, m in model.named_modules()}
    if hasattr(model, "get_classifier") and hasattr(model, "reset_classifier"):
        heads = model.get_classifier()
        heads = heads if isinstance(heads, tuple) else (heads,)
        return [paths[id(h)] for h in heads if id(h) in paths and any(True for _ in h.parameters())]
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
    return linears[-1:]


def head_tensors(model: nn.Module, modules: list[str]) -> list[str]:
    return [f"{m}.{n}" if m else n for m in modules for n in model.get_submodule(m).state_dict()]


def replace_head(model: nn.Module, modules: list[str], num_classes: int, seed: int) -> list[str]:
    """A new head of `num_classes` outputs, initialised from torch.manual_seed(seed): timm's reset_classifier, else a
    fresh nn.Linear (PyTorch's default initialisation) in place of the old one. A Hugging Face config learns the new
    count. Returns the new head's tensor names."""
    if not modules:
        raise ExportError(f"--num-classes: {type(model).__name__} has no nn.Linear producing its classes to replace")
    before = {id(t) for t in model.state_dict(keep_vars=True).values()}
    torch.manual_seed(seed)
    if hasattr(model, "reset_classifier"):
        model.reset_classifier(num_classes)
    else:
        for path in modules:
            old = model.get_submodule(path)
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child,
                    nn.Linear(old.in_features, num_classes, bias=old.bias is not None))
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "num_labels"):
        config.num_labels = num_classes  # and id2label / label2id, LABEL_0... again
        if hasattr(model, "num_labels"):
            model.num_labels = num_classes
    return [n for n, t in model.state_dict(keep_vars=True).items() if id(t) not in before]


# ---------------------------------------------------------------- fitting a checkpoint to the model

def verdict(own: dict[str, tuple], found: dict[str, tuple | None], extra: list[str], head: list[str],
            replacing: bool, checkpoint: str, model_name: str) -> LoadReport:
    """The report of loading, or ExportError naming the first tensors that differ. `own`: the model's tensor shapes;
    `found`: the checkpoint's shape of each (None: absent); `extra`: checkpoint tensors the model has no name for."""
    skipped = set(head) if replacing else set()
    differences = []
    for name, shape in own.items():
        if name in skipped:
            continue
        if found.get(name) is None:
            differences.append((name, f"{name} is missing from the checkpoint"))
        elif tuple(found[name]) != tuple(shape):
            differences.append((name, f"{name} is {list(found[name])} in the checkpoint, {list(shape)} in the model"))
    if differences:
        shown = "; ".join(text for _, text in differences[:SHOWN])
        more = f"; and {len(differences) - SHOWN} more" if len(differences) > SHOWN else ""
        if all(n in head for n, _ in differences):
            more += " (use --num-classes to replace the head)"
        elif extra and any(found.get(n) is None for n, _ in differences):  # other names: say what it holds instead
            more += f" (the checkpoint has {len(extra)} tensors the model lacks, e.g. {extra[0]})"
        raise ExportError(f"checkpoint {checkpoint} does not fit {model_name}: {shown}{more}")
    loaded = [n for n in own if n not in skipped]
    unused = list(extra) + [n for n in own if n in skipped and found.get(n) is not None]
    return LoadReport(checkpoint, loaded, unused=unused)


def load_state(model: nn.Module, state: dict[str, torch.Tensor], head: list[str], replacing: bool, checkpoint: str,
               model_name: str) -> LoadReport:
    """Copy `state` into `model` (every tensor but a head being replaced), or ExportError on a mismatch."""
    own = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    report = verdict(own, {n: tuple(t.shape) for n, t in state.items()}, [n for n in state if n not in own], head,
                     replacing, checkpoint, model_name)
    model.load_state_dict({n: state[n] for n in report.loaded}, strict=False)
    return report


def from_hugging_face(cls, folder: Path, kwargs: dict, replacing: bool, model_name: str) -> tuple[nn.Module, LoadReport]:
    """`cls.from_pretrained(folder)` from local files only (kwargs override the config), checked like a state_dict:
    a tensor it had to initialise or could not load is a mismatch unless it is the head being replaced."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # huggingface_hub reads it at import; local_files_only covers the rest
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # its load report and progress bars: the export prints its own
    hf_logging.disable_progress_bar()
    if not (folder / "config.json").is_file():
        raise ExportError(f"--pretrained {folder}: a Hugging Face folder needs config.json (what save_pretrained "
                          "writes)")
    try:
        model, info = cls.from_pretrained(folder, local_files_only=True, output_loading_info=True,
                                          ignore_mismatched_sizes=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - a foreign or broken folder is one line for the user
        raise ExportError(f"cannot load {folder} with {cls.__name__}.from_pretrained: {_first_line(e)}") from None
    model.float()  # a half-precision checkpoint exports in float32
    model.register_forward_hook(logits_only)
    own = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    mismatched = {name: tuple(ckpt) for name, ckpt, _ in info.get("mismatched_keys", ())}
    found = {n: None if n in info.get("missing_keys", ()) else mismatched.get(n, shape) for n, shape in own.items()}
    head = head_tensors(model, head_modules(model, model.config.num_labels))
    report = verdict(own, found, sorted(info.get("unexpected_keys", ())), head, replacing, str(folder), model_name)
    return model, report



# ---------------------------------------------------------------- the model the command line asks for

@dataclass
class Requested:
    """The model `--preset` / `--model` / `--pretrained` / `--num-classes` ask for, built and loaded, and what the
    export needs to know about it."""
    model: nn.Module
    name: str
    source: dict
    image_size: int
    channels: int
    mean: list[float] | None = None  # the preset's normalisation (a checkpoint's comes in `recipe`)
    std: list[float] | None = None
    recipe: Recipe | None = None  # the checkpoint's own preprocessing
    class_names: list[str] | None = None  # the checkpoint's own class names
    report: LoadReport | None = None


def requested(args) -> Requested:
    """Build the model (seeded by the caller), load --pretrained into it and give it a new head for --num-classes."""
    try:
        kwargs = json.loads(args.kwargs)
    except json.JSONDecodeError as e:
        raise ExportError(f"--kwargs is not valid JSON: {e}") from None
    spec, path = args.model, args.pretrained
    if path is not None:
        checkpoint_path(path)  # a local file or folder, before anything is built
    folder = path is not None and path.is_dir() and (path / "config.json").is_file()
    if spec is None and folder and not args.preset:
        spec = hugging_face_architecture(path)
    if spec is None:
        request = _preset(args.preset or DEFAULT_PRESET)
    elif spec.startswith(TIMM):
        request = _timm(spec, kwargs, args, path)
    else:
        cls = load_class(spec)
        if folder and is_hugging_face(cls):
            model, report = from_hugging_face(cls, path, kwargs, args.num_classes is not None, spec)
            size = args.image_size or model.config.image_size
            request = Requested(model, spec.rpartition(":")[2].lower(), {"model": spec, "kwargs": kwargs},
                                size, args.channels or model.config.num_channels,
                                recipe=hugging_face_recipe(path, size), class_names=hugging_face_labels(model),
                                report=report)
        else:
            request = _module(spec, cls, kwargs, args)
    if path is not None and request.report is None:
        request.report = _load_file(request, checkpoint_path(path), str(path), spec or args.preset or DEFAULT_PRESET,
                                    args.num_classes is not None)
    if args.num_classes is not None:
        if args.num_classes < 1:
            raise ExportError(f"--num-classes must be at least 1, got {args.num_classes}")
        model = request.model
        new = replace_head(model, head_modules(model, classes_of(request)), args.num_classes, args.seed)
        request.source["num_classes"] = args.num_classes
        request.class_names = None  # the checkpoint's names were its old head's
        if request.report:
            request.report.new = new
    if request.report:
        request.source["pretrained"] = {**request.report.as_source(),
                                        "preprocessing": request.recipe.origin if request.recipe else None}
    request.name = args.name or request.name
    return request


def classes_of(request: Requested) -> int:
    """How many classes the model outputs (a forward pass in eval mode)."""
    request.model.eval()
    with torch.no_grad():
        return request.model(torch.zeros(1, request.channels, request.image_size, request.image_size)).shape[-1]


def hugging_face_architecture(folder: Path) -> str:
    """transformers:<the architecture config.json names>, for a Hugging Face folder given without --model."""
    try:
        architectures = json.loads((folder / "config.json").read_text()).get("architectures") or []
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"cannot read {folder / 'config.json'}: {e}") from None
    if not architectures:
        raise ExportError(f"{folder / 'config.json'} names no Hugging Face architecture: give --model "
                          "(transformers:<Class>, timm:<name> or module:Class)")
    return f"transformers:{architectures[0]}"


def _load_file(request: Requested, path: Path, given: str, model_name: str, replacing: bool) -> LoadReport:
    head = head_tensors(request.model, head_modules(request.model, classes_of(request)))
    return load_state(request.model, read_state_dict(path), head, replacing, given, model_name)


def _preset(preset: str) -> Requested:
    config = PRESETS[preset]
    return Requested(build(config), preset, {"preset": preset, "config": config.model_kwargs()}, config.image_size,
                     config.channels, list(config.mean), list(config.std))


def _module(spec: str, cls, kwargs: dict, args) -> Requested:
    image_size = args.image_size or kwarg(kwargs, IMAGE_SIZE_KWARGS)
    if not isinstance(image_size, int):
        raise ExportError("--model needs a square --image-size (or an int image_size in --kwargs)")
    return Requested(construct(cls, kwargs), spec.rpartition(":")[2].lower(), {"model": spec, "kwargs": kwargs},
                     image_size, args.channels or kwarg(kwargs, CHANNEL_KWARGS) or 3)


def _timm(spec: str, kwargs: dict, args, path: Path | None) -> Requested:
    name = spec.removeprefix(TIMM)
    model = create_timm(name, kwargs)
    cfg = timm_config(model, checkpoint_path(path) if path is not None else None)
    input_size = tuple(cfg.get("input_size") or ())
    image_size = args.image_size or kwarg(kwargs, IMAGE_SIZE_KWARGS) or (
        input_size[1] if len(input_size) == 3 and input_size[1] == input_size[2] else None)
    if isinstance(image_size, (tuple, list)) and len(set(image_size)) == 1:
        image_size = image_size[0]
    if not isinstance(image_size, int):
        raise ExportError(f"timm:{name} needs a square --image-size (its input_size is {input_size or 'unknown'})")
    channels = args.channels or kwarg(kwargs, CHANNEL_KWARGS) or (input_size[0] if input_size else 3)
    return Requested(model, name.lower(), {"model": spec, "kwargs": kwargs}, image_size, channels,
                     recipe=timm_recipe(cfg, image_size) if cfg else None)
