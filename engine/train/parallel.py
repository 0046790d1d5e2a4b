"""Data-parallel training over MPI (`mpiexec --with-ft ulfm -n W vitserve-server --data-parallel`).

Rank 0 is the server: its DataPlane drives a `DataParallelEngine`, which offers what the DataPlane uses of a
`TrainingEngine` and wraps rank 0's own. Ranks >= 1 serve nothing: `run_worker` holds a TrainingEngine on the
same artifacts and answers rank 0's commands. Every rank holds the same weights, optimizer state and counters.

A TrainStep's batch is cut into one shard per rank (rank 0 sends each its shard). Each rank runs forward +
backward on its shard alone (`TrainingEngine.shard_gradients`) and scales its gradient by n_i / N; one
all-reduce (a sum) then gives every rank sum_i (n_i / N) g_i, the gradient of the mean loss over the whole
batch (the loss likewise), which each rank hands to `TrainingEngine.apply_gradients`: accumulation, the
non-finite guard, clipping, the learning rate and the optimizer update run on identical inputs everywhere.
EvalStep and HeadImportance are cut the same way. Every `checksum_every_steps` applied steps, and after every
restore, the ranks compare a sha256 of their weights; a difference is logged as CRITICAL and stops the job
(exit status DIVERGED).

Checkpoints are written by rank 0 alone; a restore sends the checkpoint's bytes to every rank (no shared
filesystem is assumed), as does the start, so every rank starts from the state rank 0 resumes from.

MPI calls are non-blocking requests polled with a timeout, never blocking collectives: with Open MPI's
fault tolerance (ULFM, `mpiexec --with-ft ulfm`) a rank that dies fails the pending requests within about a
second, a rank that hangs runs into the timeout. Either way the call fails with Unavailable, the log says
which rank, and training stays unavailable until the job is restarted (it resumes from the last checkpoint);
Predict goes on being served. mpi4py is imported by `join()` only, so nothing else needs MPI.
"""
from __future__ import annotations

import logging
import os
import pickle
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from engine.errors import ConfigError, Unavailable, VitServeError
from engine.train.step import TrainingEngine
from proto.records.training import EvalResult, HeadImportanceResult, OptimizerState, StepResult

log = logging.getLogger(__name__)

TIMEOUT = 120.0  # seconds a rank waits for another within one call (a step's compute on the slowest shard)
DIVERGED = 4  # exit status of the job when the ranks' weights differ
RANK_LOST = 5  # exit status of a rank whose peer died (rank 0: at shutdown; workers: at once)
BUSY_PAUSE, IDLE_PAUSE = 5e-4, 1e-2  # seconds between polls of a pending request (see Group._wait)
_LENGTH, _DATA = 1, 2  # message tags: an int64 length, then that many pickled bytes

_world: "Group | None" = None
_RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK")  # what mpiexec tells each process


def launched_rank() -> int:
    """This process's rank as mpiexec announced it in the environment (0 when not started by mpiexec), without
    importing MPI: a start-up error is printed by rank 0 alone."""
    for name in _RANK_VARIABLES:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def join(timeout: float = TIMEOUT) -> "Group":
    """This process's place in the MPI job (imports mpi4py, once). ConfigError when there is no usable job:
    mpi4py or MPI missing, a single rank, or Open MPI without its fault tolerance."""
    global _world
    if _world is not None:
        return _world
    try:
        from mpi4py import MPI
    except ImportError as e:  # mpi4py itself, or the MPI library it loads
        raise ConfigError(f"--data-parallel needs mpi4py and Open MPI ({e}): pip install -r requirements/mpi.txt "
                          "(or vitserve[mpi])") from None
    comm = MPI.COMM_WORLD
    if comm.Get_size() < 2:
        raise ConfigError("--data-parallel needs at least 2 ranks: start it as `mpiexec --with-ft ulfm -n W "
                          "vitserve-server --data-parallel ...` with W >= 2 (this process is alone)")
    library = MPI.Get_library_version()
    if library.startswith("Open MPI") and os.environ.get("OMPI_MCA_mpi_ft_enable", "") not in ("1", "true"):
        raise ConfigError("--data-parallel needs Open MPI's fault tolerance: start it as `mpiexec --with-ft ulfm "
                          "-n W ...` (without it a rank that dies takes every other rank down with it)")
    comm.Set_errhandler(MPI.ERRORS_RETURN)  # failures raise MPI.Exception (mpi4py's default; made explicit)
    _world = Group(MPI, comm, timeout)
    return _world


