"""The training engine in a process of its own, so that a train step never stalls inference.

ONNX Runtime's training `Module.train_step` holds the GIL for the whole step: in one process every
Predict that arrives during a step waits for it (`make loadtest`: p50 19.6 ms and p99 56 ms beside a
training client, 0.86 ms without). `IsolatedTrainingEngine` has the TrainingEngine's interface and runs
the engine in a child process, forwarding each call over a pipe; the server thread that waits on the
pipe releases the GIL, so Predict, ModelInfer, health and metrics answer while a step runs.

* The child is started by multiprocessing's forkserver with the engine preloaded: a clean process (never
  a fork of a server that runs gRPC threads) that starts in ~0.1 s once the fork server is up.
* Batches, results and exceptions travel pickled (protocol 5: numpy arrays as raw buffers). An engine
  error raised in the child (InvalidArgument, DeadlineExceeded, ...) is raised again in the parent.
* One call at a time: the parent's lock (`lock`) is held for the whole call, as the engine's own is.
* The step and learning rate of the last answer are kept in the parent, so metrics never wait for a step.
* The child dies with the server (PR_SET_PDEATHSIG). If the child dies first, the call in flight and every
  later training call fail with UNAVAILABLE naming its exit status, and the server logs it; a restart
  resumes from the newest checkpoint.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import pickle
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np

from engine.errors import Unavailable
from engine.manifest import Manifest

log = logging.getLogger(__name__)
PRELOAD = ["engine.no_ortmodule_probe", "engine.train.step"]  # imported once by the fork server, inherited by every child


def _context() -> multiprocessing.context.BaseContext:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


@contextlib.contextmanager
def _main_left_alone():
    """Start the child without the main module: multiprocessing would re-run the main script there (as
    __mp_main__), which for the server means importing it twice and for a script that builds a DataPlane
    without an `if __name__ == "__main__":` guard means starting another server inside the child. The child
    needs nothing from it: its target and arguments live in engine/."""
    main = sys.modules["__main__"]
    saved = {key: main.__dict__[key] for key in ("__spec__", "__file__") if key in main.__dict__}
    main.__spec__ = None
    main.__dict__.pop("__file__", None)
    try:
        yield
    finally:
        main.__dict__.pop("__spec__", None)
        main.__dict__.update(saved)


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the pipe's EOF still ends the child after its call
        pass


def _portable(error: BaseException) -> BaseException:
    """The exception itself when it survives pickling, else a RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - e.g. a pybind exception type without a picklable constructor
        return RuntimeError(f"{type(error).__name__}: {error}")


