"""Command-line interface for a vitserve server: `python -m client [options] COMMAND ...`.

Commands: `info` (what model is served), `predict` (classify image files) and
`train-step` (run fine-tuning steps and show the gradient summaries). `--json`
prints one JSON document instead of text. Failures print one `error: ...` line
on stderr and exit with status 1.
"""
from __future__ import annotations

import argparse
import json
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from client.client import ClientError, ModelInfo, PredictResult, TrainStepResult, ViTClient


class UsageError(Exception):
    """A problem with the command's inputs, found before anything is sent."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m client", description="Talk to a vitserve server (proto/vitserve.proto).")
    parser.add_argument("--address", help="server HOST:PORT (default: $VITSERVE_ADDRESS or localhost:50051)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per call; 0 = none (default 30)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    # --json is also accepted after the command; SUPPRESS keeps it from resetting the global flag.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("info", parents=[common], help="show the served model")

    p = sub.add_parser("predict", parents=[common], help="classify image files")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ...)")
    p.add_argument("--top-k", type=int, default=5, metavar="K", help="classes per image (default 5)")
    p.add_argument("--logits", action="store_true", help="also print the raw logits")

    t = sub.add_parser("train-step", parents=[common], help="run fine-tuning steps on one batch")
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", nargs="+", metavar="FILE", help="encoded image files (needs --labels)")
    src.add_argument("--npz", metavar="FILE", help=".npz with `images` float32 [N,C,H,W] and `labels` int64 [N]")
    t.add_argument("--labels", nargs="+", type=int, metavar="L", help="class index per --images file")
    t.add_argument("--repeat", type=int, default=1, metavar="N", help="steps to run on the batch (default 1)")
    t.add_argument("--no-summaries", action="store_true", help="skip the gradient summaries")
    t.add_argument("--top", type=int, default=10, metavar="N", help="parameters to show (default 10)")
    return parser


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
    ]
    for key, value in rows:
        print(f"{key:<15} {value}")


# ---------------------------------------------------------------- predict

def print_predictions(files: list[str], result: PredictResult) -> None:
    for i, (name, top) in enumerate(zip(files, result.predictions)):
        print(name)
        width = max((len(label) for _, label, _ in top), default=0)
        for _, label, prob in top:
            print(f"  {label:<{width}}  {prob * 100:5.1f}%")
        if result.logits is not None:
            print("  logits " + np.array2string(result.logits[i], precision=4, max_line_width=10**6))


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
    print(f"step {r.step}  loss {r.loss:.4f}  lr {r.learning_rate:.3g}  "
          f"grad-norm {r.grad_norm:.4g}  ({r.step_seconds * 1000:.1f} ms)")


def print_gradients(r: TrainStepResult, top: int) -> None:
    grads = sorted(r.gradients, key=lambda g: g.l2_norm, reverse=True)[:max(top, 0)]
    if grads:
        rows = [(g.name, "x".join(map(str, g.shape)) or "scalar", f"{g.l2_norm:.3e}",
                 f"{g.max_abs:.3e}", f"{g.zero_fraction * 100:.1f}", f"{g.update_ratio:.3e}")
                for g in grads]
        header = ("parameter", "shape", "grad L2", "max|g|", "zero %", "update ratio")
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        print(f"\ntop {len(grads)} of {len(r.gradients)} parameters by gradient L2 norm")
        for row in [header, *rows]:
            print("  " + "  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                                   for i, (c, w) in enumerate(zip(row, widths))))
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

def run(args: argparse.Namespace) -> int:
    with ViTClient(args.address, timeout=args.timeout or None) as client:
        if args.command == "info":
            info = client.model_info()
            if args.json:
                emit(info.as_dict())
            else:
                print_info(info)
        elif args.command == "predict":
            result = client.predict([Path(f) for f in args.images], args.top_k, args.logits)
            if args.json:
                emit(result.as_dict())
            else:
                print_predictions(args.images, result)
        else:
            train_steps(client, args)
    return 0


def train_steps(client: ViTClient, args: argparse.Namespace) -> None:
    if args.repeat < 1:
        raise UsageError(f"--repeat must be at least 1, got {args.repeat}")
    images, labels = load_batch(args)
    results = []
    for _ in range(args.repeat):
        results.append(client.train_step(images, labels, summaries=not args.no_summaries))
        if not args.json:
            print_step(results[-1])
    if args.json:
        emit(results[0].as_dict() if len(results) == 1 else [r.as_dict() for r in results])
    elif not args.no_summaries:
        print_gradients(results[-1], args.top)
        print_attention(results[-1])


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
    except (ClientError, UsageError, OSError, ValueError) as e:
        address = args.address or ViTClient.default_address()
        print(f"error: {describe(e, address)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
