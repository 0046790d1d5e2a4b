"""Export a PyTorch image classifier to ONNX + ONNX Runtime training artifacts, checked against PyTorch.

    python -m model.export                                   # the default preset (digits) -> artifacts/digits
    python -m model.export --preset vit-tiny --freeze 'to_patch_embedding.*'
    python -m model.export --model vit_pytorch.vit:ViT --name vitpt \\
        --kwargs '{"image_size": 32, "patch_size": 8, "num_classes": 10, "dim": 64, "depth": 2, "heads": 2, "mlp_dim": 128}'

One folder per model: inference.onnx; the `ort` trainer's gradient_model.onnx, forward_model.onnx and
weights.safetensors (model/gradgraph.py: PyTorch's autograd as plain ONNX ops, for the maintained
onnxruntime); the `ort-training` trainer's training_model.onnx, eval_model.onnx, optimizer_model.onnx and
checkpoint (onnxruntime-training's artifacts); and manifest.json. The folder is built aside and only
renamed into place after the self-check (model/verify.py) passes for both trainers.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import fnmatch
import importlib
import importlib.util
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
from onnxruntime.training import artifacts as ort_artifacts
from onnxruntime.training.onnxblock import optim as ort_optim

from engine import rewrite
from engine.fusion import optimize_inference_model
from engine.graph_explain import name_backward_nodes
from engine.graph_trainer import write_initial_weights
from engine.manifest import (
    ARTIFACT_FILES,
    FORWARD_MODEL,
    GRADIENT_MODEL,
    INFERENCE_MODEL,
    TRAINING_MODEL,
    WEIGHTS,
    LossNode,
    Manifest,
    Preprocessing,
    TensorSpec,
    sha256,
)
from engine.runtime import quiet_default_logger
from engine.training import TRAINERS
from model import gradgraph, verify
from model.errors import ExportCheckError, ExportError
from model.layout import place
from model.vit import DEFAULT_PRESET, PRESETS, build

INPUT_NAME, OUTPUT_NAME = "images", "logits"
# Opset 17 exports LayerNormalization as one node whose gradient ORT 1.19.2 cannot build;
# at 16 it is decomposed (and fused back by ORT). See docs/design.md.
DEFAULT_OPSET = 16
ADAMW = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)  # torch.optim.AdamW's defaults


class _TorchModeAdamWOptimizer(ort_optim.optim.AdamWOptimizer):
    """ORT's AdamWOptimizer node in adam_mode 0 (torch.optim.AdamW), not onnxblock's default mode 1.

    Mode 1 is Hugging Face's AdamW: eps is added before the bias correction and the decay
    after the update, so step 1 moves a weight with |g| ~ 1e-6 by ~3% less than PyTorch.
    """

    def _build_optimizer_node(self, input_names, output_name, node_name, node_attributes):
        return super()._build_optimizer_node(input_names, output_name, node_name, {**node_attributes, "adam_mode": 0})


def torch_adamw(**hyper) -> ort_optim.AdamW:
    block = ort_optim.AdamW(**hyper)
    block._adamw = _TorchModeAdamWOptimizer(bias_correction=True, **hyper)
    return block


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


CHANNEL_KWARGS = ("channels", "num_channels", "in_chans", "in_channels")  # vit-pytorch, Hugging Face, timm, ...


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


def loss_node(training_model: onnx.ModelProto) -> LossNode:
    """The node that produces a training graph's first output (the loss): the artifacts' or the gradient graph's."""
    loss_output = training_model.graph.output[0].name
    node = next(n for n in training_model.graph.node if loss_output in n.output)
    return LossNode(name=node.name, op_type=node.op_type, inputs=tuple(node.input), output=loss_output)


