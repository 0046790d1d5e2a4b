"""`fit`: fine-tune the served model on a folder of labelled images, epoch by epoch, over TrainStep and EvalStep.

One run, written into its output folder:

- the data (client/dataset.py) is read and every class name matched to the model's before any step;
- `--lr` / `--schedule` go to SetOptimizer once, at the start; SaveCheckpoint `fit-last` marks the starting point;
- each epoch sends the training files in a seeded order (client/loader.py decodes them in worker threads ahead of
  the calls; an epoch's first batches start decoding before the checkpoint that precedes it, so the server
  writing it and the client decoding overlap), then EvalStep scores the validation files; a better validation
  accuracy is saved as `fit-best`, the end of every epoch as `fit-last`; `patience` epochs without a better one
  stop the run;
- `fit-state.json` (epoch, batch, step, best, seed: written whole, tmp + os.replace) lets `resume` continue where
  it stopped; `fit.json` holds every epoch's metrics, `fit_curve.png` draws them;
- SIGINT or SIGTERM finish the step in flight (a second one abandons it), save `fit-last` and stop;
- a server that goes away (UNAVAILABLE, or CANCELLED: gRPC cancels the calls a stopping server still holds) is
  waited for with backoff; once it answers, the run finds its place again from the server's step (the steps this
  run saw, or else `fit-last` restored) and goes on;
- `publish` restores `fit-best` and publishes it at the end.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
from tqdm import tqdm

from client import ClientError, ModelVersion
from client.dataset import DataError, class_indices, read_dataset, stratified_split
from client.loader import Batches, Loader
from proto.images import Recipe

if TYPE_CHECKING:
    from client.client import ViTClient

STATE, METRICS, CURVE = "fit-state.json", "fit.json", "fit_curve.png"
BEST, LAST = "fit-best", "fit-last"  # the run's checkpoints on the server


@dataclass
class FitOptions:
    epochs: int = 10
    batch_size: int = 32
    seed: int = 0
    val_split: float = 0.2  # held out of DATA, stratified, when no `val` is given
    val: str | os.PathLike | None = None  # a separate validation ImageFolder or CSV
    lr: float | None = None
    schedule: Any = None  # a LinearSchedule or its dict
    augment: bool = False
    patience: int = 0  # epochs without a better validation accuracy before stopping; 0: never
    publish: bool = False
    resume: bool = False
    strict: bool = False
    workers: int = 2
    prefetch: int = 4
    cache_mb: float = 1024
    retry_seconds: float = 120.0
    progress: bool | None = None  # tqdm bars; None: only on a terminal


@dataclass
class FitState:
    """Where a run is (fit-state.json): `epoch` finished epochs, `batch` batches of the next one sent, `step` the
    server's step there, and the run's own history."""
    data: str
    seed: int
    batch_size: int
    epoch: int = 0
    batch: int = 0
    step: int = 0
    best: dict | None = None
    since_best: int = 0
    history: list[dict] = field(default_factory=list)
    losses: dict[str, list[float]] = field(default_factory=dict)  # batch number -> [loss, images] of this epoch
    seconds: float = 0.0  # training seconds of this epoch so far
    finished: bool = False


@dataclass
class FitResult:
    out: Path
    epochs: list[dict]
    best: dict | None
    stopped: str  # "finished", "early stopping ...", "interrupted by SIGTERM"
    step: int
    train_images: int
    val_images: int
    skipped: dict[str, str]
    reconnects: int = 0
    interrupted: int = 0  # the signal's number, 0 when not interrupted
    position: dict = field(default_factory=dict)  # where a resume continues: epoch, batch, step
    published: ModelVersion | None = None
    files: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=str))


GONE = ("UNAVAILABLE", "CANCELLED")  # a server that stopped or restarts: the server itself never answers CANCELLED


class ServerWentAway(Exception):
    """A call failed with one of GONE: the run has to find its place again once the server answers."""


def write_json(path: Path, document: Any) -> None:
    """Whole or not at all: a temporary file beside it, then os.replace."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(document, indent=2, default=str) + "\n")
    os.replace(tmp, path)


class Stop(threading.Event):
    """Set by the first SIGINT or SIGTERM; `signum` says which."""
    signum: int = 0


