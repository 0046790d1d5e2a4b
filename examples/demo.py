"""The journey, end to end, on data that ships offline: a pretrained Hugging Face ViT and a folder of images to a
served, fine-tuned model.

    python -m examples.demo [--epochs N] [--out demo-output]        (make demo)

1. scikit-learn's 1797 digits are written as an ImageFolder of PNGs (one folder per digit), split 80/20
   (stratified, seeded) into train/ and test/.
2. A Hugging Face ViTForImageClassification is saved with `save_pretrained`, with its image processor's
   config, as a checkpoint from the Hub would be. Nothing is downloaded, so its weights are random: it stands in
   for a pretrained backbone, and its 1000-class head stands in for ImageNet's.
3. `python -m model.export --pretrained ... --num-classes 10 --labels-from train/` keeps the backbone, gives it a
   new 10-class head named after the folders, reads the preprocessing from the checkpoint, and checks itself.
4. A server (`python -m server`) serves the export; the three commands a user runs follow, each printed first:
   `vitserve fit` (then publish the best), `vitserve evaluate` (confusion matrix) and `vitserve predict --csv`.

Prints each stage's time and the test accuracy; exit status 0 only when it reaches --min-accuracy.
"""
from __future__ import annotations

import argparse
import json
import math
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

READY = "vitserve listening on "
START_TIMEOUT = 120.0  # seconds for the server to print its listening line
STOP_TIMEOUT = 30.0  # seconds for the server to exit after SIGTERM
MODEL = "digits-hf"  # the export's name


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m examples.demo", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("demo-output"), help="folder for the data, model and results")
    p.add_argument("--epochs", type=int, default=15, help="fit's passes over the training images")
    p.add_argument("--batch-size", type=int, default=32, help="images per TrainStep")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of fit's schedule")
    p.add_argument("--val-split", type=float, default=0.1, help="training images fit holds out to pick the best epoch")
    p.add_argument("--min-accuracy", type=float, default=0.95, help="test accuracy needed for exit 0")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the new head and fit's order")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (e.g. in logs)")
    args = p.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1:
        p.error("--epochs and --batch-size must be at least 1")
    return args


# ---------------------------------------------------------------- 1. the data, 2. the checkpoint

def write_image_folder(root: Path, seed: int) -> tuple[int, int]:
    """digits as root/{train,test}/<digit>/<index>.png (8-bit grey, 0..16 scaled to 0..255); (train, test) counts."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    index = np.arange(len(digits.target))
    train, test = train_test_split(index, test_size=0.2, stratify=digits.target, random_state=seed)
    for split, chosen in (("train", train), ("test", test)):
        for i in chosen:
            folder = root / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (digits.images[i] * (255 / 16)).round().astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:04d}.png")
    return len(train), len(test)


def save_checkpoint(folder: Path, seed: int) -> None:
    """A small ViTForImageClassification (8x8 grey images, 2x2 patches, width 96, 4 blocks) with a 1000-class
    head, and its image processor's config, written as `save_pretrained` writes them."""
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # not its note that the image processor falls back to Pillow without torchvision
    hf_logging.disable_progress_bar()
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(seed)
    config = ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=96, num_hidden_layers=4,
                       num_attention_heads=4, intermediate_size=192, num_labels=1000)
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": 8, "width": 8}, image_mean=[0.5], image_std=[0.5]).save_pretrained(folder)


# ---------------------------------------------------------------- 3. the server

@contextmanager
def own_server(artifacts: Path, data_dir: Path, log_path: Path) -> Iterator[str]:
    """Run `python -m server` on a free port; yield its HOST:PORT; SIGTERM it and wait at the end."""
    command = [sys.executable, "-m", "server", "--artifacts", str(artifacts), "--host", "127.0.0.1", "--port", "0",
               "--data-dir", str(data_dir), "--metrics-port", "-1", "--http-port", "-1"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)
        try:
            yield wait_until_listening(proc, log_path)
        finally:
            stop_server(proc)


