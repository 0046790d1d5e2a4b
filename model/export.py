"""Export a PyTorch image classifier to ONNX + ONNX Runtime training artifacts, checked against PyTorch.

    python -m model.export                                   # the default preset (digits) -> artifacts/digits
    python -m model.export --preset vit-tiny --freeze 'to_patch_embedding.*'
    python -m model.export --model vit_pytorch.vit:ViT --name vitpt \\
        --kwargs '{"image_size": 32, "patch_size": 8, "num_classes": 10, "dim": 64, "depth": 2, "heads": 2, "mlp_dim": 128}'

One folder per model: inference.onnx; the `ort` trainer's gradient_model.onnx, forward_model.onnx and
weights.safetensors (model/gradgraph.py: PyTorch's autograd as plain ONNX ops, for the maintained
onnxruntime); the `ort-training` trainer's training_model.onnx, eval_model.onnx, optimizer_model.onnx and
checkpoint (onnxruntime-training's artifacts); attribution_model.onnx (model/attribution.py: attention and the
target logit's gradients, for the patch maps); and manifest.json. The folder is built aside and only
renamed into place after the self-check (model/verify.py) passes for both trainers.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import fnmatch
import io
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

from model import rewrite
from engine.graph.fusion import optimize_inference_model
from engine.graph.graph_explain import name_backward_nodes
from engine.train.graph_backend import write_initial_weights
from engine.manifest import (
    ARTIFACT_FILES,
    ATTRIBUTION_MODEL,
    FORWARD_MODEL,
    GRADIENT_MODEL,
    INFERENCE_MODEL,
    TRAINING_MODEL,
    WEIGHTS,
    LossNode,
    Manifest,
    TensorSpec,
    sha256,
)
from engine.graph.rewrite import measured
from engine.runtime import quiet_default_logger
from engine.train.step import TRAINERS
from model import gradgraph, pretrained, recipes, verify
from model.attribution import write_attribution_graph
from model.classes import construct, load_class  # noqa: F401 - the export's model builders, imported from here too
from model.errors import ExportCheckError, ExportError
from model.layout import place
from model.vit import DEFAULT_PRESET, PRESETS
from proto.records.model import Preprocessing

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
    values = measured(inferred, INPUT_NAME, example_shape, [vi.name for vi in typed])
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
    """The training-mode forward graph, shapes pinned and rewritten for faster gradient kernels (model/rewrite.py).

    Traced in training mode also where it serves eval (with a dropout-free model): in eval mode the TorchScript
    exporter merges equal initializers (every LayerNorm weight at its initial ones), so parameters would vanish."""
    proto = pin_static_shapes(export_onnx(model, example, opset, training=True), tuple(example.shape))
    return rewrite.for_training(proto, INPUT_NAME, tuple(example.shape))  # faster gradient kernels, same function


def write_training_artifacts(model, example, folder: Path, opset: int, trainable, frozen,
                             optimizer: str) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """Export the training-mode forward graph, rewrite it (model/rewrite.py) and generate ORT's artifacts from it.

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
    trainer's eval model comes from, so a published version has the structure engine/graph/fusion.py fuses, whichever
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
           class_names: list[str], source: dict, freeze: list[str], optimizer: str, opset: int,
           resize_shorter: int = 0, interpolation: str = "bilinear") -> Path:
    """Write and check one model folder; returns its path. Raises ExportError (ExportCheckError on a mismatch).
    Encoded images are resized to image_size (resize_shorter > 0: the shorter side to it, then a centre crop) with
    the `interpolation` filter and normalised by mean and std (engine/manifest.py's Preprocessing)."""
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
        attribution = write_attribution_graph(model, example, trainable, staging, placement.attention)
        fused = optimize_inference_model(staging / INFERENCE_MODEL, [a.heads for a in placement.attention], INPUT_NAME,
                                         tuple(example.shape))
        # The training graphs hold ORT's own ops (fused LayerNorm, gradient ops) that onnx.checker
        # does not know; loading them in ORT's training session (the check below) validates them.

        manifest = Manifest(
            name=name, source=source,
            input=TensorSpec(INPUT_NAME, (-1, channels, image_size, image_size)),
            output=TensorSpec(OUTPUT_NAME, (-1, len(class_names))),
            preprocessing=Preprocessing(image_size, image_size, channels, tuple(mean), tuple(std), resize_shorter,
                                        interpolation),
            class_names=tuple(class_names),
            parameters=placement.parameters, attention=placement.attention, unplaced=placement.unplaced,
            attribution=attribution,
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
                for copied in (INFERENCE_MODEL, ATTRIBUTION_MODEL):  # eval-mode graphs: no dropout to switch off
                    shutil.copy(staging / copied, twin / copied)
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
    p.add_argument("--pretrained", type=Path, metavar="PATH",
                   help="start from a checkpoint: a Hugging Face folder (save_pretrained's) or a .safetensors, .pt or "
                        ".bin state_dict; local files only. Its own preprocessing and class names come with it")
    p.add_argument("--num-classes", type=int, metavar="N", help="replace the classification head with a new one of "
                   "N classes, initialised from --seed (the backbone is kept)")
    names = p.add_mutually_exclusive_group()
    names.add_argument("--labels", type=Path, metavar="FILE", help="class names: a text file, one a line")
    names.add_argument("--labels-from", type=Path, metavar="DATA_DIR",
                       help="class names: DATA_DIR's sub-folder names, sorted (an ImageFolder)")
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
    if args.weights and args.pretrained:
        p.error("give --weights or --pretrained, not both")
    return args


def labels(args: argparse.Namespace, request: pretrained.Requested, num_classes: int) -> list[str]:
    """--labels, --labels-from, the checkpoint's own names, else 0..9 for digits and class_<i> otherwise."""
    if args.labels or args.labels_from:
        given = f"--labels {args.labels}" if args.labels else f"--labels-from {args.labels_from}"
        names = recipes.read_labels(args.labels) if args.labels else recipes.labels_from(args.labels_from)
        if len(names) != num_classes:
            hint = "" if args.num_classes else f" (--num-classes {len(names)} gives it a new head)"
            raise ExportError(f"the model has {num_classes} classes but {given} names {len(names)}{hint}")
        if "" in names or len(set(names)) != len(names):
            raise ExportError(f"{given}: class names must be unique and not empty")
        return names
    if request.class_names and len(request.class_names) == num_classes:
        return request.class_names
    if request.source.get("preset") == "digits" and num_classes == 10:
        return [str(i) for i in range(10)]
    return [f"class_{i}" for i in range(num_classes)]


def per_channel(values, channels: int, option: str) -> list[float]:
    """One value per channel (a single value stands for all)."""
    values = list(values) * channels if len(values) == 1 else list(values)
    if len(values) != channels:
        raise ExportError(f"{option}: need {channels} values (one per channel), got {len(values)}")
    return values


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
    request = pretrained.requested(args)
    model, image_size, channels, recipe = request.model, request.image_size, request.channels, request.recipe
    if args.weights:
        model.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True))
    num_classes = pretrained.classes_of(request)
    class_names = labels(args, request, num_classes)
    mean = per_channel(args.mean or (recipe and recipe.mean) or request.mean or [0.5], channels, "--mean")
    std = per_channel(args.std or (recipe and recipe.std) or request.std or [0.5], channels, "--std")
    resize_shorter, interpolation = (recipe.resize_shorter, recipe.interpolation) if recipe else (0, "bilinear")
    if request.report:
        print("\n  ".join(request.report.lines()))
    if recipe:
        print(f"  preprocessing from {recipe.origin}: {image_size}x{image_size}"
              + (f" (shorter side to {resize_shorter}, centre crop)" if resize_shorter else "")
              + f", {interpolation}, mean {mean}, std {std}" + "".join(f"\n  note: {n}" for n in recipe.notes))
    name, source = request.name, request.source
    if args.pretrained and (args.out / name).resolve() in (args.pretrained.resolve(), *args.pretrained.resolve().parents):
        raise ExportError(f"the export would replace {args.out / name}, which holds the checkpoint: give another "
                          "--name or --out")

    started = time.perf_counter()
    folder = export(model=model, name=name, out=args.out, image_size=image_size, channels=channels, mean=mean,
                    std=std, class_names=class_names, source=source, freeze=args.freeze,
                    optimizer=args.optimizer, opset=args.opset, resize_shorter=resize_shorter,
                    interpolation=interpolation)
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
