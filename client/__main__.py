"""Command-line interface for a vitserve server: `python -m client [options] COMMAND ...`.

Commands:

    info                        what model is served (version, training state, auto settings)
    predict IMAGE...            classify image files
    train-step BATCH            fine-tuning steps (--accumulate: gradient accumulation) + gradient summaries
    eval-step BATCH             loss and accuracy of the training weights; changes nothing
    optimizer                   show, or set --lr / --schedule / --clip
    checkpoint save|list|restore
    publish                     serve the training weights from Predict (a new model version)
    explain                     where the loss and each parameter's gradient are computed
    grads --plot FILE.png BATCH one train step and a gradient-flow figure

BATCH is `--images FILE... --labels L...` or `--npz FILE`. `--json` prints one
JSON document instead of text. Failures print one `error: ...` line on stderr
and exit with status 1.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from client.client import (
    CheckpointList,
    ClientError,
    EvalResult,
    Explanation,
    ModelInfo,
    OptimizerState,
    ParameterGradientPath,
    PredictResult,
    TrainStepResult,
    ViTClient,
)


class UsageError(Exception):
    """A problem with the command's inputs, found before anything is sent."""


def program_name(module_form: str) -> str:
    """How the user started us: the console script's name (vitserve), else `python -m client`."""
    name = os.path.basename(sys.argv[0])
    return module_form if name in ("__main__.py", "-c", "") else name


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=program_name("python -m client"), description="Talk to a vitserve server (proto/vitserve.proto).",
                                     allow_abbrev=False)
    parser.add_argument("--address", help="server HOST:PORT (default: $VITSERVE_ADDRESS or localhost:50051)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per call; 0 = none (default 30)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    parser.add_argument("--token-file", metavar="FILE",
                        help="file holding the bearer token (default: $VITSERVE_TOKEN; never pass a token itself)")
    parser.add_argument("--tls-ca", metavar="FILE", help="PEM CA certificate to verify the server: use TLS")
    parser.add_argument("--tls-cert", metavar="FILE", help="PEM client certificate, for mutual TLS (with --tls-key)")
    parser.add_argument("--tls-key", metavar="FILE", help="PEM private key of --tls-cert")
    # --json is also accepted after the command; SUPPRESS keeps it from resetting the global flag.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("health", parents=[common], help="standard gRPC health check (exit 0 only when SERVING)")
    sub.add_parser("info", parents=[common], help="show the served model")

    p = sub.add_parser("predict", parents=[common], help="classify image files")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ...)")
    p.add_argument("--top-k", type=int, default=5, metavar="K", help="classes per image (default 5)")
    p.add_argument("--logits", action="store_true", help="also print the raw logits")

    t = sub.add_parser("train-step", parents=[common], help="run fine-tuning steps on one batch")
    add_batch_arguments(t)
    t.add_argument("--repeat", type=int, default=1, metavar="N", help="steps to run on the batch (default 1)")
    t.add_argument("--accumulate", action="store_true",
                   help="accumulate the gradients only; the next step without --accumulate applies them")
    t.add_argument("--no-summaries", action="store_true", help="skip the gradient summaries")
    t.add_argument("--top", type=int, default=10, metavar="N", help="parameters to show (default 10)")

    e = sub.add_parser("eval-step", parents=[common], help="loss and accuracy of the training weights on a batch")
    add_batch_arguments(e)

    o = sub.add_parser("optimizer", parents=[common], help="show the optimizer, or change its settings",
                       description="Without options: show the optimizer state. --lr and --schedule are "
                                   "alternatives; --clip combines with either.")
    rate = o.add_mutually_exclusive_group()
    rate.add_argument("--lr", type=float, metavar="X", help="constant learning rate (clears any schedule)")
    rate.add_argument("--schedule", nargs=3, metavar=("PEAK", "WARMUP", "DECAY"),
                      help="linear warmup from 0 to PEAK over WARMUP steps, then linear decay over DECAY steps")
    o.add_argument("--end-lr", type=float, metavar="E", help="learning rate at the end of the decay (default 0)")
    o.add_argument("--clip", type=float, metavar="NORM", help="clip gradients to this global L2 norm; 0 = off")

    c = sub.add_parser("checkpoint", help="save, list or restore training checkpoints")
    csub = c.add_subparsers(dest="action", required=True, metavar="ACTION")
    save = csub.add_parser("save", parents=[common], help="write a checkpoint (default name: manual-<step>)")
    save.add_argument("name", nargs="?", default="", metavar="NAME")
    csub.add_parser("list", parents=[common], help="the checkpoints, oldest first")
    restore = csub.add_parser("restore", parents=[common], help="replace the training state with a checkpoint's")
    restore.add_argument("name", metavar="NAME")

    sub.add_parser("publish", parents=[common], help="serve the current training weights from Predict")

    x = sub.add_parser("explain", parents=[common], help="where the loss and the gradients are computed")
    x.add_argument("--parameter", default="", metavar="NAME",
                   help="one parameter (e.g. transformer.layers.0.0.fn.to_qkv.weight) in detail")

    g = sub.add_parser("grads", parents=[common], help="run one train step and plot the gradient flow")
    g.add_argument("--plot", required=True, metavar="FILE.png", help="where to write the figure")
    add_batch_arguments(g)
    return parser


