"""The command line of `python -m client`: its argument parser, and the inputs its arguments name
(a batch from --images/--labels or --npz, a --schedule, a --plot picture), checked before anything is sent."""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np


class UsageError(Exception):
    """A problem with the command's inputs, found before anything is sent."""


def program_name(module_form: str) -> str:
    """How the user started us: the console script's name (vitserve), else `python -m client`."""
    name = os.path.basename(sys.argv[0])
    return module_form if name in ("__main__.py", "-c", "") else name


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=program_name("python -m client"),
                                     description="Talk to a vitserve server (proto/vitserve.proto).", allow_abbrev=False)
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
    i = sub.add_parser("info", parents=[common], help="show the served model")
    i.add_argument("--model", default="", metavar="NAME", help="which model (a replica of a repository serves many)")

    p = sub.add_parser("predict", parents=[common], help="classify image files")
    p.add_argument("--model", default="", metavar="NAME", help="which model (default: the only one)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ...) or folders (every file "
                                                              "below them, decoded here and sent in batches)")
    p.add_argument("--top-k", type=int, default=5, metavar="K", help="classes per image (default 5)")
    p.add_argument("--logits", action="store_true", help="also print the raw logits (files only, not folders)")
    p.add_argument("--csv", metavar="FILE", help="write a table: path, class, probability, then the other top-k")
    add_data_arguments(p)

    f = sub.add_parser("fit", parents=[common], help="fine-tune on an ImageFolder or a CSV, epoch by epoch",
                       description="Fine-tune the served model on DATA (an ImageFolder: one sub-folder per class; or "
                                   "a CSV of path,label) with TrainStep, scoring each epoch with EvalStep. Writes "
                                   "fit.json, fit_curve.png and fit-state.json into --out; checkpoints fit-best and "
                                   "fit-last on the server. Ctrl-C or SIGTERM stop after the current step.")
    f.add_argument("data", metavar="DATA", help="an ImageFolder or a CSV of path,label (paths relative to it)")
    held = f.add_mutually_exclusive_group()
    held.add_argument("--val-split", type=float, default=0.2, metavar="F",
                      help="hold out this fraction of each class for validation (stratified, seeded; default 0.2)")
    held.add_argument("--val", metavar="DATA", help="a separate validation ImageFolder or CSV")
    f.add_argument("--epochs", type=int, default=10, metavar="N", help="passes over the training files (default 10)")
    f.add_argument("--batch-size", type=int, default=32, metavar="B", help="images per TrainStep (default 32)")
    f.add_argument("--seed", type=int, default=0, help="seed of the split, the order and the augmentation")
    rate = f.add_mutually_exclusive_group()
    rate.add_argument("--lr", type=float, metavar="X", help="constant learning rate, set once at the start")
    rate.add_argument("--schedule", nargs=3, metavar=("PEAK", "WARMUP", "DECAY"),
                      help="linear warmup to PEAK over WARMUP steps, then decay over DECAY steps (as `optimizer`)")
    f.add_argument("--end-lr", type=float, metavar="E", help="learning rate at the end of the decay (default 0)")
    f.add_argument("--augment", action="store_true", help="random resized crop and horizontal flip, per epoch")
    f.add_argument("--patience", type=int, default=0, metavar="P",
                   help="stop after P epochs without a better validation accuracy (default 0: never)")
    f.add_argument("--publish", action="store_true", help="at the end, restore the best checkpoint and publish it")
    f.add_argument("--resume", action="store_true", help="continue the fit whose state is in --out")
    f.add_argument("--out", default="fit-output", metavar="DIR", help="folder for fit.json, the curve and the state "
                                                                      "(default fit-output)")
    f.add_argument("--retry-seconds", type=float, default=120.0, metavar="S",
                   help="how long to wait for a server that went away before giving up (default 120)")
    add_data_arguments(f, batch=False, progress=True)

    v = sub.add_parser("evaluate", parents=[common], help="accuracy, per-class precision/recall/F1 and a confusion "
                                                         "matrix of the served model on labelled data")
    v.add_argument("data", metavar="DATA", help="an ImageFolder or a CSV of path,label")
    v.add_argument("--model", default="", metavar="NAME", help="which model (default: the only one)")
    v.add_argument("--top-k", type=int, default=5, metavar="K", help="also the top-K accuracy (default 5)")
    v.add_argument("--plot", metavar="FILE.png|.svg", help="write the confusion matrix")
    add_data_arguments(v)

    t = sub.add_parser("train-step", parents=[common], help="run fine-tuning steps on one batch")
    add_batch_arguments(t)
    t.add_argument("--repeat", type=int, default=1, metavar="N", help="steps to run on the batch (default 1)")
    t.add_argument("--accumulate", action="store_true",
                   help="accumulate the gradients only; the next step without --accumulate applies them")
    t.add_argument("--no-summaries", action="store_true", help="skip the gradient summaries")
    t.add_argument("--top", type=int, default=10, metavar="N", help="parameters to show (default 10)")
    t.add_argument("--heads", action="store_true",
                   help="also compute head importance (per block and head) in the step and print it")

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
    x.add_argument("--plot", metavar="FILE.png|.svg",
                   help="draw that parameter's backward path, q/k/v branches marked (graphviz's dot if on PATH, "
                        "else matplotlib)")

    a = sub.add_parser("attribute", parents=[common], help="which image patches each prediction comes from")
    a.add_argument("--model", default="", metavar="NAME", help="which model (default: the only one)")
    source = a.add_mutually_exclusive_group(required=True)
    source.add_argument("images", nargs="*", default=[], metavar="IMAGE", help="image files (PNG, JPEG, ...)")
    source.add_argument("--npz", metavar="FILE", help=".npz with `images` float32 [N,C,H,W] (labels, if any, unused)")
    a.add_argument("--method", default="rollout", choices=("rollout", "chefer", "gradxinput"),
                   help="attention rollout, Chefer et al.'s relevance, or input x gradient (default rollout)")
    a.add_argument("--target", metavar="CLASS", help="the class to explain, index or name (default: each "
                                                     "image's predicted class)")
    a.add_argument("--heads", action="store_true", help="also each block's and head's map (rollout, chefer)")
    a.add_argument("--training-weights", action="store_true",
                   help="explain the trainer's current weights instead of the served version")
    a.add_argument("--plot", metavar="FILE.png|.svg", help="each image overlaid with its map, one panel per image")

    g = sub.add_parser("grads", parents=[common], help="run one train step and plot the gradient flow")
    g.add_argument("--plot", required=True, metavar="FILE.png|.svg", help="where to write the figure")
    add_batch_arguments(g)

    h = sub.add_parser("heads", parents=[common], help="head importance per block and head on a batch; "
                                                       "changes nothing")
    add_batch_arguments(h)
    h.add_argument("--plot", metavar="FILE.png|.svg", help="also write a blocks x heads heatmap")

    r = sub.add_parser("history", parents=[common], help="the gradient history the server kept, step by step")
    r.add_argument("--from", dest="first_step", type=int, default=0, metavar="STEP",
                   help="first step (default: the oldest kept)")
    r.add_argument("--to", dest="last_step", type=int, default=0, metavar="STEP",
                   help="last step (default: the newest)")
    r.add_argument("--parameter", default="", metavar="PATTERN",
                   help="shell-style pattern of the parameters to show (e.g. '*to_qkv*'); default: none shown")
    r.add_argument("--plot", metavar="FILE.png|.svg",
                   help="also plot the loss and the parameters' gradient norms (and q/k/v) over the steps")
    return parser


