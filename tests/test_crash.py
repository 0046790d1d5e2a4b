"""Crash safety with real `python -m server` processes on 127.0.0.1: SIGKILL in the middle of training and
checkpointing never loses an acknowledged checkpoint or step, and SIGTERM lets in-flight calls finish within --grace."""
from __future__ import annotations

import json
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from client.client import ClientError, ViTClient
from tests.helpers import batch, clean_env, metric, scrape, start_server, wait_for

pytestmark = pytest.mark.e2e  # server processes killed mid-step

MODEL = "digits4"  # the conftest export's name: checkpoints live in <data dir>/digits4/checkpoints
ROUNDS = 12
CALL_TIMEOUT = 30.0  # seconds per RPC (generous: a noisy 2-core machine)


def _server_args(artifacts: Path, data_dir: Path, *extra: str) -> list[str]:
    return ["--artifacts", str(artifacts), "--data-dir", str(data_dir), "--host", "127.0.0.1", "--port", "0", *extra]


class _Trainer(threading.Thread):
    """TrainStep (summaries off) in a loop, SaveCheckpoint(f"r{round}-{i}") after every 3rd step.

    Records only what the server acknowledged: a step or checkpoint is appended after its call returned.
    Stops at the first error (the server was killed) or when asked to.
    """

    def __init__(self, address: str, round_: int, seed: int):
        super().__init__(daemon=True)
        self.address, self.round, self.seed = address, round_, seed
        self.steps: list[int] = []  # steps acknowledged by TrainStep, in order
        self.checkpoints: list[tuple[str, int]] = []  # (name, step) acknowledged by SaveCheckpoint
        self.errors: list[str] = []  # codes of the calls that failed (after the kill)
        self.unexpected: list[BaseException] = []  # anything else: fails the test
        self.halt = threading.Event()

    def run(self) -> None:
        try:
            with ViTClient(self.address, timeout=CALL_TIMEOUT) as client:
                i = 0
                while not self.halt.is_set():
                    images, labels = batch(8, seed=self.seed * 1000 + i)
                    try:
                        result = client.train_step(images, labels, summaries=False)
                    except ClientError as e:
                        self.errors.append(e.code)
                        return
                    assert result.applied, result
                    self.steps.append(result.step)
                    i += 1
                    if i % 3 == 0:
                        name = f"r{self.round}-{i}"
                        try:
                            info = client.save_checkpoint(name)
                        except ClientError as e:
                            self.errors.append(e.code)
                            return
                        assert info.name == name, info
                        self.checkpoints.append((name, info.step))
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.unexpected.append(e)