def wait_until_listening(proc: subprocess.Popen, log_path: Path) -> str:
    """The address from the server's "vitserve listening on HOST:PORT" line."""
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:  # stdout -> queue (None at EOF); keeps draining so the pipe never fills
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            line = lines.get(timeout=max(deadline - time.monotonic(), 0.01))
        except queue.Empty:
            raise SystemExit(f"error: the server printed no listening line in {START_TIMEOUT:g}s (log: {log_path})")
        if line is None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-1:]
            raise SystemExit(f"error: the server exited with {proc.wait()} before listening: "
                             f"{tail[0] if tail else '(no output)'} (log: {log_path})")
        if line.startswith(READY):
            return line[len(READY):].strip()


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------- the commands, as a user types them

def run(shown: list[str], command: list[str], capture: bool = False) -> str:
    """Print the command as a user would type it (`shown`), run it (`command`), stop the demo if it fails."""
    print(f"\n$ {shlex.join(shown)}", flush=True)
    result = subprocess.run(command, text=True, stdout=subprocess.PIPE if capture else None)
    if result.returncode != 0:
        raise SystemExit(f"error: {shown[0]} {shown[1] if len(shown) > 1 else ''} failed with exit status "
                         f"{result.returncode}")
    return result.stdout if capture else ""


def vitserve(address: str, *args: str, capture: bool = False) -> str:
    return run(["vitserve", *args], [sys.executable, "-m", "client", "--address", address, "--timeout", "600", *args],
               capture=capture)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out.resolve()
    data, checkpoint, artifacts = out / "digits", out / "hf-vit", out / "artifacts"
    times: dict[str, float] = {}

    started = time.perf_counter()
    if (data / "train").is_dir():
        print(f"using the ImageFolder in {data}")
    else:
        n_train, n_test = write_image_folder(data, args.seed)
        print(f"wrote scikit-learn's digits as an ImageFolder: {n_train} training and {n_test} test PNGs in {data}")
    save_checkpoint(checkpoint, args.seed)
    print(f"saved a Hugging Face ViT checkpoint (save_pretrained) to {checkpoint}")
    times["data + checkpoint"] = time.perf_counter() - started

    started = time.perf_counter()
    export = ["--pretrained", str(checkpoint), "--model", "transformers:ViTForImageClassification",
              "--num-classes", "10", "--labels-from", str(data / "train"), "--seed", str(args.seed),
              "--name", MODEL, "--out", str(artifacts)]
    run(["python", "-m", "model.export", *export], [sys.executable, "-m", "model.export", *export])
    times["export"] = time.perf_counter() - started

    progress = ["--no-progress"] if args.no_progress else []
    with own_server(artifacts / MODEL, out / "server-data", out / "server.log") as address:
        print(f"\nserving {artifacts / MODEL} on {address} (log: {out / 'server.log'})")
        started = time.perf_counter()
        images = sum(1 for _ in (data / "train").rglob("*.png"))
        fitted = images - round(args.val_split * images)  # about what fit trains on after its split
        steps = args.epochs * math.ceil(fitted / args.batch_size)
        warmup = max(1, round(0.1 * steps))  # a linear warmup over the first tenth, then decay to 0
        vitserve(address, "fit", str(data / "train"), "--val-split", str(args.val_split), "--epochs", str(args.epochs),
                 "--batch-size", str(args.batch_size), "--schedule", str(args.lr), str(warmup), str(steps - warmup),
                 "--seed", str(args.seed), "--publish", "--out", str(out / "fit"), *progress)
        times["fit"] = time.perf_counter() - started

        started = time.perf_counter()
        report = json.loads(vitserve(address, "evaluate", str(data / "test"), "--plot", str(out / "confusion.png"),
                                     "--json", capture=True))
        print(f"accuracy {report['accuracy']:.2%} on {report['count']} test images, top-5 "
              f"{report['top_k_accuracy']:.2%}; confusion matrix: {out / 'confusion.png'}")
        times["evaluate"] = time.perf_counter() - started

        started = time.perf_counter()
        vitserve(address, "predict", str(data / "test"), "--csv", str(out / "predictions.csv"), "--top-k", "3")
        times["predict --csv"] = time.perf_counter() - started

    print("\ntimes: " + ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in times.items()))
    accuracy = report["accuracy"]
    print(f"test accuracy: {accuracy:.2%} ({round(accuracy * report['count'])}/{report['count']}) with model version "
          f"{report['model_version']}")
    if accuracy < args.min_accuracy:
        print(f"error: test accuracy {accuracy:.2%} is below --min-accuracy {args.min_accuracy:.0%}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
