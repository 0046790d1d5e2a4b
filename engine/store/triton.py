"""Write a Triton Inference Server model repository from an exported model, so inference can move to Triton or KServe.

    python -m engine.store.triton --artifacts artifacts/digits --out model_repository
    python -m engine.store.triton --artifacts artifacts/digits --out model_repository --force \\
        --model data/digits/models/v000003/inference.onnx      # a published, fine-tuned version
    tritonserver --model-repository=model_repository

Layout (<name> is the manifest's model name):

    <out>/<name>/config.pbtxt     platform onnxruntime_onnx, inputs/outputs from the manifest, dynamic batching
    <out>/<name>/labels.txt       the class names, one a line (label_filename of the output: classification)
    <out>/<name>/manifest.json    the export's manifest (a vitserve predict replica serves the folder with it)
    <out>/<name>/1/model.onnx     a byte copy of the inference model
    <out>/<name>/1/meta.json      its size and sha256 (Triton ignores both vitserve files)

config.pbtxt is a ModelConfig message written with protobuf's text format, so it is valid by
construction: proto/model_config.proto vendors Triton's messages with Triton's field names and
numbers, so the text (and the bytes) are those of Triton's own proto. The server answers the
same message, from the same builder, to the v2 ModelConfig RPC. The ONNX graph's input and
output are checked against the manifest first (names, float32, a dynamic batch axis, [C, H, W]
and [num_classes]). The model folder is built aside and renamed into place, so a half-written
repository is never left behind; an existing one is replaced only with --force. No torch, no grpc.
"""
from __future__ import annotations

import argparse
import collections
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import onnx

from engine import DEFAULT_MAX_BATCH_SIZE
from engine.errors import ConfigError
from engine.manifest import INFERENCE_MODEL, Manifest, sha256
from engine.store.repository import CONFIG_FILE, LABELS_FILE, MODEL_FILE, write_model_files, write_version_files
from engine.store.files import NAME, AtomicDirs
from proto import model_config_pb2 as mc

VERSION = "1"
PLATFORM, BACKEND = "onnxruntime_onnx", "onnxruntime"
DEFAULT_QUEUE_DELAY_US = 100  # long enough for concurrent requests to meet in one batch, short next to a run
CONTRIB_DOMAINS = ("com.microsoft",)


class RepositoryError(Exception):
    """Bad input or an existing repository: one line for the user."""


@dataclass(frozen=True)
class Written:
    folder: Path  # <out>/<name>
    source: Path  # the ONNX file copied to 1/model.onnx
    contrib_ops: dict[str, int]  # "domain.OpType" -> count, ops outside the standard ONNX domain


def check_graph(model: onnx.ModelProto, manifest: Manifest, path: Path) -> None:
    """The graph takes float32 (batch, C, H, W) and gives float32 (batch, num_classes) under the manifest's names."""
    if any(i.data_location == onnx.TensorProto.EXTERNAL for i in model.graph.initializer):
        raise RepositoryError(f"{path} keeps its weights in external data files: give a single-file ONNX model")
    initializers = {i.name for i in model.graph.initializer}
    inputs = {i.name: i for i in model.graph.input if i.name not in initializers}
    outputs = {o.name: o for o in model.graph.output}
    c, h, w = manifest.input_shape[1:]
    for kind, found, name, dims in (("input", inputs, manifest.input_name, [c, h, w]),
                                    ("output", outputs, manifest.output_name, [manifest.num_classes])):
        if name not in found:
            raise RepositoryError(f"{path} has no {kind} named {name!r} (the manifest's); it has {sorted(found)}")
        tensor = found[name].type.tensor_type
        if tensor.elem_type != onnx.TensorProto.FLOAT:
            raise RepositoryError(f"{path}: {kind} {name!r} is {onnx.TensorProto.DataType.Name(tensor.elem_type)}, "
                                  "not FLOAT")
        shape = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
        if not shape or shape[0] is not None:
            raise RepositoryError(f"{path}: {kind} {name!r} has no dynamic batch axis (shape {shape}); Triton's "
                                  "batching (max_batch_size > 0) needs one: re-export the model")
        if shape[1:] != dims:
            raise RepositoryError(f"{path}: {kind} {name!r} has shape {shape}, the manifest says [batch, "
                                  f"{', '.join(map(str, dims))}]")


def contrib_ops(model: onnx.ModelProto) -> dict[str, int]:
    counts = collections.Counter(f"{n.domain}.{n.op_type}" for n in model.graph.node if n.domain in CONTRIB_DOMAINS)
    return dict(sorted(counts.items()))


