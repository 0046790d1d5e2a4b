"""Command-line interface for a vitserve server: `python -m client [options] COMMAND ...`.

Commands:

    info                        what model is served (version, training state, auto settings)
    predict IMAGE...            classify image files (folders: every file below them; --csv FILE: a table)
    fit DATA                    fine-tune on an ImageFolder or a CSV of path,label, epoch by epoch (docs/fit.md)
    evaluate DATA               accuracy, per-class precision/recall/F1, confusion matrix (--plot FILE)
    train-step BATCH            fine-tuning steps (--accumulate: gradient accumulation) + gradient summaries
                                (--heads: and head importance)
    eval-step BATCH             loss and accuracy of the training weights; changes nothing
    optimizer                   show, or set --lr / --schedule / --clip
    checkpoint save|list|restore
    publish                     serve the training weights from Predict (a new model version)
    explain                     where the loss and each parameter's gradient are computed
                                (--parameter NAME --plot FILE: a picture of its backward path)
    grads --plot FILE BATCH     one train step and a gradient-flow figure
    heads BATCH                 head importance per block and head (--plot FILE: a heatmap); changes nothing
    history                     the gradient history the server kept (--from, --to, --parameter, --plot)

BATCH is `--images FILE... --labels L...` or `--npz FILE`; a --plot FILE is .png or .svg. `--json` prints one
JSON document instead of text. Failures print one `error: ...` line on stderr
and exit with status 1.

Each command is a function from the client and the parsed arguments to a result;
client/render.py prints any result (client/render_training.py and render_explain.py hold the results of the
training commands and of explain and attribute, with their text), client/cli.py holds the argument parser.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from client.cli import (UsageError, build_parser, class_index, load_batch, load_npz, parse_schedule, picture,
                        resume_command)
from client import (
    CheckpointList,
    ClientError,
    EvalResult,
    ModelInfo,
    ModelVersion,
    OptimizerState,
    ViTClient,
)
from client.evaluate import Evaluation, FolderPredictions
from client.render import Checkpointed, Health, Predictions, render
from client.render_explain import Attributed, Explained
from client.render_training import Fitted, GradientPlot, Heads, History, TrainSteps, print_epoch


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


# ---------------------------------------------------------------- commands

def health(client: ViTClient, args: argparse.Namespace) -> Health:
    """For probes (Docker HEALTHCHECK, Kubernetes): the exit status is 0 only when SERVING."""
    return Health(client.health())


def info(client: ViTClient, args: argparse.Namespace) -> ModelInfo:
    return client.model_info(args.model)


def predict(client: ViTClient, args: argparse.Namespace) -> Predictions | FolderPredictions:
    """Files one request as before; folders (or --csv) decoded here and sent in batches, bad files skipped."""
    if args.csv is None and not any(Path(f).is_dir() for f in args.images):
        return Predictions(args.images, client.predict([Path(f) for f in args.images], args.top_k, args.logits,
                                                       model=args.model))
    if args.logits:
        raise UsageError("--logits goes with image files, not with folders or --csv")
    return client.predict_folder(args.images, top_k=args.top_k, batch_size=args.batch_size, workers=args.workers,
                                 strict=args.strict, csv_path=args.csv, model=args.model)


def fit(client: ViTClient, args: argparse.Namespace) -> Fitted:
    if args.end_lr is not None and args.schedule is None:
        raise UsageError("--end-lr goes with --schedule")
    on_epoch = None if args.json else print_epoch
    result = client.fit(args.data, args.out, on_epoch=on_epoch, epochs=args.epochs, batch_size=args.batch_size,
                        seed=args.seed, val_split=args.val_split, val=args.val, lr=args.lr,
                        schedule=parse_schedule(args.schedule, args.end_lr) if args.schedule else None,
                        augment=args.augment, patience=args.patience, publish=args.publish, resume=args.resume,
                        strict=args.strict, workers=args.workers, retry_seconds=args.retry_seconds,
                        progress=False if args.no_progress else None)
    return Fitted(result, resume_command(args.argv) if result.interrupted else "")


def evaluate(client: ViTClient, args: argparse.Namespace) -> Evaluation:
    return client.evaluate(args.data, top_k=args.top_k, batch_size=args.batch_size, workers=args.workers,
                           strict=args.strict, plot=picture(args.plot), model=args.model)


def train_step(client: ViTClient, args: argparse.Namespace) -> TrainSteps:
    """--repeat steps on one batch, run one by one as the renderer reads them."""
    if args.repeat < 1:
        raise UsageError(f"--repeat must be at least 1, got {args.repeat}")
    images, labels = load_batch(args)
    steps = (client.train_step(images, labels, summaries=not args.no_summaries, accumulate_only=args.accumulate,
                               head_importance=args.heads)
             for _ in range(args.repeat))
    return TrainSteps(steps, summaries=not args.no_summaries, top=args.top, heads=args.heads)


def eval_step(client: ViTClient, args: argparse.Namespace) -> EvalResult:
    return client.eval_step(*load_batch(args))


def optimizer(client: ViTClient, args: argparse.Namespace) -> OptimizerState:
    if args.end_lr is not None and args.schedule is None:
        raise UsageError("--end-lr goes with --schedule")
    schedule = parse_schedule(args.schedule, args.end_lr) if args.schedule else None
    if args.lr is None and schedule is None and args.clip is None:
        return client.get_optimizer()
    return client.set_optimizer(learning_rate=args.lr, schedule=schedule, clip_grad_norm=args.clip)


def checkpoint(client: ViTClient, args: argparse.Namespace) -> CheckpointList | Checkpointed:
    if args.action == "list":
        return client.list_checkpoints()
    if args.action == "save":
        return Checkpointed("saved", client.save_checkpoint(args.name))
    return Checkpointed("restored", client.restore_checkpoint(args.name))


def publish(client: ViTClient, args: argparse.Namespace) -> ModelVersion:
    return client.publish()


def explain(client: ViTClient, args: argparse.Namespace) -> Explained:
    plot = picture(args.plot)
    if plot is not None and not args.parameter:
        raise UsageError("--plot draws one parameter's path: give --parameter NAME")
    explanation = client.explain(args.parameter)
    if plot is None:
        return Explained(explanation, detail=bool(args.parameter))
    from client.graphs import draw_gradient_path  # matplotlib loads only for the plots

    return Explained(explanation, detail=True, picture=draw_gradient_path(explanation, args.parameter, plot))


def attribute(client: ViTClient, args: argparse.Namespace) -> Attributed:
    """The images are decoded here, with the model's own preprocessing (proto/images.py), and sent as a tensor:
    the overlay shows exactly the pixels the maps are of."""
    from proto.images import ImageError, Recipe, decode_file

    plot = picture(args.plot)
    info = client.model_info(args.model)
    recipe = Recipe.of(info.preprocessing)
    if args.npz:
        (images,) = load_npz(args.npz, ("images",))
        images = np.asarray(images, dtype=np.float32)
    else:
        try:
            images = np.stack([decode_file(path, recipe) for path in args.images])
        except ImageError as e:
            raise UsageError(str(e)) from None
    targets = [class_index(args.target, list(info.class_names))] * len(images) if args.target is not None else None
    result = client.attribute(images, targets, args.method, args.heads, args.training_weights, args.model)
    names = [Path(p).name for p in args.images] if not args.npz else [f"image {i}" for i in range(len(images))]
    if plot is not None:
        from client.overlays import attribution_overlay

        attribution_overlay(result, images * recipe.std + recipe.mean, names, plot)
    return Attributed(result, names, plot)


def grads(client: ViTClient, args: argparse.Namespace) -> GradientPlot:
    from client.plots import gradient_flow

    plot = picture(args.plot)
    images, labels = load_batch(args)
    result = client.train_step(images, labels)
    return GradientPlot(gradient_flow(result, plot), result)


def heads(client: ViTClient, args: argparse.Namespace) -> Heads:
    plot = picture(args.plot)
    result = client.head_importance(*load_batch(args))
    if plot is not None:
        from client.plots import head_heatmap

        head_heatmap(result, plot)
    return Heads(result, plot)


def history(client: ViTClient, args: argparse.Namespace) -> History:
    plot = picture(args.plot)
    result = client.gradient_history(args.first_step, args.last_step, args.parameter)
    if plot is not None:
        from client.plots import gradient_history

        gradient_history(result, plot, args.parameter)
    return History(result, args.parameter, plot)


COMMANDS: dict[str, Callable[[ViTClient, argparse.Namespace], Any]] = {
    "health": health, "info": info, "predict": predict, "fit": fit, "evaluate": evaluate, "train-step": train_step, "eval-step": eval_step,
    "optimizer": optimizer, "checkpoint": checkpoint, "publish": publish, "explain": explain, "grads": grads,
    "heads": heads, "history": history, "attribute": attribute,
}


# ---------------------------------------------------------------- main

def run(args: argparse.Namespace) -> int:
    """Run the command and print its result; the exit status (health: 1 unless SERVING)."""
    with connect(args) as client:
        result = COMMANDS[args.command](client, args)
        render(result, args.json)
    if isinstance(result, Fitted) and result.result.interrupted:
        return 128 + result.result.interrupted  # as a process stopped by that signal reports it
    return 1 if isinstance(result, Health) and not result.serving else 0


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
        args.argv = list(sys.argv[1:] if argv is None else argv)
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
