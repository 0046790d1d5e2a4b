"""Fine-tune the served ViT on scikit-learn's digits over gRPC, publish it, and classify the test set.

    python -m examples.demo [--epochs N] [--batch-size B] [--address HOST:PORT] [--out demo-output]

Without --address the demo starts its own server (`python -m server --port 0`)
on the exported digits model and stops it at the end. The 1797 8x8 digits are
split 80/20 (stratified, seeded); the training split is streamed to TrainStep
in shuffled minibatches under a linear warmup/decay schedule, the test split is
scored with EvalStep after every epoch; then Publish switches Predict to the
trained weights and the test images are classified with Predict. Writes
loss_curve.png and gradient_flow.png into --out. Exit status 0 only when the
Predict test accuracy reaches --min-accuracy.
"""
from __future__ import annotations

import argparse
import math
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

from client import ClientError, LinearSchedule, ModelInfo, TrainStepResult, ViTClient
from client.plots import gradient_flow, loss_curve

READY = "vitserve listening on "
START_TIMEOUT = 120.0  # seconds for the server to print its listening line
STOP_TIMEOUT = 30.0  # seconds for the server to exit after SIGTERM
PIXEL_MAX = 16.0  # load_digits pixels are 0..16


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m examples.demo", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--address", help="use this running server instead of starting one")
    p.add_argument("--artifacts", default="artifacts/digits", help="exported model for the demo's own server")
    p.add_argument("--data-dir", help="the own server's data directory (default: a temporary one)")
    p.add_argument("--epochs", type=int, default=15, help="passes over the training split")
    p.add_argument("--batch-size", type=int, default=32, help="images per TrainStep")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of the schedule")
    p.add_argument("--warmup", type=float, default=0.1, help="fraction of the steps spent warming up")
    p.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clipping (0: off)")
    p.add_argument("--max-seconds", type=float, help="stop training after this many seconds")
    p.add_argument("--min-accuracy", type=float, default=0.95, help="Predict test accuracy needed for exit 0")
    p.add_argument("--seed", type=int, default=0, help="seed of the minibatch shuffling")
    p.add_argument("--out", type=Path, default=Path("demo-output"), help="folder for the figures")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in logs)")
    args = p.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1:
        p.error("--epochs and --batch-size must be at least 1")
    return args


# ---------------------------------------------------------------- data

@dataclass
class Split:
    """The digits as model input: images float32 [N, 1, 8, 8] (normalized), labels int64 [N]."""
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_split(info: ModelInfo) -> Split:
    """scikit-learn's digits, split 80/20 (stratified, random_state=0) and normalized with the
    server's own preprocessing: (pixel / 16 - mean) / std."""
    channels, height, width = info.input_shape[1:]
    if (channels, height, width) != (1, 8, 8):
        raise SystemExit(f"error: the demo needs a model with 1x8x8 input (the digits preset), "
                         f"but {info.name} takes {channels}x{height}x{width}")
    digits = load_digits()
    mean = np.float32(info.preprocessing["mean"][0])
    std = np.float32(info.preprocessing["std"][0])
    images = ((digits.images.astype(np.float32) / PIXEL_MAX - mean) / std)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(images, labels, test_size=0.2, random_state=0,
                                                        stratify=labels)
    return Split(x_train, y_train, x_test, y_test)