@contextlib.contextmanager
def native_stderr_captured():
    """ORT's gradient builder logs every graph transform to fd 2: swallow it (a failure raises with its reason)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "wb") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


class FrozenBatchNorm(torch.nn.Module):
    """A BatchNorm on its running statistics, written in ops whose gradients ORT builds right.

    ORT 1.19.2 differentiates BatchNormalization as if it used the batch's statistics, which gives
    wrong gradients for a frozen one (the export check caught it). Same parameters and buffers under
    the same names, so the state_dict, the checkpoint and the manifest do not change.
    """

    def __init__(self, norm: torch.nn.modules.batchnorm._BatchNorm):
        super().__init__()
        self.weight, self.bias, self.eps = norm.weight, norm.bias, norm.eps
        self.register_buffer("running_mean", norm.running_mean.detach().clone())
        self.register_buffer("running_var", norm.running_var.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)  # per channel: (1, C, 1, 1) for images
        y = (x - self.running_mean.view(shape)) * torch.rsqrt(self.running_var.view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.weight is not None else y


def freeze_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` whose BatchNorm modules are FrozenBatchNorm (the graph the export writes); `model` itself
    stays as it is, with verify.train_mode keeping its BatchNorms on their running statistics for the check."""
    frozen = copy.deepcopy(model)
    for name in verify.batch_norms(frozen):
        parent, _, child = name.rpartition(".")
        owner = frozen.get_submodule(parent) if parent else frozen
        setattr(owner, child, FrozenBatchNorm(getattr(owner, child)))
    return frozen


def without_dropout(model: torch.nn.Module) -> torch.nn.Module:
    clone = copy.deepcopy(model)
    for m in clone.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return clone


def has_dropout(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())


def export_onnx(model: torch.nn.Module, example: torch.Tensor, opset: int, training: bool) -> onnx.ModelProto:
    """The model as ONNX: in training mode (dropout on, see verify.train_mode for BatchNorm) or in eval mode."""
    buffer = io.BytesIO()
    verify.train_mode(model) if training else model.eval()
    # TRAINING would switch BatchNorm back to batch statistics; PRESERVE keeps the modes just set.
    mode = torch.onnx.TrainingMode.PRESERVE if training else torch.onnx.TrainingMode.EVAL
    with warnings.catch_warnings():  # "legacy TorchScript exporter": chosen on purpose, see below
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # models' shape checks, constant at trace time
        try:
            torch.onnx.export(
                model, (example,), buffer, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, opset_version=opset,
                dynamo=False,  # the dynamo exporter renames parameters and breaks generate_artifacts (docs/design.md)
                training=mode, do_constant_folding=not training, export_params=True,
            )
        except Exception as e:  # noqa: BLE001 - any exporter failure is one line for the user
            raise ExportError(f"torch.onnx.export cannot export {type(model).__name__}: {first_line(e)}") from None
    return onnx.load_from_string(buffer.getvalue())


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def pin_static_shapes(proto: onnx.ModelProto, example_shape: tuple[int, ...]) -> onnx.ModelProto:
    """Write every intermediate tensor's shape into value_info, with all but the batch axis static.

    Why: with a dynamic batch, a slice whose length is read from a traced shape (e.g.
    `pos_embedding[:, :(n + 1)]` in vit-pytorch) gets unknown dims, and ORT 1.19.2's gradient
    builder then does not reduce the broadcast Add's gradient over the batch: only sample 0's
    gradient reached pos_embedding (caught by the export check). The shapes are measured by
    running the forward graph at two batch sizes: a dim that does not change is static.
    """
    inferred = onnx.shape_inference.infer_shapes(proto)
    typed = [vi for vi in inferred.graph.value_info if vi.type.tensor_type.elem_type]
    values = rewrite.measured(inferred, INPUT_NAME, example_shape, [vi.name for vi in typed])
    for vi in typed:
        a, b = (v.shape for v in values[vi.name])
        if len(a) != len(b):
            continue
        dims = vi.type.tensor_type.shape
        dims.ClearField("dim")
        for x, y in zip(a, b):
            dim = dims.dim.add()
            if x == y:
                dim.dim_value = x
            elif (x, y) == (2, 3):
                dim.dim_param = "batch"
    return inferred


def training_forward(model, example, opset: int) -> onnx.ModelProto:
    """The training-mode forward graph, shapes pinned and rewritten for faster gradient kernels (engine/rewrite.py).

    Traced in training mode also where it serves eval (with a dropout-free model): in eval mode the TorchScript
    exporter merges equal initializers (every LayerNorm weight at its initial ones), so parameters would vanish."""
    proto = pin_static_shapes(export_onnx(model, example, opset, training=True), tuple(example.shape))
    return rewrite.for_training(proto, INPUT_NAME, tuple(example.shape))  # faster gradient kernels, same function