def add_batch_arguments(parser: argparse.ArgumentParser) -> None:
    """--images FILE... --labels L... or --npz FILE."""
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", nargs="+", metavar="FILE", help="encoded image files (needs --labels)")
    src.add_argument("--npz", metavar="FILE", help=".npz with `images` float32 [N,C,H,W] and `labels` int64 [N]")
    parser.add_argument("--labels", nargs="+", type=int, metavar="L", help="class index per --images file")


# ---------------------------------------------------------------- info

def print_info(info: ModelInfo) -> None:
    pre = info.preprocessing
    total = sum(int(np.prod(p["shape"])) for p in info.parameters)
    trainable = [p for p in info.parameters if p["trainable"]]
    n_trainable = sum(int(np.prod(p["shape"])) for p in trainable)
    names = ", ".join(info.class_names[:10]) + (", ..." if info.num_classes > 10 else "")
    rows = [
        ("model", info.name),
        ("device", f"{info.device} ({', '.join(info.execution_providers) or 'no providers'})"),
        ("input", f"{info.input_name} {list(info.input_shape)} {info.input_dtype}"),
        ("preprocessing", f"{pre['height']}x{pre['width']}, {pre['channels']} channel(s), "
                          f"mean {pre['mean']}, std {pre['std']}"),
        ("classes", f"{info.num_classes} ({names})"),
        ("parameters", f"{len(info.parameters)} tensors, {total:,} elements"),
        ("trainable", f"{len(trainable)} tensors, {n_trainable:,} elements"),
        ("step", str(info.step)),
        ("learning rate", f"{info.learning_rate:g}"),
        ("optimizer", info.optimizer),
        ("loss node", f"{info.loss_node} ({info.loss_op_type})"),
        ("opset", str(info.opset)),
        ("max batch", str(info.max_batch_size)),
        ("model version", f"{info.model_version} (Predict)"),
        ("versions", ", ".join(f"{v.version} (step {v.step})" for v in info.versions) or "-"),
        ("auto checkpoint", auto_checkpoint_text(info)),
        ("auto publish", f"every {info.publish_every_steps} steps" if info.publish_every_steps else "off"),
    ]
    for key, value in rows:
        print(f"{key:<15} {value}")


def auto_checkpoint_text(info: ModelInfo) -> str:
    parts = []
    if info.checkpoint_every_steps:
        parts.append(f"every {info.checkpoint_every_steps} steps")
    if info.checkpoint_every_seconds:
        parts.append(f"every {info.checkpoint_every_seconds:g} s")
    return ", ".join(parts) or "off"


# ---------------------------------------------------------------- predict

def print_predictions(files: list[str], result: PredictResult) -> None:
    for i, (name, top) in enumerate(zip(files, result.predictions)):
        print(name)
        width = max((len(label) for _, label, _ in top), default=0)
        for _, label, prob in top:
            print(f"  {label:<{width}}  {prob * 100:5.1f}%")
        if result.logits is not None:
            print("  logits " + np.array2string(result.logits[i], precision=4, max_line_width=10**6))
    print(f"(model version {result.model_version})")


# ---------------------------------------------------------------- train-step

def load_batch(args: argparse.Namespace) -> tuple[Any, Any]:
    """The (images, labels) batch named by --images/--labels or --npz."""
    if args.npz:
        if args.labels:
            raise UsageError("--labels goes with --images; an --npz holds its own labels")
        return load_npz(args.npz)
    if not args.labels:
        raise UsageError("--images needs --labels, one class index per image")
    if len(args.labels) != len(args.images):
        raise UsageError(f"got {len(args.images)} image(s) but {len(args.labels)} label(s)")
    return [Path(f) for f in args.images], args.labels