def batches(n: int, size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Index arrays of one shuffled pass over n items."""
    order = rng.permutation(n)
    for start in range(0, n, size):
        yield order[start:start + size]


# ---------------------------------------------------------------- the server

@contextmanager
def own_server(artifacts: str, data_dir: Path, log_path: Path) -> Iterator[str]:
    """Run `python -m server` on a free port; yield its HOST:PORT; SIGTERM it and wait at the end."""
    command = [sys.executable, "-m", "server", "--artifacts", artifacts, "--host", "127.0.0.1", "--port", "0",
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


# ---------------------------------------------------------------- training

@dataclass
class Training:
    history: list[dict]  # {"step", "loss"} per train step, {"step", "test_accuracy", "test_loss"} per epoch
    last_step: TrainStepResult | None  # the last train step, with its gradient summaries
    seconds: float
    epochs_done: int


def set_schedule(client: ViTClient, args: argparse.Namespace, total_steps: int) -> None:
    warmup = max(1, round(args.warmup * total_steps))
    schedule = LinearSchedule(peak_lr=args.lr, warmup_steps=warmup, decay_steps=max(total_steps - warmup, 1),
                              end_lr=0.0)
    state = client.set_optimizer(schedule=schedule, clip_grad_norm=args.clip)
    print(f"optimizer: {state.optimizer}, warmup 0 -> {args.lr:g} over {warmup} steps, linear decay to 0 "
          f"over {schedule.decay_steps} steps, clip {args.clip:g}")


def evaluate(client: ViTClient, x: np.ndarray, y: np.ndarray, batch_size: int) -> tuple[float, float]:
    """(mean loss, accuracy) of the training weights on (x, y), with EvalStep in batches."""
    loss_sum, correct = 0.0, 0
    for start in range(0, len(x), batch_size):
        r = client.eval_step(x[start:start + batch_size], y[start:start + batch_size])
        loss_sum += r.loss * r.count
        correct += r.correct
    return loss_sum / len(x), correct / len(x)


def train(client: ViTClient, data: Split, args: argparse.Namespace) -> Training:
    """Epochs of shuffled minibatches; EvalStep on the test split after each epoch."""
    steps_per_epoch = math.ceil(len(data.x_train) / args.batch_size)
    total = args.epochs * steps_per_epoch
    set_schedule(client, args, total)
    eval_batch = min(client.model_info().max_batch_size, 256)
    rng = np.random.default_rng(args.seed)
    history: list[dict] = []
    last: TrainStepResult | None = None
    seen = correct = epochs_done = 0
    started = time.perf_counter()
    bar = tqdm(total=total, unit="step", disable=args.no_progress, dynamic_ncols=True)
    with bar:
        for epoch in range(1, args.epochs + 1):
            for k, idx in enumerate(batches(len(data.x_train), args.batch_size, rng), 1):
                x, y = data.x_train[idx], data.y_train[idx]
                # Running accuracy: the batch scored by the weights about to train on it (as a
                # PyTorch loop scores its forward pass); EvalStep changes nothing.
                correct += client.eval_step(x, y).correct
                seen += len(y)
                last = client.train_step(x, y, summaries=(epoch == args.epochs and k == steps_per_epoch))
                if last.skipped_reason:
                    tqdm.write(f"step {last.step}: update skipped ({last.skipped_reason})")
                history.append({"step": last.step, "loss": last.loss})
                bar.set_postfix(epoch=epoch, loss=f"{last.loss:.3f}", acc=f"{correct / seen:.1%}",
                                lr=f"{last.learning_rate:.2g}")
                bar.update()
                if args.max_seconds and time.perf_counter() - started >= args.max_seconds:
                    break
            test_loss, test_acc = evaluate(client, data.x_test, data.y_test, eval_batch)
            history.append({"step": last.step, "test_accuracy": test_acc, "test_loss": test_loss})
            tqdm.write(f"epoch {epoch:>2}: train loss {last.loss:.4f}, running acc {correct / seen:.1%}, "
                       f"test loss {test_loss:.4f}, test acc {test_acc:.1%}")
            seen = correct = 0
            epochs_done = epoch
            if args.max_seconds and time.perf_counter() - started >= args.max_seconds:
                tqdm.write(f"--max-seconds {args.max_seconds:g} reached after epoch {epoch}")
                break
    return Training(history, last, time.perf_counter() - started, epochs_done)


def last_step_with_summaries(client: ViTClient, data: Split, training: Training, batch_size: int) -> TrainStepResult:
    """The final step's summaries; when --max-seconds cut the run short they are missing, so run one
    more step on the first training batch to have them."""
    if training.last_step is not None and training.last_step.gradients:
        return training.last_step
    return client.train_step(data.x_train[:batch_size], data.y_train[:batch_size])


# ---------------------------------------------------------------- after training

def predict_accuracy(client: ViTClient, x: np.ndarray, y: np.ndarray, batch_size: int) -> tuple[float, int]:
    """(top-1 accuracy, model version) of Predict on (x, y), in batches."""
    correct, versions = 0, set()
    for start in range(0, len(x), batch_size):
        result = client.predict(x[start:start + batch_size], top_k=1)
        top1 = np.array([top[0][0] for top in result.predictions])
        correct += int((top1 == y[start:start + batch_size]).sum())
        versions.add(result.model_version)
    if len(versions) != 1:
        raise SystemExit(f"error: Predict answered from several model versions {sorted(versions)}")
    return correct / len(x), versions.pop()


def run_demo(client: ViTClient, args: argparse.Namespace) -> int:
    info = client.model_info()
    data = load_split(info)
    print(f"model {info.name} on {info.device} ({', '.join(info.execution_providers)}), step {info.step}; "
          f"digits: {len(data.x_train)} train / {len(data.x_test)} test; preprocessing mean "
          f"{info.preprocessing['mean']} std {info.preprocessing['std']}")
    training = train(client, data, args)
    step = last_step_with_summaries(client, data, training, args.batch_size)
    version = client.publish()
    print(f"published model version {version.version} (weights of step {version.step})")
    accuracy, used = predict_accuracy(client, data.x_test, data.y_test, min(info.max_batch_size, 256))
    args.out.mkdir(parents=True, exist_ok=True)
    curve = loss_curve(training.history, args.out / "loss_curve.png")
    flow = gradient_flow(step, args.out / "gradient_flow.png")
    print(f"training: {training.epochs_done} epoch(s), {step.step} steps in {training.seconds:.1f} s")
    print(f"Predict test accuracy: {accuracy:.2%} ({round(accuracy * len(data.y_test))}/{len(data.y_test)}) "
          f"with model version {used}")
    print(f"wrote {curve} and {flow}")
    if accuracy < args.min_accuracy:
        print(f"FAILED: test accuracy {accuracy:.2%} is below --min-accuracy {args.min_accuracy:.2%}")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with ExitStack() as stack:
        address = args.address
        if address is None:
            args.out.mkdir(parents=True, exist_ok=True)
            data_dir = Path(args.data_dir) if args.data_dir else Path(stack.enter_context(
                tempfile.TemporaryDirectory(prefix="vitserve-demo-")))
            address = stack.enter_context(own_server(args.artifacts, data_dir, args.out / "server.log"))
            print(f"started a server on {address} (data dir {data_dir}, log {args.out / 'server.log'})")
        client = stack.enter_context(ViTClient(address, timeout=120.0))
        try:
            return run_demo(client, args)
        except ClientError as e:
            print(f"error: {e.code}: {' '.join(e.details.split())}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
