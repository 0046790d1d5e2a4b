"""The trainer's durable state: its checkpoints, resuming from them, the autosave timer, and write failures.

A checkpoint is written atomically and verified when read (engine/store/files.py). At startup the training engine
resumes from the newest checkpoint that verifies and loads; one that does not is quarantined with a WARNING
naming it, and the next older one is tried. A checkpoint is written after every N applied steps
(--checkpoint-every-steps), every T seconds while the state changed (--checkpoint-every-seconds), on
request, and at shutdown when anything changed since the last one.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import threading
import time
from pathlib import Path

from engine.errors import ConfigError, FailedPrecondition, InvalidArgument, ResourceExhausted
from engine.train.isolation import IsolatedTrainingEngine
from engine.manifest import TRAINER_FILES, Manifest
from engine.runtime import session_options
from engine.store.files import CheckpointStore, check_writable, describe_os_error, os_errno
from proto.records.training import CheckpointInfo, CheckpointList
from engine.train.step import TrainingEngine
from server.config import Settings

log = logging.getLogger(__name__)

CHECKPOINT_FOLDERS = {"ort": "checkpoints", "ort-training": "checkpoints-ort-training"}  # under <data-dir>/<model>/


@contextlib.contextmanager
def write_errors(what: str, folder: Path):
    """OS (and ONNX Runtime) write failures as statuses naming the folder: a full disk is RESOURCE_EXHAUSTED,
    anything else (read-only, permissions, I/O errors) FAILED_PRECONDITION. The store left no partial entry."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        reason = describe_os_error(e)
        full = os_errno(e) in (errno.ENOSPC, errno.EDQUOT)
        message = f"{what} could not be written to {folder}: {reason}"
        if full:
            raise ResourceExhausted(f"{message} (the disk is full)") from None
        raise FailedPrecondition(message) from None