def add_data_arguments(parser: argparse.ArgumentParser, batch: bool = True, progress: bool = False) -> None:
    """How files are read: --batch-size (unless the command has its own), --workers, --strict (and --no-progress)."""
    if batch:
        parser.add_argument("--batch-size", type=int, default=32, metavar="B", help="images per call (default 32)")
    parser.add_argument("--workers", type=int, default=2, metavar="N", help="decoding threads (default 2)")
    parser.add_argument("--strict", action="store_true",
                        help="a file that cannot be decoded is an error (default: skipped and named at the end)")
    if progress:
        parser.add_argument("--no-progress", action="store_true", help="no progress bars (they show only on a terminal)")


def resume_command(argv: list[str]) -> str:
    """The command line that continues this fit: the same arguments plus --resume, as the user started us."""
    name = os.path.basename(sys.argv[0])
    program = [sys.executable, "-m", "client"] if name in ("__main__.py", "-c", "") else [name]
    return shlex.join([*program, *argv, *([] if "--resume" in argv else ["--resume"])])


def picture(path: str | None) -> Path | None:
    """A --plot file: a .png or .svg path, or None when --plot was not given."""
    if path is None:
        return None
    if Path(path).suffix.lower() not in (".png", ".svg"):
        raise UsageError(f"--plot {path}: the picture must be a .png or .svg file")
    return Path(path)