def model_config(manifest: Manifest, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, gpu: bool = False,
                 instances: int = 1, queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
                 num_versions: int = 1) -> mc.ModelConfig:
    """Triton's ModelConfig for the manifest's model; dims leave out the batch axis (max_batch_size > 0).

    The defaults are those of `python -m engine.store.triton` (and so of `make export-triton`)."""
    return mc.ModelConfig(
        name=manifest.name,
        platform=PLATFORM,
        backend=BACKEND,
        max_batch_size=max_batch_size,
        version_policy=mc.ModelVersionPolicy(latest=mc.ModelVersionPolicy.Latest(num_versions=num_versions)),
        input=[mc.ModelInput(name=manifest.input_name, data_type=mc.TYPE_FP32, dims=list(manifest.input_shape[1:]))],
        output=[mc.ModelOutput(name=manifest.output_name, data_type=mc.TYPE_FP32, dims=[manifest.num_classes],
                               label_filename=LABELS_FILE)],
        dynamic_batching=mc.ModelDynamicBatching(max_queue_delay_microseconds=queue_delay_us),
        instance_group=[mc.ModelInstanceGroup(
            count=instances, kind=mc.ModelInstanceGroup.KIND_GPU if gpu else mc.ModelInstanceGroup.KIND_CPU)],
    )


def write_repository(artifacts: Path, out: Path, *, model: Path | None = None, max_batch_size: int | None = None,
                     gpu: bool = False, instances: int = 1, queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
                     force: bool = False) -> Written:
    """Write <out>/<name>/{config.pbtxt, labels.txt, 1/model.onnx} atomically; returns what was written."""
    try:
        manifest = Manifest.load(artifacts)
    except ConfigError as e:
        raise RepositoryError(str(e)) from None
    if not NAME.fullmatch(manifest.name):
        raise RepositoryError(f"model name {manifest.name!r} cannot name a repository folder")
    max_batch_size = DEFAULT_MAX_BATCH_SIZE if max_batch_size is None else max_batch_size
    if max_batch_size < 1:
        raise RepositoryError(f"--max-batch-size must be at least 1, got {max_batch_size}")
    if instances < 1:
        raise RepositoryError(f"--instances must be at least 1, got {instances}")
    if queue_delay_us < 0:
        raise RepositoryError(f"--max-queue-delay-us must be at least 0, got {queue_delay_us}")
    bad = [n for n in manifest.class_names if not n or "\n" in n or "\r" in n]
    if bad:
        raise RepositoryError(f"class names must be non-empty single lines for {LABELS_FILE}: {bad[:3]!r}")
    source = Path(model) if model is not None else manifest.path(INFERENCE_MODEL)
    if not source.is_file():
        raise RepositoryError(f"{source} is not a file")
    try:
        graph = onnx.load(str(source), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - whatever the parser says, in one line
        reason = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
        raise RepositoryError(f"{source} is not an ONNX model: {reason}") from None
    check_graph(graph, manifest, source)

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RepositoryError(f"--out {out} exists and is not a folder")
    final = out / manifest.name
    folders = AtomicDirs(out)  # also finishes or drops what a crashed run left (.tmp-*, .old-*)
    if final.exists() and not force:
        raise RepositoryError(f"{final} already exists: pass --force to replace it ({CONFIG_FILE}, {LABELS_FILE}, "
                              f"version {VERSION})")

    config = model_config(manifest, max_batch_size, gpu, instances, queue_delay_us)
    header = (f"# Triton model configuration written by `python -m engine.store.triton` from {artifacts}\n"
              f"# {VERSION}/{MODEL_FILE}: {source} (sha256 {sha256(source)})\n")
    with folders.write(manifest.name, meta_file=False) as (staging, _):  # built aside, renamed into place
        (staging / VERSION).mkdir()
        write_version_files(staging / VERSION, source, int(VERSION), 0, time.time())
        write_model_files(staging, manifest, config, header)
    return Written(final, source, contrib_ops(graph))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m engine.store.triton", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--artifacts", type=Path, default=Path("artifacts/digits"), help="folder written by make export")
    p.add_argument("--out", type=Path, default=Path("model_repository"), help="the model repository (parent folder)")
    p.add_argument("--model", type=Path, help="another inference ONNX file with the same inputs and outputs, "
                   "e.g. a published data/<name>/models/v000001/inference.onnx (default: the export's)")
    p.add_argument("--max-batch-size", type=int, default=None,
                   help=f"Triton's max_batch_size (default: the server's, {DEFAULT_MAX_BATCH_SIZE})")
    p.add_argument("--max-queue-delay-us", type=int, default=DEFAULT_QUEUE_DELAY_US,
                   help="dynamic batching: how long Triton waits for more requests to fill a batch")
    p.add_argument("--gpu", action="store_true", help="instance_group KIND_GPU (default KIND_CPU)")
    p.add_argument("--instances", type=int, default=1, help="model instances (instance_group count)")
    p.add_argument("--force", action="store_true", help="replace an existing <out>/<name>")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        written = write_repository(args.artifacts, args.out, model=args.model, max_batch_size=args.max_batch_size,
                                   gpu=args.gpu, instances=args.instances, queue_delay_us=args.max_queue_delay_us,
                                   force=args.force)
    except RepositoryError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {written.folder}: {CONFIG_FILE}, {LABELS_FILE}, {VERSION}/{MODEL_FILE} (from {written.source})")
    if written.contrib_ops:
        ops = ", ".join(f"{op} x{n}" for op, n in written.contrib_ops.items())
        print(f"  the graph uses ONNX Runtime contrib ops ({ops}): Triton's onnxruntime backend runs them")
    print(f"  serve it: tritonserver --model-repository={written.folder.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