class Checkpoints:
    def __init__(self, settings: Settings, manifest: Manifest, folder: Path):
        self.settings, self.manifest = settings, manifest
        checkpoints = CHECKPOINT_FOLDERS[settings.trainer]  # the two trainers' checkpoints differ in format
        for sub in (checkpoints, "models", "quarantine"):  # every folder the server writes, checked up front
            check_writable(folder / sub)
        trainer_files = TRAINER_FILES[settings.trainer]  # the trainer's own graph names its checkpoints
        self.store = CheckpointStore(folder / checkpoints, manifest.files[trainer_files[0]],
                                     settings.keep_checkpoints, quarantine=folder / "quarantine" / checkpoints)
        self._lock = threading.Lock()
        self._dirty = False  # training state changed since the last checkpoint
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._autosave: threading.Thread | None = None

    # -- opening ----------------------------------------------------------------------------------------

    def open_engine(self):
        """A training engine on the newest checkpoint that verifies and loads, else on the export's weights; on
        rank 0 of an MPI job (--data-parallel) wrapped in engine/train/parallel.py's DataParallelEngine."""
        engine, resumed = self._resume()
        if resumed:
            log.info("resumed from checkpoint %s (step %d)", resumed.name, resumed.step)
        if self.settings.data_parallel:
            from engine.train.parallel import DataParallelEngine

            engine = DataParallelEngine(engine, self.settings.checksum_every_steps)
        return engine

    def _resume(self):
        try:
            for info, path in self.store.resume_candidates():
                try:
                    return self._engine(path), info
                except RuntimeError as e:
                    if "checkpoint" not in str(e).lower():
                        raise
                    self.store.quarantine(info.name, f"ONNX Runtime cannot load it ({describe_os_error(e)})")
        except InvalidArgument as e:
            raise ConfigError(f"{e}: use another --data-dir for these artifacts") from None
        return self._engine(None), None

    def _engine(self, checkpoint: Path | None) -> TrainingEngine | IsolatedTrainingEngine:
        """The training engine: in a child process (--train-isolation process, the default), else in this one."""
        s = self.settings
        if s.train_isolation == "process" and not s.data_parallel:
            return IsolatedTrainingEngine(self.manifest, s.trainer_device, s.training_threads, s.learning_rate,
                                          checkpoint=checkpoint, trainer=s.trainer)
        return TrainingEngine(self.manifest, s.trainer_device, session_options(s.training_threads, training=True),
                              s.learning_rate, checkpoint=checkpoint, trainer=s.trainer)

    # -- writing ----------------------------------------------------------------------------------------

    def changed(self) -> None:
        """The training state changed: the next autosave tick or shutdown writes a checkpoint."""
        self._dirty = True

    def save(self, engine, name: str = "", reason: str = "manual") -> CheckpointInfo:
        """Atomically write the training state. Empty name: manual-<step> or step-<step> (automatic)."""
        with self._lock, engine.lock:  # no step between naming and writing
            step = engine.step
            name = name or (f"manual-{step:08d}" if reason == "manual" else f"step-{step:08d}")
            with write_errors(f"checkpoint {name!r}", self.store.root):
                info = self.store.save(name, reason, engine.save_checkpoint)
            self._dirty, self._last = False, time.monotonic()
        log.info("checkpoint %s written (step %d, %s)", info.name, info.step, reason)
        return info

    def after_step(self, engine, step: int) -> None:
        """The checkpoint after an applied step. With checkpoint_every_steps 1 a step is acknowledged only once it
        is durable: when its checkpoint cannot be written the step is rolled back to the previous checkpoint (the
        state before the call) and the call fails. With N > 1 the failure is logged and the step stays applied
        (the steps since the last checkpoint were never durable); the next checkpoint tries again."""
        try:
            self.save(engine, "", reason="auto")
        except (ResourceExhausted, FailedPrecondition) as e:
            if self.settings.checkpoint_every_steps != 1:
                log.error("automatic checkpoint after step %d failed: %s", step, e)
                return
            previous = next((c for c in reversed(self.store.list()) if c.step == step - 1 and not c.problem), None)
            with self._lock:
                engine.restore_checkpoint(self.store.path(previous) if previous else None)
            log.error("step %d rolled back to step %d: its checkpoint could not be written (%s)", step, step - 1, e)
            raise type(e)(f"{e}; the step was rolled back (weights, optimizer state and step as before the call)") \
                from None

    def list(self) -> CheckpointList:
        return CheckpointList(self.store.list())

    def restore(self, engine, name: str) -> CheckpointInfo:
        with self._lock:
            info = self.store.get(name)
            path = self.store.path(info)  # FailedPrecondition when damaged: nothing changes
            try:
                engine.restore_checkpoint(path)
            except RuntimeError as e:  # ORT refused the file before touching the state
                raise FailedPrecondition(f"checkpoint {name!r} cannot be loaded by ONNX Runtime "
                                         f"({describe_os_error(e)}); nothing was restored") from None
            self._dirty = True  # a restart must resume from this state, not from a newer checkpoint
        log.info("restored checkpoint %s (step %d)", info.name, info.step)
        return info

    # -- the timer and shutdown -------------------------------------------------------------------------

    def start_autosave(self, engine) -> None:
        every = self.settings.checkpoint_every_seconds
        if every <= 0:
            return

        def loop() -> None:
            while not self._stop.wait(min(every, 1.0)):
                if self._dirty and time.monotonic() - self._last >= every:
                    try:
                        self.save(engine, "", reason="auto")
                    except Exception:  # keep the timer alive; the next tick tries again
                        log.exception("automatic checkpoint failed")

        self._autosave = threading.Thread(target=loop, name="vitserve-autosave", daemon=True)
        self._autosave.start()

    def close(self, engine) -> CheckpointInfo | None:
        """Stop the timer; the final checkpoint when the state changed since the last one."""
        self._stop.set()
        if self._autosave:
            self._autosave.join()
        return self.save(engine, "", reason="shutdown") if self._dirty else None
