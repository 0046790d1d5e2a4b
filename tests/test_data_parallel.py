"""Data-parallel training over MPI with real processes: `mpiexec --with-ft ulfm -n 2 python -m server --data-parallel`
against one `python -m server` on the same export (same seed, one ONNX Runtime thread per rank).

- parity: loss, every gradient summary, clipping, accumulation, an empty shard, eval and head importance of the
  2-rank job equal one process's on the same global batches, and the weights after 3 AdamW steps agree to 1e-5;
- checkpoints: each server restores the other's checkpoint (RestoreCheckpoint) with identical weights, and the
  2-rank job then trains exactly like the single process, every rank included;
- a SIGKILLed rank 1 makes the next TrainStep fail with UNAVAILABLE within seconds, the job exits with RANK_LOST
  on its graceful stop, and a restart resumes from the last checkpoint;
- divergence: rank 1's weights are corrupted in its memory from outside (/proc/PID/mem, as a memory fault would),
  and the next weight comparison logs CRITICAL naming the ranks and the step and ends the job with DIVERGED;
- bad setups are one `error:` line and exit status 2.
"""
from __future__ import annotations

import concurrent.futures
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from engine.errors import ConfigError
from engine.manifest import Manifest
from engine.train.parallel import DIVERGED, RANK_LOST
from engine.runtime import session_options
from engine.train.step import TrainingEngine
from proto import vitserve_pb2 as pb
from proto import vitserve_pb2_grpc
from server.__main__ import join_job
from server.config import Settings
from server.persistence import CHECKPOINT_FOLDERS
from tests.helpers import (
    TRAINERS,
    MODEL,
    STOP_TIMEOUT,
    Server,
    assert_one_error_line,
    batch,
    clean_env,
    images_msg,
    run_server_to_exit,
    start_server,
    tensor,
)

pytestmark = pytest.mark.e2e  # MPI jobs

MPIEXEC = Path(sys.executable).parent / "mpiexec"  # Open MPI's, installed by requirements/mpi.txt
JOB = [str(MPIEXEC), "--with-ft", "ulfm", "-n", "2", sys.executable, "-m", "server", "--data-parallel"]
SETTINGS = ("--learning-rate", "1e-3", "--intra-op-threads", "1", "--max-batch-size", "32", "--port", "0")
WORKER = re.compile(r"data-parallel worker rank 1 of 2 \(pid (\d+)\) ready")
CALL = 30.0  # seconds for one RPC