class Group:
    """The ranks of the job and the calls between them, each a non-blocking request polled with a timeout.

    A failed or timed-out call raises Unavailable naming the rank(s) when MPI knows them; the group is lost
    from then on (every later call raises the same Unavailable at once)."""

    def __init__(self, mpi, comm, timeout: float = TIMEOUT):
        self._mpi, self._comm, self.timeout = mpi, comm, timeout
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.lock = threading.RLock()  # one exchange at a time (rank 0's calls, and the stop at shutdown)
        self.lost = ""  # why the group is lost ("" while it is whole)

    # -- waiting ----------------------------------------------------------------------------------------

    def _wait(self, requests: list, what: str, peers: list[int], timeout: float | None) -> None:
        """Poll `requests` until all complete (timeout None: forever, for a worker waiting for work)."""
        if self.lost:
            raise Unavailable(self.lost)
        mpi = self._mpi
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        pause = 0.0
        while True:
            statuses = [mpi.Status() for _ in requests]
            try:
                if mpi.Request.Testall(requests, statuses):
                    return
            except mpi.Exception as e:
                codes = [s.Get_error() for s in statuses] if e.Get_error_class() == mpi.ERR_IN_STATUS else []
                reasons = sorted({mpi.Get_error_string(c).strip() for c in codes if c not in (mpi.SUCCESS,
                                                                                            mpi.ERR_PENDING)})
                self._lose(f"{self._ranks(self._failed_ranks() or peers)} failed "
                           f"({'; '.join(reasons) or e.Get_error_string().strip()}) during {what}")
            if deadline is not None and time.monotonic() > deadline:
                self._lose(f"{self._ranks(peers)} did not answer {what} within {timeout:g}s")
            time.sleep(pause)
            # Sleeps grow to 0.5 ms (a digits step is ~60 ms), and to 10 ms once a wait has lasted 50 ms (an idle
            # worker, between calls: ~1% of a core instead of ~6%).
            pause = min(2 * pause + 2e-5, IDLE_PAUSE if time.monotonic() - started > 0.05 else BUSY_PAUSE)

    def _failed_ranks(self) -> list[int]:
        """The ranks MPI knows to have died (ULFM's MPIX_Comm_get_failed), if it can tell."""
        try:
            failed = self._comm.Get_failed()
            return [r for r in self._mpi.Group.Translate_ranks(failed, list(range(failed.Get_size())),
                                                               self._comm.Get_group()) if r >= 0]
        except Exception:  # an MPI without ULFM: the caller names the peers it waited for
            return []

    def _ranks(self, ranks: list[int]) -> str:
        ranks = sorted(set(ranks))
        if not ranks:
            return "a data-parallel rank"
        return f"data-parallel rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"

    def _lose(self, what: str) -> None:
        """Mark the group lost, log it once, raise Unavailable."""
        if not self.lost:
            self.lost = (f"{what}: training is unavailable until the job is restarted (it resumes from the last "
                         "checkpoint)")
            log.error("rank %d: %s", self.rank, self.lost)
        raise Unavailable(self.lost)

    # -- messages ---------------------------------------------------------------------------------------

    def send(self, dest: int, obj, timeout: float | None = None) -> None:
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        length = np.array([len(data)], np.int64)
        requests = [self._comm.Isend(length, dest=dest, tag=_LENGTH), self._comm.Isend(data, dest=dest, tag=_DATA)]
        self._wait(requests, f"a message to rank {dest}", [dest], self.timeout if timeout is None else timeout)

    def receive(self, source: int, timeout: float | None = TIMEOUT):
        """The next object `source` sends (timeout None: wait as long as it takes)."""
        length = np.zeros(1, np.int64)
        what = f"a message from rank {source}"
        self._wait([self._comm.Irecv(length, source=source, tag=_LENGTH)], what, [source], timeout)
        data = bytearray(int(length[0]))
        self._wait([self._comm.Irecv(data, source=source, tag=_DATA)], what, [source], self.timeout)
        return pickle.loads(data)

    # -- collectives ------------------------------------------------------------------------------------

    def allreduce(self, *arrays: np.ndarray) -> None:
        """Sum each array over the ranks, in place (one request per array, polled together)."""
        requests = [self._comm.Iallreduce(self._mpi.IN_PLACE, a, op=self._mpi.SUM) for a in arrays]
        self._wait(requests, "the all-reduce", [], self.timeout)

    def allgather(self, data: bytes) -> list[bytes]:
        """Every rank's `data` (all of one length), by rank."""
        mine = np.frombuffer(data, np.uint8).copy()
        every = np.empty(self.size * len(mine), np.uint8)
        self._wait([self._comm.Iallgather(mine, every)], "the checksum exchange", [], self.timeout)
        return [every[r * len(mine):(r + 1) * len(mine)].tobytes() for r in range(self.size)]

    def abort(self, status: int) -> None:
        """End every rank of the job now, with this exit status."""
        self._comm.Abort(status)

    def stop_workers(self, status: int = 0) -> None:
        """Rank 0: tell every worker to exit with `status` (best effort: a lost rank is skipped quickly)."""
        with self.lock:
            for rank in range(1, self.size):
                try:
                    self.send(rank, ("stop", status), timeout=2.0)
                except Unavailable:
                    pass