def write_training_artifacts(model, example, folder: Path, opset: int, trainable, frozen,
                             optimizer: str) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """Export the training-mode forward graph, rewrite it (engine/rewrite.py) and generate ORT's artifacts from it.

    Returns (the forward graph, nodes in execution order; the training graph ORT built from it,
    whose node order ORT rearranges).
    """
    proto = training_forward(model, example, opset)
    initializers = {i.name for i in proto.graph.initializer}
    missing = [n for n in trainable + frozen if n not in initializers]
    if missing:
        raise ExportError(f"parameters missing from the exported graph (unused by forward?): {missing[:5]}")
    block = torch_adamw(**ADAMW) if optimizer == "adamw" else ort_artifacts.OptimType.SGD
    try:
        with native_stderr_captured():
            ort_artifacts.generate_artifacts(
                proto, requires_grad=trainable, frozen_params=frozen, loss=ort_artifacts.LossType.CrossEntropyLoss,
                optimizer=block, artifact_directory=folder, additional_output_names=[OUTPUT_NAME],
            )
    except Exception as e:  # noqa: BLE001 - ORT's gradient builder names the node and op it cannot handle
        raise ExportError(f"ONNX Runtime cannot build the training artifacts: {first_line(e)}") from None
    return proto, onnx.load(folder / TRAINING_MODEL)


def write_gradient_trainer(model: torch.nn.Module, forward: onnx.ModelProto, example: torch.Tensor,
                           trainable: list[str], folder: Path) -> None:
    """The `ort` trainer's files: the gradient graph (model/gradgraph.py), the eval-mode forward graph with the
    trainable parameters as inputs, and the starting weights.

    `forward` (training_forward's graph) with its Dropouts in eval mode, as ORT's eval model has them, becomes the
    forward graph of EvalStep and Publish (which makes its inputs initializers again): the graph the other
    trainer's eval model comes from, so a published version has the structure engine/fusion.py fuses, whichever
    trainer published it."""
    gradgraph.export_gradient_graphs(model, example, trainable, folder)
    onnx.save(parameters_as_inputs(dropout_off(copy.deepcopy(forward)), trainable), folder / FORWARD_MODEL)
    # Node names from the module and forward op each one computes or differentiates (the tracer's say neither):
    # what ExplainGradients answers with, and what Netron shows.
    named = name_backward_nodes(onnx.load(folder / GRADIENT_MODEL), [n for n, _ in model.named_parameters()])
    onnx.save(named, folder / GRADIENT_MODEL)
    params = dict(model.named_parameters())
    write_initial_weights(folder / WEIGHTS, {n: params[n].detach().cpu().numpy() for n in trainable})