def load_npz(path: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        data = np.load(path, allow_pickle=False)  # OSError (missing file) propagates as is
    except (ValueError, EOFError, zipfile.BadZipFile) as e:
        raise UsageError(f"{path} is not an .npz file") from e
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise UsageError(f"{path} is a single array, not an .npz with `images` and `labels`")
    with data:
        missing = {"images", "labels"} - set(data.files)
        if missing:
            raise UsageError(f"{path} has no array(s) named {', '.join(sorted(missing))}")
        return data["images"], data["labels"]


def print_step(r: TrainStepResult) -> None:
    clipped = f"  clipped x{r.clip_coefficient:.3g}" if 0 < r.clip_coefficient < 1 else ""
    print(f"step {r.step}  loss {r.loss:.4f}  lr {r.learning_rate:.3g}  "
          f"grad-norm {r.grad_norm:.4g}{clipped}  ({r.step_seconds * 1000:.1f} ms)  {r.status}")


def print_gradients(r: TrainStepResult, top: int) -> None:
    grads = sorted(r.gradients, key=lambda g: g.l2_norm, reverse=True)[:max(top, 0)]
    if grads:
        rows = [(g.name, "x".join(map(str, g.shape)) or "scalar", f"{g.l2_norm:.3e}",
                 f"{g.max_abs:.3e}", f"{g.zero_fraction * 100:.1f}", f"{g.update_ratio:.3e}")
                for g in grads]
        header = ("parameter", "shape", "grad L2", "max|g|", "zero %", "update ratio")
        print(f"\ntop {len(grads)} of {len(r.gradients)} parameters by gradient L2 norm")
        print_table(header, rows, right={2, 3, 4, 5})
    bad = [g.name for g in r.gradients if g.nonfinite_count]
    if bad:
        print(f"warning: non-finite gradients in {len(bad)} parameter(s): {', '.join(bad)}")


def print_attention(r: TrainStepResult) -> None:
    if not r.attention:
        return
    print("\nattention q/k/v gradients")
    for a in r.attention:
        print(f"  block {a.block}  q ||g|| {a.q_norm:.3e}  k ||g|| {a.k_norm:.3e}  "
              f"v ||g|| {a.v_norm:.3e}  ({a.heads} heads x {a.dim_head})")
        for part, norms in (("q", a.q_head_norms), ("k", a.k_head_norms), ("v", a.v_head_norms)):
            print(f"    {part} heads  " + "  ".join(f"{n:.3e}" for n in norms))


# ---------------------------------------------------------------- main

def connect(args: argparse.Namespace) -> ViTClient:
    """A client for the global options: address, timeout, TLS files and the token ($VITSERVE_TOKEN or --token-file)."""
    if args.token_file:
        token = Path(args.token_file).read_text().strip()
        if not token:
            raise UsageError(f"token file {args.token_file} is empty")
    else:
        token = os.environ.get("VITSERVE_TOKEN", "").strip()
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UsageError("--tls-cert and --tls-key go together")
    return ViTClient(args.address, timeout=args.timeout or None, token=token or None, tls_ca=args.tls_ca,
                     tls_cert=args.tls_cert, tls_key=args.tls_key)


def run(args: argparse.Namespace) -> int:
    if args.command == "health":
        return health(args)
    commands = {"info": show_info, "predict": predict, "train-step": train_steps, "eval-step": eval_step,
                "optimizer": optimizer, "checkpoint": checkpoint, "publish": publish, "explain": explain,
                "grads": grads}
    with connect(args) as client:
        commands[args.command](client, args)
    return 0


def health(args: argparse.Namespace) -> int:
    """For probes (Docker HEALTHCHECK, Kubernetes): prints the status, exits 0 only when SERVING."""
    with connect(args) as client:
        status = client.health()
    if args.json:
        emit({"status": status})
    else:
        print(status)
    return 0 if status == "SERVING" else 1


def show_info(client: ViTClient, args: argparse.Namespace) -> None:
    info = client.model_info()
    if args.json:
        emit(info.as_dict())
    else:
        print_info(info)


def predict(client: ViTClient, args: argparse.Namespace) -> None:
    result = client.predict([Path(f) for f in args.images], args.top_k, args.logits)
    if args.json:
        emit(result.as_dict())
    else:
        print_predictions(args.images, result)


def train_steps(client: ViTClient, args: argparse.Namespace) -> None:
    if args.repeat < 1:
        raise UsageError(f"--repeat must be at least 1, got {args.repeat}")
    images, labels = load_batch(args)
    results = []
    for _ in range(args.repeat):
        results.append(client.train_step(images, labels, summaries=not args.no_summaries,
                                         accumulate_only=args.accumulate))
        if not args.json:
            print_step(results[-1])
    if args.json:
        emit(results[0].as_dict() if len(results) == 1 else [r.as_dict() for r in results])
    elif not args.no_summaries:
        print_gradients(results[-1], args.top)
        print_attention(results[-1])


# ---------------------------------------------------------------- eval-step

def eval_step(client: ViTClient, args: argparse.Namespace) -> None:
    images, labels = load_batch(args)
    result = client.eval_step(images, labels)
    if args.json:
        emit(result.as_dict())
    else:
        print_eval(result)


def print_eval(r: EvalResult) -> None:
    print(f"step {r.step}  loss {r.loss:.4f}  accuracy {r.accuracy * 100:.1f}% ({r.correct}/{r.count})")


# ---------------------------------------------------------------- optimizer

def optimizer(client: ViTClient, args: argparse.Namespace) -> None:
    if args.end_lr is not None and args.schedule is None:
        raise UsageError("--end-lr goes with --schedule")
    schedule = parse_schedule(args.schedule, args.end_lr) if args.schedule else None
    if args.lr is None and schedule is None and args.clip is None:
        state = client.get_optimizer()
    else:
        state = client.set_optimizer(learning_rate=args.lr, schedule=schedule, clip_grad_norm=args.clip)
    if args.json:
        emit(state.as_dict())
    else:
        print_optimizer(state)


def parse_schedule(values: list[str], end_lr: float | None) -> dict[str, Any]:
    """--schedule PEAK WARMUP DECAY [--end-lr E] as SetOptimizer's schedule."""
    peak, warmup, decay = values
    try:
        return {"peak_lr": float(peak), "warmup_steps": int(warmup), "decay_steps": int(decay),
                "end_lr": end_lr or 0.0}
    except ValueError:
        raise UsageError(f"--schedule needs PEAK (a number) WARMUP DECAY (whole steps), got {' '.join(values)}") \
            from None


def print_optimizer(state: OptimizerState) -> None:
    sched = state.schedule
    if sched is None:
        schedule = "none (constant learning rate)"
    else:
        schedule = (f"linear warmup 0 -> {sched.peak_lr:g} over {sched.warmup_steps} steps, "
                    f"decay to {sched.end_lr:g} over {sched.decay_steps} steps (position {state.schedule_position})")
    rows = [
        ("optimizer", state.optimizer),
        ("learning rate", f"{state.learning_rate:.6g} (next step)"),
        ("schedule", schedule),
        ("clipping", f"global gradient norm {state.clip_grad_norm:g}" if state.clip_grad_norm else "off"),
        ("step", str(state.step)),
        ("accumulated", f"{state.accumulated_batches} batch(es) pending"),
    ]
    for key, value in rows:
        print(f"{key:<15} {value}")


# ---------------------------------------------------------------- checkpoint, publish

def checkpoint(client: ViTClient, args: argparse.Namespace) -> None:
    if args.action == "list":
        listing = client.list_checkpoints()
        if args.json:
            emit(listing.as_dict())
        else:
            print_checkpoints(listing)
        return
    if args.action == "save":
        info, verb = client.save_checkpoint(args.name), "saved"
    else:
        info, verb = client.restore_checkpoint(args.name), "restored"
    if args.json:
        emit(info.as_dict())
    else:
        print(f"{verb} checkpoint {info.name}: step {info.step}, {human_size(info.size_bytes)}, "
              f"{info.reason}, written {local_time(info.created_unix)}")


def print_checkpoints(listing: CheckpointList) -> None:
    if not listing.checkpoints:
        print("no checkpoints")
        return
    rows = [(c.name + (" *" if c.name == listing.latest else ""), str(c.step), local_time(c.created_unix),
             human_size(c.size_bytes), c.reason) for c in listing.checkpoints]
    print_table(("name", "step", "written", "size", "reason"), rows, right={1, 3})
    print(f"latest: {listing.latest} (*)")


def publish(client: ViTClient, args: argparse.Namespace) -> None:
    version = client.publish()
    if args.json:
        emit(version.as_dict())
    else:
        print(f"published model version {version.version} (weights of step {version.step}); Predict serves it now")


def local_time(unix: float) -> str:
    """Seconds since the epoch as local YYYY-MM-DD HH:MM:SS."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(unix))


def human_size(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    if size < 1024 ** 2:
        return f"{size / 1024:.1f} KiB"
    return f"{size / 1024 ** 2:.1f} MiB"


def print_table(header: tuple[str, ...], rows: list[tuple[str, ...]], right: set[int] = frozenset(),
                indent: str = "  ") -> None:
    """Columns padded to their widest cell; column indices in `right` are right-aligned."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        print((indent + "  ".join(cells)).rstrip())


# ---------------------------------------------------------------- explain

def explain(client: ViTClient, args: argparse.Namespace) -> None:
    explanation = client.explain(args.parameter)
    if args.json:
        emit(explanation.as_dict())
        return
    print_loss(explanation)
    if args.parameter:
        for p in explanation.parameters:
            print_parameter_story(explanation, p)
    else:
        print_parameter_table(explanation)


def node_text(node: Any) -> str:
    return f"`{node.name}` ({node.op_type})" if node is not None else "(not reported)"


def print_loss(e: Explanation) -> None:
    loss = e.loss
    print(f"loss           {node_text(loss)}")
    if loss is not None:
        print(f"               inputs: {', '.join(loss.inputs) or '-'}  ->  output: {', '.join(loss.outputs) or '-'}")
    print(f"loss gradient  {node_text(e.loss_gradient)}  (backpropagation starts here)")
    print(f"graph          {e.forward_nodes} forward nodes, {e.backward_nodes} backward (gradient) nodes")


def print_parameter_table(e: Explanation) -> None:
    rows = [(p.name, str(p.block) if p.block >= 0 else "-", p.sublayer,
             p.gradient_node.op_type if p.gradient_node else "?", str(p.ops_from_loss)) for p in e.parameters]
    print(f"\n{len(rows)} trainable parameters: where each gradient is computed")
    print_table(("parameter", "block", "sublayer", "gradient op", "ops from loss"), rows, right={1, 4})


def print_parameter_story(e: Explanation, p: ParameterGradientPath) -> None:
    """The answer to "where are the loss and this weight's gradient (and its q, k, v parts') computed?"."""
    shape = "x".join(map(str, p.shape)) or "scalar"
    where = f"block {p.block}, {p.sublayer}" if p.block >= 0 else p.sublayer
    print(f"\nparameter {p.name}  [{shape}]  ({where})")
    if e.loss is not None:
        print(f"  1. the loss is computed by {node_text(e.loss)} from {', '.join(e.loss.inputs)}")
    print(f"  2. backpropagation starts at {node_text(e.loss_gradient)}")
    print(f"  3. the gradient of the {'fused q/k/v ' if p.qkv_parts else ''}weight, `{p.gradient_tensor}`, "
          f"is computed by {node_text(p.gradient_node)}, {p.ops_from_loss} ops from the loss gradient")
    if p.qkv_parts:
        print("  4. q, k and v get their gradients (the parts of the split to_qkv output) at:")
        for part in p.qkv_parts:
            print(f"       {part.part}: {node_text(part.gradient_node)} computes `{part.gradient_tensor}` "
                  f"(the gradient of `{part.tensor}`)")
        if p.shape and p.shape[0] % len(p.qkv_parts) == 0:
            rows = p.shape[0] // len(p.qkv_parts)
            spans = ", ".join(f"{part.part} rows [{i * rows}, {(i + 1) * rows})" for i, part in enumerate(p.qkv_parts))
            print(f"     so the fused weight's gradient holds {spans}")
    print(f"\n  path from the loss gradient to the weight's gradient node ({len(p.path)} ops):")
    width = max((len(node.op_type) for node in p.path), default=0)
    for i, node in enumerate(p.path, 1):
        print(f"    {i:>3}  {node.op_type:<{width}}  {node.name}")


# ---------------------------------------------------------------- grads

def grads(client: ViTClient, args: argparse.Namespace) -> None:
    from client.plots import gradient_flow  # matplotlib loads only for this command

    images, labels = load_batch(args)
    result = client.train_step(images, labels)
    path = gradient_flow(result, args.plot)
    if args.json:
        emit({"plot": str(path), "step": result.as_dict()})
    else:
        print_step(result)
        print(f"wrote {path}")


# ---------------------------------------------------------------- output

def emit(document: Any) -> None:
    print(json.dumps(document, indent=2))


def describe(error: Exception, address: str) -> str:
    """One line for stderr."""
    if isinstance(error, ClientError):
        details = " ".join(error.details.split())
        if error.code == "UNAVAILABLE":
            return f"UNAVAILABLE: cannot reach the server at {address} ({details})"
        return f"{error.code}: {details}"
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror}: {error.filename}" if error.filename else error.strerror
    return " ".join(str(error).split())


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help or a usage error, already printed by argparse
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    try:
        return run(args)
    except BrokenPipeError:  # the reader went away (`... | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (ClientError, UsageError, OSError, ValueError) as e:
        address = args.address or ViTClient.default_address()
        print(f"error: {describe(e, address)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