@contextmanager
def stop_on_signals() -> Iterator[Stop]:
    """An event set by the first SIGINT or SIGTERM (the step in flight finishes); a second one raises
    KeyboardInterrupt (the step is abandoned). Handlers only in the main thread; the old ones come back after."""
    stop = Stop()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.signum = signum
        stop.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class Fit:
    def __init__(self, client: ViTClient, data: str | os.PathLike, out: str | os.PathLike, options: FitOptions,
                 on_epoch: Callable[[dict], None] | None = None) -> None:
        self.client, self.options, self.on_epoch = client, options, on_epoch
        self.out = Path(out)
        o = options
        if o.epochs < 1 or o.batch_size < 1:
            raise ValueError(f"epochs and batch size must be at least 1, got {o.epochs} and {o.batch_size}")
        if o.lr is not None and o.schedule is not None:
            raise ValueError("give a learning rate or a schedule, not both")
        self.info = client.model_info()
        if not self.info.trainer:
            raise ValueError(f"the server at {client.address} does not train (role {self.info.role}): fit needs a "
                             "trainer")
        if o.batch_size > self.info.max_batch_size:
            raise ValueError(f"batch size {o.batch_size} is over the server's maximum of {self.info.max_batch_size}")
        self.state = self._load_state(Path(data))
        train = read_dataset(data)
        if len(train.classes) < 2:
            raise DataError(f"{data} holds one class ('{train.classes[0]}'): fitting needs at least two")
        if o.val is not None:
            val = read_dataset(o.val)
        else:
            train, val = stratified_split(train, o.val_split, self.state.seed)
        self.train, self.val = train, val
        self.y_train, self.y_val = class_indices(train, self.info.class_names), class_indices(val, self.info.class_names)
        self.recipe = Recipe.of(self.info.preprocessing)
        self.skipped: dict[Path, str] = {}
        self.known: dict[int, int] = {}  # server step -> batches of the current epoch sent when it was reached
        self.anchor: dict = {}  # the position fit-last holds
        self.in_flight = -1
        self.reconnects = 0
        self.ahead: Batches | None = None  # the pass of the training files that an epoch is to start with

    # -- state -------------------------------------------------------------------------------------

    def _load_state(self, data: Path) -> FitState:
        path = self.out / STATE
        o = self.options
        if o.resume:
            if not path.exists():
                raise ValueError(f"nothing to resume in {self.out}: no {STATE} (start without --resume)")
            saved = FitState(**json.loads(path.read_text()))
            if saved.batch_size != o.batch_size:
                raise ValueError(f"{path} was written with batch size {saved.batch_size}, not {o.batch_size}: "
                                 "resume with the same batch size")
            return saved
        if path.exists() and not json.loads(path.read_text()).get("finished"):
            raise ValueError(f"{self.out} holds an unfinished fit ({STATE}): add --resume to continue it, "
                             "or choose another output folder")
        return FitState(data=str(data), seed=o.seed, batch_size=o.batch_size)

    def _save_state(self) -> None:
        write_json(self.out / STATE, asdict(self.state))

    def _checkpoint_last(self) -> None:
        info = self._call(self.client.save_checkpoint, LAST)
        if not self._place(info.step):
            self.state.step = info.step
        self.anchor = {k: getattr(self.state, k) for k in ("epoch", "batch", "step", "seconds")}
        self.anchor["losses"] = dict(self.state.losses)
        self._save_state()

    # -- the server --------------------------------------------------------------------------------

    def _call(self, method, *args, **kwargs):
        try:
            return method(*args, **kwargs)
        except ClientError as e:
            if e.code in GONE:
                raise ServerWentAway(e.details) from e
            raise

    def _wait_for_server(self) -> int:
        """The server's step once it answers again, waiting with backoff (up to retry_seconds)."""
        deadline, delay = time.monotonic() + self.options.retry_seconds, 0.25
        while True:
            try:
                return self.client.get_optimizer().step
            except ClientError as e:
                if e.code not in GONE or time.monotonic() > deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _place(self, step: int) -> bool:
        """Set the position from the server's step when this epoch's steps know it; False when they do not."""
        if step in self.known:
            self.state.batch = self.known[step]
        elif self.in_flight >= 0 and step == self.state.step + 1:  # the step in flight was applied
            self.state.batch = self.in_flight + 1
            self.known[step] = self.state.batch
        else:
            return False
        self.state.losses = {k: v for k, v in self.state.losses.items() if int(k) < self.state.batch}
        self.state.step = step
        self.in_flight = -1
        return True

    def _find_place(self) -> None:
        """After the server went away: the server's step, placed in this epoch, or else fit-last restored and its
        position."""
        step = self._wait_for_server()
        if self._place(step):
            return
        info = self.client.restore_checkpoint(LAST)
        for key in ("epoch", "batch", "step", "seconds"):
            setattr(self.state, key, self.anchor[key])
        self.state.losses = dict(self.anchor["losses"])
        self.known = {info.step: self.state.batch}
        self.in_flight = -1

    # -- the run -----------------------------------------------------------------------------------

    def run(self) -> FitResult:
        self.out.mkdir(parents=True, exist_ok=True)
        o, s = self.options, self.state
        s.finished = False
        common = dict(recipe=self.recipe, batch_size=o.batch_size, workers=o.workers, prefetch=o.prefetch,
                      strict=o.strict, cache_mb=o.cache_mb, skipped=self.skipped)
        stopped, signum = "finished", 0
        with stop_on_signals() as stop, \
                Loader([e.path for e in self.train.examples], self.y_train, augment=o.augment, seed=s.seed,
                       **common) as train, \
                Loader([e.path for e in self.val.examples], self.y_val, **common) as val:
            if s.epoch < o.epochs:  # its first batches decode while _start's calls (a checkpoint) run
                self.ahead = train.batches(self._order(s.epoch), s.batch, epoch=s.epoch)
            self._start()
            try:
                while s.epoch < o.epochs and not stop.is_set():
                    try:
                        if not self._epoch(train, val, stop):
                            break
                    except ServerWentAway:
                        self.reconnects += 1
                        self._find_place()
                        continue
                    if o.patience and s.since_best >= o.patience:
                        stopped = f"early stopping: no better validation accuracy for {o.patience} epochs"
                        break
            except KeyboardInterrupt:  # a second signal: the step in flight is abandoned
                stop.set()
            if stop.is_set() and s.epoch < o.epochs and not stopped.startswith("early"):
                signum = stop.signum or signal.SIGINT
                stopped = f"interrupted by {signal.Signals(signum).name}"
                self._checkpoint_last()
            else:
                s.finished = True
                self._save_state()
        published = self._publish() if o.publish and s.finished and s.best else None
        return FitResult(self.out, s.history, s.best, stopped, s.step, len(self.train), len(self.val),
                         {str(p): r for p, r in self.skipped.items()}, self.reconnects, signum,
                         {"epoch": s.epoch + 1, "batch": s.batch, "step": s.step}, published, self._write_outputs())

    def _start(self) -> None:
        o, s = self.options, self.state
        if o.resume:
            self.known = {s.step: s.batch}
            self.anchor = {k: getattr(s, k) for k in ("epoch", "batch", "step", "seconds")}
            self.anchor["losses"] = dict(s.losses)
            self.in_flight = -1
            self._find_place()
            return
        if o.lr is not None or o.schedule is not None:
            self.client.set_optimizer(learning_rate=o.lr, schedule=o.schedule)
        s.step = self.client.get_optimizer().step
        self.known = {s.step: 0}
        self._checkpoint_last()

    def _order(self, epoch: int) -> np.ndarray:
        """The order of the training files in `epoch`: seeded by (seed, epoch), so a resumed run sends the same."""
        return np.random.default_rng([self.state.seed, epoch]).permutation(len(self.train))

    def _pass(self, train: Loader) -> Batches:
        """The pass of the current epoch from the current batch: the one begun ahead when it starts there (after a
        reconnect or a resume the place may have moved), else a new one."""
        s, ahead, self.ahead = self.state, self.ahead, None
        if ahead is not None and (ahead.epoch, ahead.start) == (s.epoch, s.batch):
            return ahead
        if ahead is not None:
            ahead.close()
        return train.batches(self._order(s.epoch), s.batch, epoch=s.epoch)

    def _epoch(self, train: Loader, val: Loader, stop: threading.Event) -> bool:
        """Train the rest of the current epoch, then score it; False when a signal stopped it.

        Per batch it only keeps the position and running sums: the progress bar's loss is the sum of loss x images
        over the images, kept as two numbers (summing the epoch's losses again at every batch grows with the
        epoch), and the bar redraws at tqdm's own interval rather than at every batch."""
        o, s = self.options, self.state
        done = int(sum(v[1] for v in s.losses.values()))
        loss_sum, images = sum(loss * k for loss, k in s.losses.values()), done
        bar = tqdm(total=len(self.train), initial=done, desc=f"epoch {s.epoch + 1}/{o.epochs}", unit="img",
                   file=sys.stderr, dynamic_ncols=True, disable=None if o.progress is None else not o.progress)
        started = time.perf_counter()
        try:
            with self._pass(train) as batches:
                for batch in batches:
                    if stop.is_set():
                        return False
                    n = len(batch.images)
                    if not n:
                        s.batch = batch.number + 1
                        continue
                    self.in_flight = batch.number
                    result = self._call(self.client.train_step, batch.images, batch.labels, summaries=False)
                    self.in_flight = -1
                    s.batch, s.step = batch.number + 1, result.step
                    self.known[result.step] = s.batch
                    s.losses[str(batch.number)] = [result.loss, n]
                    loss_sum, images = loss_sum + result.loss * n, images + n
                    bar.set_postfix(loss=f"{loss_sum / images:.4f}", skipped=len(self.skipped),
                                    img_s=f"{(images - done) / (time.perf_counter() - started):.0f}", refresh=False)
                    bar.update(n)
            s.seconds += time.perf_counter() - started
            started = None
            loss, accuracy = self._validate(val)
            bar.set_postfix(loss=f"{self._train_loss():.4f}", val_acc=f"{accuracy:.1%}",
                            img_s=f"{self._trained_images() / max(s.seconds, 1e-9):.0f}")
        finally:
            if started is not None:
                s.seconds += time.perf_counter() - started
            bar.close()
        self._end_epoch(train, loss, accuracy)
        return True

    def _train_loss(self) -> float:
        n = self._trained_images()
        return sum(loss * k for loss, k in self.state.losses.values()) / n if n else float("nan")

    def _trained_images(self) -> int:
        return int(sum(k for _, k in self.state.losses.values()))

    def _validate(self, val: Loader) -> tuple[float, float]:
        loss_sum = correct = count = 0
        for batch in val.batches():
            if len(batch.images):
                r = self._call(self.client.eval_step, batch.images, batch.labels)
                loss_sum, correct, count = loss_sum + r.loss * r.count, correct + r.correct, count + r.count
        if not count:
            raise DataError(f"no validation image could be decoded ({len(self.skipped)} files skipped)")
        return loss_sum / count, correct / count

    def _end_epoch(self, train: Loader, val_loss: float, val_accuracy: float) -> None:
        o, s = self.options, self.state
        images = self._trained_images()
        record = {"epoch": s.epoch + 1, "step": s.step, "train_loss": self._train_loss(), "val_loss": val_loss,
                  "val_accuracy": val_accuracy, "images": images, "seconds": round(s.seconds, 3),
                  "images_per_s": images / s.seconds if s.seconds else 0.0, "skipped": len(self.skipped),
                  "best": False}
        better = s.best is None or val_accuracy > s.best["val_accuracy"]
        since_best = 0 if better else s.since_best + 1
        if s.epoch + 1 < o.epochs and not (o.patience and since_best >= o.patience):
            # the next epoch's first batches decode while the server writes this epoch's checkpoints
            self.ahead = train.batches(self._order(s.epoch + 1), 0, epoch=s.epoch + 1)
        if better:
            info = self._call(self.client.save_checkpoint, BEST)
            record["best"] = True
            s.best = {"epoch": s.epoch + 1, "step": info.step, "val_accuracy": val_accuracy, "val_loss": val_loss,
                      "checkpoint": BEST}
        s.since_best = since_best
        s.history.append(record)
        s.epoch, s.batch, s.losses, s.seconds = s.epoch + 1, 0, {}, 0.0
        self.known = {s.step: 0}
        self._checkpoint_last()
        write_json(self.out / METRICS, self._metrics())
        if self.on_epoch is not None:
            self.on_epoch(record)

    def _metrics(self) -> dict:
        return {"data": self.state.data, "seed": self.state.seed, "classes": self.train.classes,
                "train_images": len(self.train), "val_images": len(self.val), "epochs": self.state.history,
                "best": self.state.best, "skipped": {str(p): r for p, r in self.skipped.items()}}

    def _write_outputs(self) -> list[str]:
        files = [self.out / STATE]
        if self.state.history:
            from client.plots import fit_curve

            write_json(self.out / METRICS, self._metrics())
            files += [self.out / METRICS, fit_curve(self.state.history, self.out / CURVE)]
        return [str(f) for f in files]

    def _publish(self) -> ModelVersion:
        self.client.restore_checkpoint(BEST)
        return self.client.publish()


def fit(client: ViTClient, data: str | os.PathLike, out: str | os.PathLike = "fit-output",
        on_epoch: Callable[[dict], None] | None = None, **options: Any) -> FitResult:
    """Fine-tune on DATA (an ImageFolder or a CSV); `options` are FitOptions' fields."""
    return Fit(client, data, out, FitOptions(**options), on_epoch).run()