def add_batch_arguments(parser: argparse.ArgumentParser) -> None:
    """--images FILE... --labels L... or --npz FILE."""
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", nargs="+", metavar="FILE", help="encoded image files (needs --labels)")
    src.add_argument("--npz", metavar="FILE", help=".npz with `images` float32 [N,C,H,W] and `labels` int64 [N]")
    parser.add_argument("--labels", nargs="+", type=int, metavar="L", help="class index per --images file")


def load_batch(args: argparse.Namespace) -> tuple[Any, Any]:
    """The (images, labels) batch named by --images/--labels or --npz. Whether the labels fit the images is
    the server's to say (INVALID_ARGUMENT naming the shapes)."""
    if args.npz:
        if args.labels:
            raise UsageError("--labels goes with --images; an --npz holds its own labels")
        return load_npz(args.npz)
    if not args.labels:
        raise UsageError("--images needs --labels, one class index per image")
    return [Path(f) for f in args.images], args.labels


def load_npz(path: str, names: tuple[str, ...] = ("images", "labels")) -> tuple[np.ndarray, ...]:
    """The arrays `names` of an .npz (--npz: images and labels; attribute needs only images)."""
    try:
        data = np.load(path, allow_pickle=False)  # OSError (missing file) propagates as is
    except (ValueError, EOFError, zipfile.BadZipFile) as e:
        raise UsageError(f"{path} is not an .npz file") from e
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise UsageError(f"{path} is a single array, not an .npz with {' and '.join(f'`{n}`' for n in names)}")
    with data:
        missing = set(names) - set(data.files)
        if missing:
            raise UsageError(f"{path} has no array(s) named {', '.join(sorted(missing))}")
        return tuple(data[n] for n in names)


def class_index(target: str, class_names: list[str]) -> int:
    """--target CLASS: a class name of the model, else an index."""
    if target in class_names:
        return class_names.index(target)
    try:
        return int(target)
    except ValueError:
        raise UsageError(f"--target {target}: not one of the model's classes ({', '.join(class_names[:10])}"
                         f"{', ...' if len(class_names) > 10 else ''}) nor a class index") from None


def parse_schedule(values: list[str], end_lr: float | None) -> dict[str, Any]:
    """--schedule PEAK WARMUP DECAY [--end-lr E] as SetOptimizer's schedule."""
    peak, warmup, decay = values
    try:
        return {"peak_lr": float(peak), "warmup_steps": int(warmup), "decay_steps": int(decay),
                "end_lr": end_lr or 0.0}
    except ValueError:
        raise UsageError(f"--schedule needs PEAK (a number) WARMUP DECAY (whole steps), got {' '.join(values)}") \
            from None