def dropout_off(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Every Dropout node of `proto` in eval mode (its training_mode input a constant False): the identity."""
    off = "vitserve_dropout_training_mode_off"
    dropouts = [n for n in proto.graph.node if n.op_type == "Dropout" and len(n.input) >= 3 and n.input[2]]
    for node in dropouts:
        node.input[2] = off
    if dropouts:
        proto.graph.initializer.append(onnx.numpy_helper.from_array(np.array(False), off))
    return proto


def parameters_as_inputs(proto: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """`proto` with the initializers `names` turned into graph inputs of the same name, type and shape."""
    initializers = {i.name: i for i in proto.graph.initializer}
    missing = [n for n in names if n not in initializers]
    if missing:
        raise ExportError(f"parameters missing from the exported forward graph (unused by forward?): {missing[:5]}")
    kept = [i for i in proto.graph.initializer if i.name not in set(names)]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    proto.graph.input.extend(onnx.helper.make_tensor_value_info(n, initializers[n].data_type, initializers[n].dims)
                             for n in names)
    return proto


def export(*, model: torch.nn.Module, name: str, out: Path, image_size: int, channels: int, mean, std,
           class_names: list[str], source: dict, freeze: list[str], optimizer: str, opset: int) -> Path:
    """Write and check one model folder; returns its path. Raises ExportError (ExportCheckError on a mismatch)."""
    started = time.perf_counter()
    names = [n for n, _ in model.named_parameters()]
    frozen = [n for n in names if any(fnmatch.fnmatchcase(n, g) for g in freeze)]
    unmatched = [g for g in freeze if not any(fnmatch.fnmatchcase(n, g) for n in names)]
    if unmatched:
        raise ExportError(f"--freeze patterns match no parameter: {unmatched}")
    trainable = [n for n in names if n not in frozen]
    if not trainable:
        raise ExportError("every parameter is frozen: nothing to train")
    example = torch.randn(2, channels, image_size, image_size)
    batch_norms = verify.batch_norms(model)  # trained on frozen running statistics, said in the manifest
    graph_model = freeze_batchnorm(model) if batch_norms else model  # what goes into the graphs

    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out))
    try:
        inference = export_onnx(graph_model, example, opset, training=False)
        onnx.checker.check_model(inference, full_check=True)
        onnx.save(inference, staging / INFERENCE_MODEL)
        forward, training_model = write_training_artifacts(graph_model, example, staging, opset, trainable, frozen,
                                                           optimizer)
        write_gradient_trainer(model, forward, example, trainable, staging)
        placement = place(model, forward.graph, set(trainable))
        fused = optimize_inference_model(staging / INFERENCE_MODEL, [a.heads for a in placement.attention], INPUT_NAME,
                                         tuple(example.shape))
        # The training graphs hold ORT's own ops (fused LayerNorm, gradient ops) that onnx.checker
        # does not know; loading them in ORT's training session (the check below) validates them.

        manifest = Manifest(
            name=name, source=source,
            input=TensorSpec(INPUT_NAME, (-1, channels, image_size, image_size)),
            output=TensorSpec(OUTPUT_NAME, (-1, len(class_names))),
            preprocessing=Preprocessing(image_size, image_size, channels, tuple(mean), tuple(std)),
            class_names=tuple(class_names),
            parameters=placement.parameters, attention=placement.attention, unplaced=placement.unplaced,
            frozen_batchnorm=tuple(batch_norms),
            inference_fused_attention_blocks=fused,
            loss=loss_node(training_model), gradient_loss=loss_node(onnx.load(staging / GRADIENT_MODEL)), opset=opset,
            optimizer={"name": optimizer, **(ADAMW if optimizer == "adamw" else {})},
            versions={"python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__,
                      "onnxruntime": onnxruntime.__version__, "numpy": np.__version__},
            files={f: sha256(staging / f) for f in ARTIFACT_FILES},
        )
        manifest.write(staging)

        report = verify.CheckReport()
        verify.check_inference(Manifest.load(staging), model, report)
        if has_dropout(model):  # the shipped graph drops out at random: check a dropout-free twin instead
            with tempfile.TemporaryDirectory(dir=out) as twin:
                twin = Path(twin)
                twin_model = without_dropout(model)
                shutil.copy(staging / INFERENCE_MODEL, twin / INFERENCE_MODEL)
                write_training_artifacts(freeze_batchnorm(twin_model) if batch_norms else twin_model, example, twin,
                                         opset, trainable, frozen, optimizer)
                write_gradient_trainer(twin_model, forward, example, trainable, twin)
                dataclasses.replace(manifest, files={f: sha256(twin / f) for f in ARTIFACT_FILES}).write(twin)
                for trainer in TRAINERS:
                    verify.check_training(Manifest.load(twin), twin_model, report, trainer)
        else:
            for trainer in TRAINERS:
                verify.check_training(Manifest.load(staging), model, report, trainer)
        if report.failures:
            raise ExportCheckError("export check failed:\n  " + "\n  ".join(report.failures))

        dataclasses.replace(manifest, export_check=report.as_dict(),
                            export_seconds=round(time.perf_counter() - started, 2)).write(staging)
        final = out / name
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
        return final
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m model.export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help=f"a named ViT size (default {DEFAULT_PRESET})")
    p.add_argument("--model", help="any image classifier instead of a preset: module:Class (e.g. vit_pytorch.vit:ViT)")
    p.add_argument("--kwargs", default="{}", help="JSON keyword arguments for --model's constructor")
    p.add_argument("--image-size", type=int, help="input height = width (default: kwargs image_size)")
    p.add_argument("--channels", type=int, help="input channels (default: kwargs channels, else 3)")
    p.add_argument("--mean", type=float, nargs="+", help="per-channel normalization mean for encoded images")
    p.add_argument("--std", type=float, nargs="+", help="per-channel normalization std for encoded images")
    p.add_argument("--class-names", type=Path, help="text file, one class name per line")
    p.add_argument("--weights", type=Path, help="a state_dict (torch.save) to load before export")
    p.add_argument("--freeze", nargs="+", default=[], metavar="GLOB", help="parameters to freeze, e.g. 'to_patch_embedding.*'")
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    p.add_argument("--seed", type=int, default=0, help="seed for the initial weights")
    p.add_argument("--name", help="folder name (default: the preset or the class name)")
    p.add_argument("--out", type=Path, default=Path("artifacts"), help="parent folder of the model folder")
    args = p.parse_args(argv)
    if args.model and args.preset:
        p.error("give --preset or --model, not both")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet_default_logger()
    try:
        return run(args)
    except ExportError as e:
        print(f"EXPORT FAILED: {e}", file=sys.stderr)
        return 1


def run(args: argparse.Namespace) -> int:
    """The export the command line asks for; ExportError when it cannot be done."""
    torch.manual_seed(args.seed)
    if args.model:
        try:
            kwargs = json.loads(args.kwargs)
        except json.JSONDecodeError as e:
            raise ExportError(f"--kwargs is not valid JSON: {e}") from None
        model = construct(load_class(args.model), kwargs)
        image_size = args.image_size or kwargs.get("image_size", kwargs.get("img_size"))
        channels = args.channels or next((kwargs[k] for k in CHANNEL_KWARGS if k in kwargs), 3)
        if not isinstance(image_size, int):
            raise ExportError("--model needs a square --image-size (or an int image_size in --kwargs)")
        name = args.name or args.model.rpartition(":")[2].lower()
        source = {"model": args.model, "kwargs": kwargs}
        mean, std = args.mean or [0.5] * channels, args.std or [0.5] * channels
    else:
        preset = args.preset or DEFAULT_PRESET
        config = PRESETS[preset]
        model = build(config)
        image_size, channels, name = config.image_size, config.channels, args.name or preset
        source = {"preset": preset, "config": config.model_kwargs()}
        mean, std = args.mean or config.mean, args.std or config.std
    if args.weights:
        model.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True))
    model.eval()
    with torch.no_grad():
        num_classes = model(torch.zeros(1, channels, image_size, image_size)).shape[-1]
    if args.class_names:
        class_names = args.class_names.read_text().split("\n")[:num_classes]
    elif source.get("preset") == "digits":
        class_names = [str(i) for i in range(10)]
    else:
        class_names = [f"class_{i}" for i in range(num_classes)]
    if len(class_names) != num_classes or len(mean) != channels or len(std) != channels:
        raise ExportError(f"need {num_classes} class names and {channels} mean/std values")

    started = time.perf_counter()
    folder = export(model=model, name=name, out=args.out, image_size=image_size, channels=channels, mean=mean,
                    std=std, class_names=class_names, source=source, freeze=args.freeze,
                    optimizer=args.optimizer, opset=args.opset)
    manifest = Manifest.load(folder)
    check = manifest.export_check
    print(f"exported {name} to {folder} in {time.perf_counter() - started:.1f}s")
    print(f"  check vs PyTorch: inference logits max rel err {check['logits_max_rel_err']:.2e}; "
          f"loss torch {check['loss_torch']:.6f}")
    for trainer, c in check["trainers"].items():
        print(f"  {trainer:>12}: loss {c['loss_ort']:.6f}, {check['parameters_checked']} gradients, "
              f"max rel err {c['grad_max_rel_err']:.2e} ({c['worst_parameter']})")
    if manifest.frozen_batchnorm:
        print(f"  BatchNorm running statistics are frozen in training (as model.eval() keeps them): "
              f"{', '.join(manifest.frozen_batchnorm)}")
    if manifest.unplaced:
        print(f"  {len(manifest.unplaced)} parameters have no block or sub-layer, e.g. {manifest.unplaced[0].name}: "
              f"{manifest.unplaced[0].reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