# -------------------------------------------------------------------- the steps, alike on every rank

def _split(images: np.ndarray, labels: np.ndarray, size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """One shard per rank, as even as possible (the first ranks get one more; the last may get none)."""
    counts = [len(c) for c in np.array_split(np.arange(len(labels)), size)]
    bounds = np.concatenate([[0], np.cumsum(counts)])
    return [(images[a:b], labels[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def _failures(group: Group, error: BaseException | None, failed: np.ndarray, what: str) -> None:
    """After the all-reduce of the per-rank failure flags: this rank's own error, else an error naming the ranks
    that failed their part, so that every rank drops the call alike."""
    if error is not None:
        raise error
    ranks = [r for r in range(group.size) if failed[r]]
    if ranks:
        raise VitServeError(f"data-parallel rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} "
                            f"failed {what} (see {'their' if len(ranks) > 1 else 'its'} log); nothing was applied")


def _local(group: Group, what: str, compute):
    """compute() on this rank; an error is kept (reported to the others by a flag) instead of raised."""
    try:
        return compute(), None
    except Exception as e:  # every rank must still take part in the all-reduce
        if isinstance(e, VitServeError):
            log.debug("rank %d: %s refused: %s", group.rank, what, e)
        elif group.rank:
            log.exception("rank %d: %s failed", group.rank, what)
        return None, e


def _train(engine: TrainingEngine, group: Group, images: np.ndarray, labels: np.ndarray, total: int,
           accumulate_only: bool, head_importance: bool, summaries: bool, every: int, start: float | None = None,
           on_gradients=None) -> StepResult:
    share = np.float32(len(labels) / total)
    part, error = _local(group, "the train step", lambda: engine.shard_gradients(images, labels, head_importance))
    grads = part.gradients * share if part else np.zeros(engine.gradient_size, np.float32)
    small = np.zeros(1 + group.size)  # the weighted loss, then one failure flag per rank
    small[0] = part.loss * float(share) if part else 0.0
    small[1 + group.rank] = error is not None
    group.allreduce(grads, small)
    _failures(group, error, small[1:], "the train step")
    sums = _reduce_head_sums(group, part, float(share)) if head_importance else ()
    result = engine.apply_gradients(float(small[0]), grads, sums, summaries=summaries, accumulate_only=accumulate_only,
                                    start=start, on_gradients=on_gradients)
    if result.applied and every and result.step % every == 0:
        _compare_weights(engine, group, result.step)
    return result


def _reduce_head_sums(group: Group, part, share: float) -> tuple[np.ndarray, ...]:
    """Each attention module's signed head sums over the whole batch (weighted like the gradient)."""
    sizes = [len(s) for s in part.head_sums]
    flat = np.concatenate(part.head_sums) * share if sizes else np.zeros(0)
    group.allreduce(flat)
    return tuple(np.split(flat, np.cumsum(sizes)[:-1])) if sizes else ()


def _eval(engine: TrainingEngine, group: Group, images: np.ndarray, labels: np.ndarray, total: int) -> EvalResult:
    part, error = _local(group, "the eval step", lambda: engine.eval_step(images, labels) if len(labels) else None)
    small = np.zeros(2 + group.size)  # weighted loss, correct, failure flags
    if part is not None:
        small[0], small[1] = part.loss * len(labels) / total, part.correct
    small[2 + group.rank] = error is not None
    group.allreduce(small)
    _failures(group, error, small[2:], "the eval step")
    return EvalResult(float(small[0]), int(round(small[1])), total, engine.step)


def _heads(engine: TrainingEngine, group: Group, images: np.ndarray, labels: np.ndarray, total: int
           ) -> HeadImportanceResult:
    share = len(labels) / total
    part, error = _local(group, "head importance", lambda: engine.shard_gradients(images, labels, True))
    small = np.zeros(1 + group.size)
    small[0] = part.loss * share if part else 0.0
    small[1 + group.rank] = error is not None
    group.allreduce(small)
    _failures(group, error, small[1:], "head importance")
    return HeadImportanceResult(float(small[0]), engine.step, engine.head_scores(_reduce_head_sums(group, part, share)))


def _compare_weights(engine: TrainingEngine, group: Group, step: int, judge: bool = True) -> None:
    """Every rank's weight digest against rank 0's: CRITICAL and the job's end (rank 0 aborts it) on a difference.
    `judge` False: take part in the exchange only (a rank whose restore failed differs for a known reason)."""
    digests = group.allgather(engine.weights_digest())
    if not judge:
        return
    differ = [r for r in range(1, group.size) if digests[r] != digests[0]]
    if not differ:
        return
    ranks = f"rank{'s' if len(differ) > 1 else ''} {', '.join(map(str, differ))}"
    log.critical("data-parallel weights diverged at step %d: %s differ%s from rank 0 (sha256 %s on rank 0, %s on "
                 "rank %d); stopping the job (exit status %d): restart it, it resumes from the last checkpoint",
                 step, ranks, "" if len(differ) > 1 else "s", digests[0].hex()[:16], digests[differ[0]].hex()[:16],
                 differ[0], DIVERGED)
    if group.rank == 0:
        for handler in logging.getLogger().handlers:
            handler.flush()
        group.abort(DIVERGED)


def _restore_bytes(engine: TrainingEngine, data: bytes) -> int:
    """Restore a checkpoint from its bytes (written to a private temporary file: no shared filesystem)."""
    with tempfile.TemporaryDirectory(prefix="vitserve-rank-") as folder:
        path = Path(folder) / "checkpoint"
        path.write_bytes(data)
        return engine.restore_checkpoint(path)


# -------------------------------------------------------------------- rank 0

class DataParallelEngine:
    """Rank 0's training engine: what the DataPlane uses of TrainingEngine, run on every rank.

    Reads (step, learning rate, optimizer state) and writes that need no other rank (checkpoints, the inference
    export) use rank 0's engine, which holds the same state as every other rank; anything that changes the
    training state is applied on every rank.
    """

    def __init__(self, engine: TrainingEngine, checksum_every_steps: int = 10, group: Group | None = None):
        self._engine = engine
        self._group = group or join()
        self._every = checksum_every_steps
        with self.lock, self._group.lock:
            try:
                self._start()
            except Unavailable as e:
                raise ConfigError(f"the data-parallel job cannot start: {e}") from None

    def _start(self) -> None:
        """Check that every worker loaded the same artifacts, then bring it to rank 0's state."""
        group, files = self._group, self._engine.manifest.files
        pids = []
        for rank in range(1, group.size):
            hello = group.receive(rank)
            if hello["error"]:
                raise ConfigError(f"data-parallel rank {rank} cannot start: {hello['error']}")
            other = sorted(n for n in files.keys() | hello["files"].keys() if files.get(n) != hello["files"].get(n))
            if other:
                raise ConfigError(f"data-parallel rank {rank} loaded other artifacts than rank 0 ({', '.join(other)} "
                                  "differ): every rank must load the same export")
            pids.append(f"rank {rank} pid {hello['pid']}")
        with tempfile.TemporaryDirectory(prefix="vitserve-rank-") as folder:
            path = Path(folder) / "checkpoint"
            self._engine.save_checkpoint(path)
            self._sync(path.read_bytes(), self._engine.step)
        log.info("data-parallel training over %d ranks (rank 0 pid %d, %s) from step %d; weights compared every %s",
                 group.size, os.getpid(), ", ".join(pids), self._engine.step,
                 f"{self._every} applied steps" if self._every else "restore only")

    def _sync(self, data: bytes, step: int) -> None:
        """Every worker restores `data`; then the ranks compare weights."""
        group = self._group
        for rank in range(1, group.size):
            group.send(rank, ("restore", data))
        problems = [f"rank {r}: {e}" for r in range(1, group.size) if (e := group.receive(r))]
        _compare_weights(self._engine, group, step, judge=not problems)
        if problems:
            group._lose(f"the checkpoint could not be restored on {'; '.join(problems)}")

    def _command(self, command: str, shards: list | None = None, **args) -> None:
        """Send a command to every worker (with its own shard of the batch)."""
        for rank in range(1, self._group.size):
            payload = dict(args, images=shards[rank][0], labels=shards[rank][1]) if shards else args
            self._group.send(rank, (command, payload))

    # -- what the DataPlane uses ----------------------------------------------------------------------

    @property
    def lock(self) -> threading.RLock:
        return self._engine.lock

    @property
    def step(self) -> int:
        return self._engine.step

    @property
    def learning_rate(self) -> float:
        return self._engine.learning_rate

    @property
    def ranks(self) -> int:
        return self._group.size

    @property
    def trainer(self) -> str:
        return self._engine.trainer

    def optimizer_state(self) -> OptimizerState:
        return self._engine.optimizer_state()

    def parameter(self, name: str) -> np.ndarray:
        return self._engine.parameter(name)

    def parameters(self) -> dict[str, np.ndarray]:
        return self._engine.parameters()

    def save_checkpoint(self, path: Path) -> int:
        return self._engine.save_checkpoint(path)

    def export_inference_model(self, path: Path, output_name: str) -> int:
        return self._engine.export_inference_model(path, output_name)

    def train_step(self, images: np.ndarray, labels: np.ndarray, summaries: bool = True,
                   accumulate_only: bool = False, deadline: float | None = None, head_importance: bool = False,
                   on_gradients=None) -> StepResult:
        with self.lock, self._group.lock:
            self._engine.check_deadline(deadline)
            start = time.perf_counter()
            shards = _split(images, labels, self._group.size)
            self._command("train", shards, total=len(labels), accumulate_only=accumulate_only,
                          head_importance=head_importance)
            return _train(self._engine, self._group, *shards[0], len(labels), accumulate_only, head_importance,
                          summaries, self._every, start, on_gradients)

    def eval_step(self, images: np.ndarray, labels: np.ndarray) -> EvalResult:
        with self.lock, self._group.lock:
            shards = _split(images, labels, self._group.size)
            self._command("eval", shards, total=len(labels))
            return _eval(self._engine, self._group, *shards[0], len(labels))

    def head_importance(self, images: np.ndarray, labels: np.ndarray) -> HeadImportanceResult:
        with self.lock, self._group.lock:
            self._engine.check_not_accumulating("head importance")
            shards = _split(images, labels, self._group.size)
            self._command("heads", shards, total=len(labels))
            return _heads(self._engine, self._group, *shards[0], len(labels))

    def set_optimizer(self, learning_rate=None, schedule=None, clip_grad_norm=None) -> OptimizerState:
        with self.lock, self._group.lock:
            if self._group.lost:
                raise Unavailable(self._group.lost)
            state = self._engine.set_optimizer(learning_rate, schedule, clip_grad_norm)  # validates first
            self._command("set_optimizer", learning_rate=learning_rate, schedule=schedule,
                          clip_grad_norm=clip_grad_norm)
            return state

    def restore_checkpoint(self, path: Path | None) -> int:
        with self.lock, self._group.lock:
            if self._group.lost:
                raise Unavailable(self._group.lost)
            step = self._engine.restore_checkpoint(path)  # the trainer refuses a bad file before any rank changes
            with tempfile.TemporaryDirectory(prefix="vitserve-rank-") as folder:  # None: the export's, in any format
                copy = Path(folder) / "checkpoint"
                self._engine.save_checkpoint(copy)
                self._sync(copy.read_bytes(), step)
            return step


# -------------------------------------------------------------------- ranks >= 1

def run_worker(group: Group, engine: TrainingEngine | None, error: str = "", checksum_every_steps: int = 10) -> int:
    """A rank >= 1: report to rank 0 (`error`: why this rank has no engine), then run its commands until told
    to stop. Returns the exit status."""
    group.send(0, {"pid": os.getpid(), "error": error, "files": engine.manifest.files if engine else {}})
    log.info("data-parallel worker rank %d of %d (pid %d) %s", group.rank, group.size, os.getpid(),
             "could not start: " + error if error else "ready")
    while True:
        try:
            command, args = group.receive(0, timeout=None)
        except Unavailable:
            return RANK_LOST
        if command == "stop":
            log.info("data-parallel worker rank %d stops", group.rank)
            return args
        try:
            _run_command(group, engine, command, args, checksum_every_steps)
        except Unavailable:
            return RANK_LOST
        except VitServeError:  # refused alike on rank 0, which reports it
            pass
        except Exception:  # logged; rank 0 reports the call as failed, the next one may work
            log.exception("rank %d: %s failed", group.rank, command)


def _run_command(group: Group, engine: TrainingEngine, command: str, args: dict, every: int) -> None:
    if command == "train":
        _train(engine, group, args["images"], args["labels"], args["total"], args["accumulate_only"],
               args["head_importance"], summaries=False, every=every)
    elif command == "eval":
        _eval(engine, group, args["images"], args["labels"], args["total"])
    elif command == "heads":
        _heads(engine, group, args["images"], args["labels"], args["total"])
    elif command == "set_optimizer":
        engine.set_optimizer(**args)
    elif command == "restore":
        problem = ""
        try:
            step = _restore_bytes(engine, args)
        except Exception as e:  # reported to rank 0, which stops training
            problem = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            step = engine.step
        group.send(0, problem)
        _compare_weights(engine, group, step, judge=not problem)
    else:
        raise ValueError(f"unknown data-parallel command {command!r}")