def job_env(data_dir: Path | None = None, **extra: str) -> dict[str, str]:
    """clean_env for a job (Open MPI refuses to run as root unless told it may: these machines run tests as root)."""
    env = clean_env(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", **extra)
    if data_dir is not None:
        env["VITSERVE_DATA_DIR"] = str(data_dir)
    return env


def start_job(artifacts: Path, *args: str, env: dict[str, str]) -> Server:
    return start_server("--artifacts", str(artifacts), *SETTINGS, *args, env=env, command=JOB)


def start_single(artifacts: Path, *args: str, env: dict[str, str]) -> Server:
    return start_server("--artifacts", str(artifacts), *SETTINGS, *args, env=env)


def stop_job(job: Server, status: int = 0) -> str:
    """SIGUSR1 to mpiexec (forwarded to every rank; SIGTERM would make Open MPI kill them): rank 0 stops gracefully
    and the job must exit with `status`. Returns the job's stderr."""
    if job.proc.poll() is None:
        job.proc.send_signal(signal.SIGUSR1)
    try:
        code = job.proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        kill(job)
        pytest.fail(f"the job did not exit within {STOP_TIMEOUT:g}s of SIGUSR1; stderr:\n{job.stderr()}")
    text = job.stderr()
    assert code == status, f"the job exited with {code}, not {status}; stderr:\n{text}"
    return text


def kill(server: Server) -> None:
    """Tear-down: SIGTERM (mpiexec then ends every rank), SIGKILL if that does not do it."""
    if server.proc.poll() is None:
        server.proc.terminate()
        try:
            server.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()


def stub(server: Server) -> vitserve_pb2_grpc.VitServeStub:
    return vitserve_pb2_grpc.VitServeStub(grpc.insecure_channel(server.address))


def train(s, n: int, seed: int, **options) -> pb.TrainStepResponse:
    images, labels = batch(n, seed)
    return s.TrainStep(pb.TrainStepRequest(images=images_msg(images), labels=tensor(labels), **options), timeout=CALL)


def checkpoint_weights(artifacts: Path, data_dir: Path, name: str, trainer: str) -> dict[str, np.ndarray]:
    """The trainable weights a checkpoint holds, read by the trainer that wrote it, in this process."""
    manifest = Manifest.load(artifacts)
    engine = TrainingEngine(manifest, "cpu", session_options(1, training=True), 1e-3, trainer=trainer,
                            checkpoint=data_dir / MODEL / CHECKPOINT_FOLDERS[trainer] / name / "checkpoint")
    return {n: engine.parameter(n) for n in manifest.trainable}


def close(a: float, b: float, scale: float, rel: float = 1e-4) -> bool:
    """float32 agreement: relative, plus an absolute floor at the scale of the quantity (a mean near 0)."""
    return math.isclose(a, b, rel_tol=rel, abs_tol=rel * scale)


def assert_same_step(ranks: pb.TrainStepResponse, single: pb.TrainStepResponse) -> None:
    """Two TrainStep answers agree to float32 accuracy: loss, norm, counters and every gradient summary."""
    assert (ranks.step, ranks.applied, ranks.accumulated_batches, ranks.skipped_reason) == \
        (single.step, single.applied, single.accumulated_batches, single.skipped_reason)
    assert close(ranks.loss, single.loss, 1.0, 1e-5), (ranks.loss, single.loss)
    assert close(ranks.grad_norm, single.grad_norm, single.grad_norm), (ranks.grad_norm, single.grad_norm)
    assert close(ranks.clip_coefficient, single.clip_coefficient, 1.0), (ranks.clip_coefficient, single.clip_coefficient)
    assert close(ranks.learning_rate, single.learning_rate, 0.0, 1e-12)
    assert [g.name for g in ranks.gradients] == [g.name for g in single.gradients] and single.gradients
    for r, s in zip(ranks.gradients, single.gradients):
        for field in ("l2_norm", "mean", "std", "min", "max", "max_abs"):
            assert close(getattr(r, field), getattr(s, field), s.max_abs), (s.name, field, getattr(r, field),
                                                                          getattr(s, field))
        assert close(r.param_norm, s.param_norm, s.param_norm), (s.name, r.param_norm, s.param_norm)
        assert close(r.update_ratio, s.update_ratio, s.update_ratio, 1e-3), (s.name, r.update_ratio, s.update_ratio)
        assert abs(r.zero_fraction - s.zero_fraction) <= 1e-3 and r.nonfinite_count == s.nonfinite_count == 0
    assert_same_heads(ranks.head_importance, single.head_importance)


def assert_same_heads(ranks, single) -> None:
    assert [(h.block, h.module) for h in ranks] == [(h.block, h.module) for h in single]
    for r, s in zip(ranks, single):
        scale = max(s.importance)
        assert all(close(x, y, scale) for x, y in zip(r.importance, s.importance)), (s.module, r.importance,
                                                                                   s.importance)


@pytest.fixture(scope="module", params=TRAINERS)
def trainer(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def pair(exported, tmp_path_factory, trainer):
    """(2-rank job, single process, their data dirs): same export and settings, both saved at step 0."""
    artifacts = exported[0]
    dirs = tmp_path_factory.mktemp("ranks-data"), tmp_path_factory.mktemp("single-data")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # start both at once: the 2-core machine waits less
        job = pool.submit(start_job, artifacts, "--checksum-every-steps", "1",
                          env=job_env(dirs[0], VITSERVE_TRAINER=trainer))
        single = pool.submit(start_single, artifacts, env=job_env(dirs[1], VITSERVE_TRAINER=trainer))
        servers = job.result(), single.result()
    stub(servers[0]).SaveCheckpoint(pb.SaveCheckpointRequest(name="ranks-start"), timeout=CALL)
    stub(servers[1]).SaveCheckpoint(pb.SaveCheckpointRequest(name="single-start"), timeout=CALL)
    yield servers, dirs
    for server in servers:
        kill(server)


def test_two_ranks_train_like_one_process(pair, exported, trainer):
    (job, single), dirs = pair
    a, b = stub(job), stub(single)
    for s in (a, b):  # on every rank: the threshold must clip these steps (their norms are about 3)
        s.SetOptimizer(pb.SetOptimizerRequest(clip_grad_norm=1.0), timeout=CALL)
    steps = [{"n": 5, "seed": 1, "accumulate_only": True},  # shards of 3 and 2, summed, not applied
             {"n": 7, "seed": 2},  # shards of 4 and 3, added to the accumulated sum, clipped, applied
             {"n": 1, "seed": 3},  # rank 1's shard is empty
             {"n": 8, "seed": 4, "head_importance": True}]
    for options in steps:
        ranks, one = train(a, **options), train(b, **options)
        assert_same_step(ranks, one)
    assert (ranks.step, ranks.applied) == (3, True) and 0 < ranks.clip_coefficient < 1
    assert ranks.head_importance and len(ranks.head_importance[0].importance) == 4

    images, labels = batch(9, 5)
    request = pb.EvalStepRequest(images=images_msg(images), labels=tensor(labels))
    ranks, one = a.EvalStep(request, timeout=CALL), b.EvalStep(request, timeout=CALL)
    assert (ranks.correct, ranks.count, ranks.step) == (one.correct, 9, 3) and close(ranks.loss, one.loss, 1.0, 1e-5)
    images, labels = batch(6, 6)
    request = pb.HeadImportanceRequest(images=images_msg(images), labels=tensor(labels))
    ranks, one = a.HeadImportance(request, timeout=CALL), b.HeadImportance(request, timeout=CALL)
    assert close(ranks.loss, one.loss, 1.0, 1e-5) and ranks.step == 3
    assert_same_heads(ranks.heads, one.heads)

    a.SaveCheckpoint(pb.SaveCheckpointRequest(name="ranks-3"), timeout=CALL)
    b.SaveCheckpoint(pb.SaveCheckpointRequest(name="single-3"), timeout=CALL)
    mine, theirs = (checkpoint_weights(exported[0], d, n, trainer) for d, n in zip(dirs, ("ranks-3", "single-3")))
    start = checkpoint_weights(exported[0], dirs[1], "single-start", trainer)
    for name, w in theirs.items():
        assert np.linalg.norm(mine[name] - w) <= 1e-5 * np.linalg.norm(w), name
    assert any(not np.array_equal(w, start[n]) for n, w in theirs.items())  # the steps moved the weights


def test_each_restores_the_other_ones_checkpoint(pair, exported, trainer):
    (job, single), (ranks_dir, single_dir) = pair
    a, b = stub(job), stub(single)
    def checkpoints(data_dir: Path) -> Path:
        return data_dir / MODEL / CHECKPOINT_FOLDERS[trainer]

    shutil.copytree(checkpoints(ranks_dir) / "ranks-start", checkpoints(single_dir) / "ranks-start")
    shutil.copytree(checkpoints(single_dir) / "single-start", checkpoints(ranks_dir) / "single-start")
    train(a, 8, 20), train(b, 8, 20)  # both move away from step 0 first

    assert a.RestoreCheckpoint(pb.RestoreCheckpointRequest(name="single-start"), timeout=CALL).step == 0
    assert b.RestoreCheckpoint(pb.RestoreCheckpointRequest(name="ranks-start"), timeout=CALL).step == 0
    a.SaveCheckpoint(pb.SaveCheckpointRequest(name="ranks-restored"), timeout=CALL)
    b.SaveCheckpoint(pb.SaveCheckpointRequest(name="single-restored"), timeout=CALL)
    for restored, source in (((ranks_dir, "ranks-restored"), (single_dir, "single-start")),
                             ((single_dir, "single-restored"), (ranks_dir, "ranks-start"))):
        got, want = checkpoint_weights(exported[0], *restored, trainer), checkpoint_weights(exported[0], *source, trainer)
        assert all(np.array_equal(got[n], w) for n, w in want.items()), (restored, source)

    # Rank 1 computes half of every gradient and compares its weights after every step (--checksum-every-steps 1):
    # the job trains like the single process from the restored state only if rank 1 restored it too.
    for seed in (21, 22):
        assert_same_step(train(a, 8, seed), train(b, 8, seed))
    assert a.GetOptimizer(pb.GetOptimizerRequest(), timeout=CALL).step == 2


def worker_pid(job: Server, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while not (found := WORKER.search(job.stderr())):
        assert time.monotonic() < deadline, f"no worker line in the job's log:\n{job.stderr()}"
        time.sleep(0.05)
    return int(found[1])


def test_a_killed_rank_makes_training_unavailable_and_a_restart_resumes(exported, tmp_path):
    artifacts, env = exported[0], job_env(tmp_path / "data")
    job = start_job(artifacts, "--checkpoint-every-steps", "1", env=env)
    try:
        s = stub(job)
        assert train(s, 8, 1).step == 1  # and its checkpoint step-00000001
        os.kill(worker_pid(job), signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as failed:
            train(s, 8, 2)
        assert time.monotonic() - started < 15.0  # Open MPI's fault tolerance tells rank 0 within about a second
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        message = failed.value.details()
        assert message.startswith("data-parallel rank 1 failed (MPI_ERR_PROC_FAILED"), message
        assert message.endswith(": training is unavailable until the job is restarted (it resumes from the last "
                                "checkpoint)"), message
        with pytest.raises(grpc.RpcError) as again:  # and every later training call, at once
            s.SetOptimizer(pb.SetOptimizerRequest(learning_rate=1e-2), timeout=CALL)
        assert (again.value.code(), again.value.details()) == (grpc.StatusCode.UNAVAILABLE, message)
        images, _ = batch(2, 3)
        assert len(s.Predict(pb.PredictRequest(images=images_msg(images)), timeout=CALL).predictions) == 2
        log = stop_job(job, RANK_LOST)
        assert f"ERROR engine.train.parallel: rank 0: {message}" in log
    finally:
        kill(job)

    job = start_job(artifacts, env=env)  # the restart: every rank from the last checkpoint
    try:
        assert train(stub(job), 8, 2).step == 2
        assert "resumed from checkpoint step-00000001 (step 1)" in stop_job(job)
    finally:
        kill(job)


def corrupt(pid: int, value: np.ndarray) -> int:
    """Negate every copy of `value`'s bytes in the writable memory of process `pid`; returns how many."""
    pattern, replacement, hits = value.tobytes(), (-value).tobytes(), 0
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "r+b", buffering=0) as mem:
        for line in maps:
            span, perms = line.split()[:2]
            if not perms.startswith("rw"):
                continue
            start, end = (int(x, 16) for x in span.split("-"))
            try:
                mem.seek(start)
                data = mem.read(end - start)
            except OSError:  # e.g. [vvar]
                continue
            at = data.find(pattern)
            while at >= 0:
                mem.seek(start + at)
                mem.write(replacement)
                hits += 1
                at = data.find(pattern, at + 1)
    return hits


def test_diverged_weights_stop_the_job(exported, tmp_path):
    """No code path makes ranks differ, so the test plays a memory fault: rank 1's copy of one weight matrix is
    negated from outside, through /proc/PID/mem. The next comparison (every step here) must catch it."""
    artifacts = exported[0]
    manifest = Manifest.load(artifacts)
    name = next(p.name for p in manifest.parameters if p.name in manifest.trainable and np.prod(p.shape) >= 1024)
    value = TrainingEngine(manifest, "cpu", session_options(1, training=True), 1e-3).parameter(name)
    job = start_job(artifacts, "--checksum-every-steps", "1", env=job_env(tmp_path / "data"))
    try:
        assert corrupt(worker_pid(job), value) >= 1  # every rank holds the export's weights (compared at the start)
        with pytest.raises(grpc.RpcError):  # the job ends while it answers
            train(stub(job), 4, 1)
        try:
            code = job.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the job did not end after diverging; stderr:\n{job.stderr()}")
        log = job.stderr()
        assert code == DIVERGED, log
        assert re.search(r"CRITICAL engine\.train\.parallel: data-parallel weights diverged at step 1: rank 1 differs from "
                         r"rank 0 \(sha256 [0-9a-f]{16} on rank 0, [0-9a-f]{16} on rank 1\); stopping the job", log), log
    finally:
        kill(job)


def test_bad_setups_are_one_error_line(exported):
    alone = run_server_to_exit("--data-parallel", "--artifacts", str(exported[0]), env=job_env())
    assert assert_one_error_line(alone, 2) == (
        "error: --data-parallel needs at least 2 ranks: start it as `mpiexec --with-ft ulfm -n W vitserve-server "
        "--data-parallel ...` with W >= 2 (this process is alone)")
    with pytest.raises(ConfigError) as predict:  # checked before MPI is touched
        join_job(Settings.from_env({}, data_parallel=True, role="predict"))
    assert str(predict.value) == "--data-parallel trains: use it with --role all or train, not predict"
    no_ft = subprocess.run([str(MPIEXEC), "-n", "2", sys.executable, "-m", "server", "--data-parallel",
                            "--artifacts", str(exported[0])], env=job_env(), capture_output=True, text=True,
                           timeout=60)
    assert no_ft.returncode != 0 and "Traceback" not in no_ft.stderr
    errors = [line for line in no_ft.stderr.splitlines() if line.startswith("error:")]
    assert errors == [("error: --data-parallel needs Open MPI's fault tolerance: start it as `mpiexec --with-ft ulfm "
                       "-n W ...` (without it a rank that dies takes every other rank down with it)")], no_ft.stderr