def _verify_restart(client: ViTClient, data_dir: Path, acknowledged: dict[str, int], last_step: int | None) -> int:
    """Checks after a restart; returns the resumed step."""
    checkpoints, latest = client.list_checkpoints()
    listed = {c.name: c.step for c in checkpoints}
    for name, step in acknowledged.items():
        assert name in listed, f"acknowledged checkpoint {name} (step {step}) is missing after SIGKILL; listed: {sorted(listed)}"
        assert listed[name] == step, f"checkpoint {name}: acknowledged at step {step}, listed at step {listed[name]}"
    resumed = client.model_info().step
    if checkpoints:
        newest = checkpoints[-1]
        assert latest == newest.name, (latest, newest)
        assert resumed == newest.step, f"resumed at step {resumed}, the newest checkpoint {newest.name} is at {newest.step}"
    else:
        assert resumed == 0
    if last_step is not None:
        assert resumed >= last_step, f"resumed at step {resumed} < last acknowledged TrainStep step {last_step}"
    leftovers = [p.name for p in (data_dir / MODEL / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    assert not leftovers, f"temporary folders left after the restart: {leftovers}"
    return resumed


def test_sigkill_during_training_and_checkpointing_loses_no_acknowledged_checkpoint(exported, tmp_path):
    artifacts = exported[0]
    data_dir = tmp_path / "data"
    env = clean_env(VITSERVE_DATA_DIR=str(data_dir))
    rng = random.Random(20240611)
    args = _server_args(artifacts, data_dir, "--checkpoint-every-steps", "1", "--keep-checkpoints", "1000")
    acknowledged: dict[str, int] = {}  # every acknowledged manual checkpoint, all rounds
    last_step: int | None = None  # last step acknowledged by TrainStep in the previous round
    kills = restores = max_step = total_steps = 0
    started = time.monotonic()

    for round_ in range(ROUNDS + 1):
        server = start_server(*args, env=env)  # must come up (print its listening line) after every SIGKILL
        try:
            with ViTClient(server.address, timeout=CALL_TIMEOUT) as client:
                resumed = _verify_restart(client, data_dir, acknowledged, last_step)
                max_step = max(max_step, resumed)
                if acknowledged and round_ % 4 == 3:
                    name = rng.choice(sorted(acknowledged))
                    info = client.restore_checkpoint(name)
                    assert (info.name, info.step) == (name, acknowledged[name]), info
                    assert client.model_info().step == acknowledged[name]
                    restores += 1
            if round_ == ROUNDS:
                break
            trainer = _Trainer(server.address, round_, seed=round_)
            trainer.start()
            time.sleep(rng.uniform(0.3, 1.2))
            assert trainer.is_alive(), f"the client thread stopped before the kill: {trainer.errors} {trainer.unexpected}"
            server.proc.kill()  # SIGKILL: no shutdown path runs
            server.proc.wait(timeout=30)
            kills += 1
            trainer.halt.set()
            trainer.join(timeout=CALL_TIMEOUT + 10)
            assert not trainer.is_alive(), "the client thread did not stop after the kill"
            assert not trainer.unexpected, trainer.unexpected
            assert set(trainer.errors) <= {"UNAVAILABLE", "CANCELLED"}, trainer.errors
            assert trainer.steps == sorted(trainer.steps) and len(set(trainer.steps)) == len(trainer.steps), trainer.steps
            for name, step in trainer.checkpoints:
                acknowledged[name] = step
            total_steps += len(trainer.steps)
            if trainer.steps:
                last_step = trainer.steps[-1]
                max_step = max(max_step, last_step)
            else:
                last_step = None
        finally:
            if server.proc.poll() is None and round_ < ROUNDS:
                server.proc.kill()
                server.proc.wait()
    server.stop()  # SIGTERM: exit status 0
    assert kills == ROUNDS
    print(f"\nsigkill summary: rounds={ROUNDS} kills={kills} restarts={ROUNDS} train_steps_acknowledged={total_steps} "
          f"checkpoints_acknowledged={len(acknowledged)} restores={restores} max_step={max_step} "
          f"seconds={time.monotonic() - started:.1f}")


CONCURRENT = 6
GRACE = 5.0


def test_sigterm_finishes_in_flight_calls_within_the_grace_period(exported, tmp_path):
    """What is asserted, for CONCURRENT TrainSteps sent at once with SIGTERM after the first response (or 5 s):

    * each call either succeeded or failed with UNAVAILABLE or CANCELLED (never INTERNAL or anything else);
    * the process exits with status 0 within GRACE + 10 s of the SIGTERM and logs "final checkpoint";
    * a restart on the same data dir resumes at a step s with successes <= s <= CONCURRENT, where successes is
      the number of TrainSteps that returned: nothing acknowledged is lost. s may exceed successes only by steps that
      were applied but whose response was lost to the shutdown (a call that failed); when every call succeeded,
      s == successes exactly.
    """
    artifacts = exported[0]
    data_dir = tmp_path / "data"
    env = clean_env(VITSERVE_DATA_DIR=str(data_dir))
    server = start_server(*_server_args(artifacts, data_dir), "--grace", str(GRACE), env=env)
    outcomes: list[tuple[str, int | None]] = []  # ("OK", step) or (error code, None)
    lock = threading.Lock()
    first_done = threading.Event()
    go = threading.Barrier(CONCURRENT + 1)

    def call(seed: int) -> None:
        images, labels = batch(256, seed=seed)
        with ViTClient(server.address, timeout=60.0) as client:
            go.wait()
            try:
                result = client.train_step(images, labels, summaries=True)
                outcome = ("OK", result.step)
            except ClientError as e:
                outcome = (e.code, None)
            except BaseException as e:  # noqa: BLE001
                outcome = (f"{type(e).__name__}: {e}", None)
        with lock:
            outcomes.append(outcome)
        first_done.set()

    threads = [threading.Thread(target=call, args=(seed,), daemon=True) for seed in range(CONCURRENT)]
    try:
        for t in threads:
            t.start()
        go.wait()
        first_done.wait(timeout=5.0)  # SIGTERM with the rest of the calls still in flight
        server.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        try:
            code = server.proc.wait(timeout=GRACE + 10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"server did not exit within {GRACE + 10:g}s of SIGTERM; stderr:\n{server.stderr()}")
        exited_after = time.monotonic() - signalled
        log = server.stderr()
        assert code == 0, f"exit status {code}; stderr:\n{log}"
        assert "final checkpoint" in log, log
        for t in threads:
            t.join(timeout=70)
        assert len(outcomes) == CONCURRENT, outcomes
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()

    bad = [o for o in outcomes if o[0] not in ("OK", "UNAVAILABLE", "CANCELLED")]
    assert not bad, f"calls failed with unexpected errors: {outcomes}\nstderr:\n{log}"
    steps = sorted(step for code_, step in outcomes if code_ == "OK")
    successes = len(steps)
    assert successes >= 1, outcomes
    assert steps == list(range(1, successes + 1)) or len(set(steps)) == successes, steps
    assert len(set(steps)) == successes and all(1 <= s <= CONCURRENT for s in steps), steps  # one step per call

    again = start_server(*_server_args(artifacts, data_dir), env=env)
    try:
        with ViTClient(again.address, timeout=CALL_TIMEOUT) as client:
            resumed = client.model_info().step
    finally:
        again.stop()
    assert successes <= resumed <= CONCURRENT, (resumed, outcomes)
    assert resumed >= max(steps), (resumed, steps)
    if successes == CONCURRENT:
        assert resumed == successes
    print(f"\nsigterm summary: calls={CONCURRENT} succeeded={successes} "
          f"failed={[c for c, _ in outcomes if c != 'OK']} resumed_step={resumed} exit_after={exited_after:.1f}s")


def test_a_short_grace_still_checkpoints_every_applied_step(exported, tmp_path):
    """With a grace shorter than the steps in flight, gRPC cancels their responses but the steps still run:
    the final checkpoint must wait for them, hold them all and be named after the step it holds."""
    data = tmp_path / "data"
    env = clean_env(VITSERVE_DATA_DIR=str(data))
    server = start_server(*_server_args(exported[0], data), "--grace", "0.05", env=env)
    outcomes: list[tuple[str, int | None]] = []
    go = threading.Barrier(9)

    def call(seed: int) -> None:
        images, labels = batch(256, seed)
        with ViTClient(server.address, timeout=60) as c:
            go.wait()
            try:
                outcomes.append(("OK", c.train_step(images, labels, summaries=True).step))
            except ClientError as e:
                outcomes.append((e.code, None))

    threads = [threading.Thread(target=call, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    go.wait()
    # SIGTERM once the server holds at least two of them (one running, one or more waiting).
    wait_for(lambda: metric(scrape(server.metrics_url), "vitserve_train_queue_depth") >= 2, seconds=60,
             what="two TrainSteps in the server")
    server.stop()  # SIGTERM; asserts exit status 0
    for t in threads:
        t.join()
    assert len(outcomes) == 8, outcomes  # every call returned or failed with a status (no thread died)
    assert {code for code, _ in outcomes} <= {"OK", "UNAVAILABLE", "CANCELLED"}, outcomes
    folder = data / "digits4" / "checkpoints"
    (final,) = [json.loads((p / "meta.json").read_text()) for p in folder.iterdir() if not p.name.startswith(".")]
    assert final["reason"] == "shutdown" and final["name"] == f"step-{final['step']:08d}"
    acknowledged = [step for code, step in outcomes if code == "OK"]
    assert final["step"] >= max(acknowledged, default=0)
    restarted = start_server(*_server_args(exported[0], data), env=env)
    try:
        with ViTClient(restarted.address) as c:
            assert c.model_info().step == final["step"]
    finally:
        restarted.stop()