def _serve(conn, manifest: Manifest, device: str, threads: int, learning_rate: float,
           checkpoint: Path | None, trainer: str) -> None:
    """The child: build the engine, then answer (method, args, kwargs) until the pipe closes."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the server, which shuts the child down
    from engine.runtime import quiet_default_logger, session_options
    from engine.train.step import TrainingEngine

    quiet_default_logger()
    try:
        engine = TrainingEngine(manifest, device, session_options(threads, training=True), learning_rate,
                                checkpoint=checkpoint, trainer=trainer)
    except BaseException as e:  # noqa: BLE001 - the parent raises it from its constructor
        conn.send((False, _portable(e), (0, 0.0)))
        return
    conn.send((True, None, (engine.step, engine.learning_rate)))
    while True:
        try:
            method, args, kwargs = conn.recv()
        except (EOFError, OSError):
            return
        if method == "close":
            conn.send((True, None, (engine.step, engine.learning_rate)))
            return
        try:
            if method == "train_step" and kwargs.pop("want_gradients", False):
                sent = {}
                kwargs["on_gradients"] = lambda step, views: sent.update(
                    step=step, views={n: np.array(g) for n, g in views.items()})
                value = (getattr(engine, method)(*args, **kwargs), sent)
            else:
                value = getattr(engine, method)(*args, **kwargs)
            answer = (True, value, (engine.step, engine.learning_rate))
        except BaseException as e:  # noqa: BLE001 - every error goes back to the caller
            answer = (False, _portable(e), (engine.step, engine.learning_rate))
        conn.send(answer)


class IsolatedTrainingEngine:
    """A TrainingEngine in a child process; the same methods, answered over a pipe."""

    def __init__(self, manifest: Manifest, device: str, threads: int, learning_rate: float,
                 checkpoint: Path | None = None, trainer: str = "ort"):
        ctx = _context()
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=_serve, name="vitserve-training", daemon=True,
                                    args=(child, manifest, device, threads, learning_rate, checkpoint, trainer))
        with _main_left_alone():
            self._process.start()
        child.close()
        self._lock = threading.RLock()
        self._dead = ""
        self._step, self._learning_rate = 0, 0.0
        try:
            ok, error, state = self._receive("starting")
        except Unavailable:
            self._process.join(5)
            raise
        if not ok:
            self._process.join(5)
            raise error
        self._step, self._learning_rate = state
        self.trainer = trainer
        log.info("training engine in process %d", self._process.pid)

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def lock(self) -> threading.RLock:
        """Held for every call; hold it to make several calls atomic (as TrainingEngine.lock)."""
        return self._lock

    @property
    def step(self) -> int:
        return self._step

    @property
    def learning_rate(self) -> float:
        return self._learning_rate

    def _receive(self, what: str):
        try:
            return self._conn.recv()
        except (EOFError, OSError):
            self._process.join(1)
            code = self._process.exitcode
            status = f"killed by signal {-code}" if code is not None and code < 0 else f"exit status {code}"
            self._dead = (f"the training process {self._process.pid} died ({status}) during {what}; restart the "
                          "server: it resumes from the newest checkpoint")
            log.error("%s", self._dead)
            raise Unavailable(self._dead) from None

    def _call(self, method: str, *args, **kwargs) -> Any:
        with self._lock:
            if self._dead:
                raise Unavailable(self._dead)
            try:
                self._conn.send((method, args, kwargs))
            except (BrokenPipeError, OSError):
                return self._receive(method.replace("_", " "))  # raises Unavailable with the exit status
            ok, value, (self._step, self._learning_rate) = self._receive(method.replace("_", " "))
        if not ok:
            raise value
        return value

    def train_step(self, images: np.ndarray, labels: np.ndarray, summaries: bool = True,
                   accumulate_only: bool = False, deadline: float | None = None, head_importance: bool = False,
                   on_gradients: Callable[[int, dict[str, np.ndarray]], None] | None = None):
        if on_gradients is None:
            return self._call("train_step", images, labels, summaries=summaries, accumulate_only=accumulate_only,
                              deadline=deadline, head_importance=head_importance)
        result, sent = self._call("train_step", images, labels, summaries=summaries,
                                  accumulate_only=accumulate_only, deadline=deadline,
                                  head_importance=head_importance, want_gradients=True)
        if sent:
            on_gradients(sent["step"], sent["views"])
        return result

    def eval_step(self, images: np.ndarray, labels: np.ndarray):
        return self._call("eval_step", images, labels)

    def head_importance(self, images: np.ndarray, labels: np.ndarray):
        return self._call("head_importance", images, labels)

    def gradients(self, images: np.ndarray, labels: np.ndarray):
        return self._call("gradients", images, labels)

    def optimizer_state(self):
        return self._call("optimizer_state")

    def set_optimizer(self, learning_rate=None, schedule=None, clip_grad_norm=None):
        return self._call("set_optimizer", learning_rate, schedule, clip_grad_norm)

    def save_checkpoint(self, path: Path) -> int:
        return self._call("save_checkpoint", path)

    def restore_checkpoint(self, path: Path | None) -> int:
        return self._call("restore_checkpoint", path)

    def export_inference_model(self, path: Path, output_name: str) -> int:
        return self._call("export_inference_model", path, output_name)

    def parameter(self, name: str) -> np.ndarray:
        return self._call("parameter", name)

    def parameters(self) -> dict[str, np.ndarray]:
        return self._call("parameters")

    def close(self) -> None:
        """Stop the child (after the call in flight). Idempotent."""
        with self._lock:
            if not self._dead and self._process.is_alive():
                try:
                    self._conn.send(("close", (), {}))
                    self._conn.recv()
                except (EOFError, OSError):
                    pass
            self._dead = self._dead or "the training engine was closed (the server is shutting down)"
            self._process.join(10)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()
            self._conn.close()
