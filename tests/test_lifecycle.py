"""The fine-tuning lifecycle over gRPC: eval, optimizer control, accumulation, the non-finite guard,
frozen parameters, checkpoints and publishing. PyTorch is the oracle wherever numbers are involved."""
from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file

from proto import vitserve_pb2 as pb
from tests.helpers import LEARNING_RATE, TRAINERS, batch, images_msg, tensor, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(params=TRAINERS)
def trainer(request) -> str:
    return request.param


def train(stub, images, labels, **kw) -> pb.TrainStepResponse:
    return stub.TrainStep(pb.TrainStepRequest(images=images_msg(images), labels=tensor(labels), **kw))


def weights(running) -> dict[str, np.ndarray]:
    return running.engine.parameters()


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert np.array_equal(a[name], b[name]), name


def assert_rejected(call, code, message):
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == code, err.value.details()
    assert message in err.value.details()


def adamw(model, lr=LEARNING_RATE):
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


def ce(model, images, labels):
    return F.cross_entropy(model(torch.from_numpy(images)), torch.from_numpy(labels))


def assert_close_to_torch(after: dict, model, lr=LEARNING_RATE):
    """Weights after one AdamW step vs PyTorch's, whose .grad holds the gradient it applied: to 2% of one lr
    step where that step is well conditioned (|g| > 1e-7), within Adam's bound (one lr each) elsewhere. Adam
    moves a weight by about lr * g / (|g| + eps), which is float noise where |g| ~ eps (1e-8): which weights get
    such gradients depends on the CPU's kernels (one of 4,096 in a digits block did on an AVX2-only machine;
    see test_grpc_e2e.assert_adam_weights_close)."""
    for name, param in model.named_parameters():
        expected = param.detach().numpy()
        well = np.abs(param.grad.numpy()) > 1e-7  # 10 eps and more
        assert well.mean() > 0.99, f"{name}: too many near-zero gradients for a meaningful comparison"
        np.testing.assert_allclose(after[name][well], expected[well], rtol=0, atol=2e-2 * lr, err_msg=name)
        np.testing.assert_allclose(after[name], expected, rtol=0, atol=2 * lr, err_msg=name)


# -- EvalStep -------------------------------------------------------------------------------------------

def test_eval_step_matches_pytorch_and_changes_nothing(running, torch_model):
    images, labels = batch(16, seed=4)
    before = weights(running)
    r = running.stub.EvalStep(pb.EvalStepRequest(images=images_msg(images), labels=tensor(labels)))
    torch_model.eval()
    with torch.no_grad():
        logits = torch_model(torch.from_numpy(images))
    assert r.loss == pytest.approx(float(F.cross_entropy(logits, torch.from_numpy(labels))), rel=1e-5)
    correct = int((logits.argmax(-1).numpy() == labels).sum())
    assert (r.correct, r.count, r.step) == (correct, 16, 0) and r.accuracy == pytest.approx(correct / 16)
    assert_same_weights(before, weights(running))
    assert running.engine.step == 0


def test_eval_step_rejects_bad_labels(running):
    images, labels = batch(4)
    assert_rejected(lambda: running.stub.EvalStep(pb.EvalStepRequest(images=images_msg(images),
                                                                     labels=tensor(labels + 10))),
                    grpc.StatusCode.INVALID_ARGUMENT, "labels: must be in [0, 10)")


# -- optimizer control ----------------------------------------------------------------------------------

def test_constant_learning_rate_is_used_by_the_next_step(running, torch_model):
    state = running.stub.SetOptimizer(pb.SetOptimizerRequest(learning_rate=5e-3))
    assert state.learning_rate == pytest.approx(5e-3) and state.optimizer == "adamw"
    assert running.stub.GetOptimizer(pb.GetOptimizerRequest()).learning_rate == pytest.approx(5e-3)
    images, labels = batch(8)
    r = train(running.stub, images, labels)
    assert r.learning_rate == pytest.approx(5e-3) and r.applied
    opt = adamw(torch_model, lr=5e-3)
    ce(torch_model, images, labels).backward()
    opt.step()
    assert_close_to_torch(weights(running), torch_model, lr=5e-3)


def test_linear_schedule_warms_up_then_decays(running):
    train(running.stub, *batch(4), omit_gradient_summaries=True)  # the schedule starts after step 1
    schedule = pb.LinearSchedule(peak_lr=1e-2, warmup_steps=2, decay_steps=4, end_lr=2e-3)
    state = running.stub.SetOptimizer(pb.SetOptimizerRequest(schedule=schedule))
    assert state.schedule == schedule and state.schedule_position == 0 and state.learning_rate == pytest.approx(5e-3)
    lrs = [train(running.stub, *batch(4, seed=i), omit_gradient_summaries=True).learning_rate for i in range(8)]
    assert lrs == pytest.approx([5e-3, 1e-2, 8e-3, 6e-3, 4e-3, 2e-3, 2e-3, 2e-3])
    assert running.stub.GetOptimizer(pb.GetOptimizerRequest()).schedule_position == 8
    state = running.stub.SetOptimizer(pb.SetOptimizerRequest(learning_rate=1e-4))  # a constant clears the schedule
    assert not state.HasField("schedule") and state.learning_rate == pytest.approx(1e-4)


def test_clipping_by_global_norm_matches_torch(running, torch_model):
    running.stub.SetOptimizer(pb.SetOptimizerRequest(clip_grad_norm=0.5))
    images, labels = batch(8)
    r = train(running.stub, images, labels)
    opt = adamw(torch_model)
    ce(torch_model, images, labels).backward()
    norm = float(torch.nn.utils.clip_grad_norm_(torch_model.parameters(), 0.5))
    assert r.grad_norm == pytest.approx(norm, rel=1e-4)  # the norm before clipping
    assert r.clip_coefficient == pytest.approx(0.5 / (norm + 1e-6), rel=1e-5) and r.clip_coefficient < 1
    clipped = {n: p.grad.numpy().astype(np.float64) for n, p in torch_model.named_parameters()}
    for g in r.gradients:  # the summaries describe the gradient that was applied
        assert g.l2_norm == pytest.approx(np.linalg.norm(clipped[g.name]), rel=1e-4, abs=1e-9)
    opt.step()
    assert_close_to_torch(weights(running), torch_model)
    running.stub.SetOptimizer(pb.SetOptimizerRequest(clip_grad_norm=0))
    assert train(running.stub, images, labels).clip_coefficient == 1.0


@pytest.mark.parametrize("request_, message", [
    (pb.SetOptimizerRequest(learning_rate=-1), "learning_rate must be a finite number >= 0, got -1.0"),
    (pb.SetOptimizerRequest(learning_rate=float("nan")), "learning_rate must be a finite number >= 0, got nan"),
    (pb.SetOptimizerRequest(clip_grad_norm=-0.1), "clip_grad_norm must be a finite number >= 0"),
    (pb.SetOptimizerRequest(learning_rate=1e-3, schedule=pb.LinearSchedule(peak_lr=1e-3, warmup_steps=1)),
     "give a constant learning_rate or a schedule, not both"),
    (pb.SetOptimizerRequest(schedule=pb.LinearSchedule(peak_lr=0, warmup_steps=1)), "schedule: peak_lr must be > 0"),
    (pb.SetOptimizerRequest(schedule=pb.LinearSchedule(peak_lr=1e-3, warmup_steps=-2)),
     "schedule: warmup_steps and decay_steps must be >= 0"),
    (pb.SetOptimizerRequest(schedule=pb.LinearSchedule(peak_lr=1e-3)), "peak_lr would never be used"),
])
def test_bad_optimizer_settings_are_rejected_and_change_nothing(running, request_, message):
    before = running.stub.GetOptimizer(pb.GetOptimizerRequest())
    assert_rejected(lambda: running.stub.SetOptimizer(request_), grpc.StatusCode.INVALID_ARGUMENT, message)
    assert running.stub.GetOptimizer(pb.GetOptimizerRequest()) == before


# -- gradient accumulation ------------------------------------------------------------------------------

def test_accumulated_update_equals_pytorchs_summed_gradient_step(running, torch_model):
    batches = [batch(6, seed=s) for s in (1, 2, 3)]
    before = weights(running)
    for i, (images, labels) in enumerate(batches[:2]):
        r = train(running.stub, images, labels, accumulate_only=True)
        assert (r.applied, r.step, r.accumulated_batches, r.skipped_reason) == (False, 0, i + 1, "")
    assert running.stub.GetOptimizer(pb.GetOptimizerRequest()).accumulated_batches == 2
    assert_same_weights(before, weights(running))  # accumulating does not move a weight
    r = train(running.stub, *batches[2])
    assert (r.applied, r.step, r.accumulated_batches) == (True, 1, 3)

    opt = adamw(torch_model)
    for images, labels in batches:  # PyTorch accumulates by summing .grad over backward() calls
        ce(torch_model, images, labels).backward()
    summed_norm = np.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in torch_model.parameters()))
    assert r.grad_norm == pytest.approx(summed_norm, rel=1e-4)
    opt.step()
    assert_close_to_torch(weights(running), torch_model)
    # the sum was consumed: the next step's gradient is its own batch's only
    images, labels = batch(6, seed=9)
    r = train(running.stub, images, labels)
    assert r.accumulated_batches == 1


# -- the non-finite guard -------------------------------------------------------------------------------

def huge_batch(n=4):
    """Finite pixels (so validation passes) whose activations overflow float32: a NaN loss."""
    images, labels = batch(n)
    return np.full_like(images, 3e38), labels


def test_a_non_finite_step_is_skipped_and_leaves_the_weights(running, torch_model):
    before = weights(running)
    r = train(running.stub, *huge_batch())
    assert not r.applied and r.step == 0 and "the loss is nan" in r.skipped_reason
    assert_same_weights(before, weights(running))
    assert running.engine.step == 0
    # nothing of the bad batch leaks into the next step: it matches PyTorch from the original weights
    images, labels = batch(8)
    r = train(running.stub, images, labels)
    assert r.applied and r.step == 1 and r.accumulated_batches == 1
    opt = adamw(torch_model)
    loss = ce(torch_model, images, labels)
    loss.backward()
    opt.step()
    assert r.loss == pytest.approx(float(loss.detach()), rel=1e-5)


def test_a_non_finite_batch_drops_the_accumulated_sum(running):
    train(running.stub, *batch(4), accumulate_only=True)
    r = train(running.stub, *huge_batch(), accumulate_only=True)
    assert not r.applied and r.skipped_reason and r.accumulated_batches == 2
    assert "the loss is nan" in r.skipped_reason, r.skipped_reason
    assert running.stub.GetOptimizer(pb.GetOptimizerRequest()).accumulated_batches == 0


# -- frozen parameters ----------------------------------------------------------------------------------

def test_frozen_parameters_are_reported_skipped_and_unchanged(serve, frozen_digits):
    running = serve(artifacts=frozen_digits)
    info = running.stub.GetModelInfo(pb.GetModelInfoRequest())
    frozen = {p.name for p in info.parameters if not p.trainable}
    assert frozen == {"to_patch_embedding.1.weight", "to_patch_embedding.1.bias", "pos_embedding"} | {
        p.name for p in info.parameters if p.name.startswith("transformer.layers.0.")}
    before = weights(running)
    for seed in range(3):
        r = train(running.stub, *batch(8, seed=seed))
    assert frozen.isdisjoint(g.name for g in r.gradients) and len(r.gradients) == len(info.parameters) - len(frozen)
    assert [a.block for a in r.attention] == [1, 2, 3]  # block 0's qkv is frozen
    after = weights(running)
    assert all(np.array_equal(before[n], after[n]) for n in frozen)
    assert not np.array_equal(before["mlp_head.1.weight"], after["mlp_head.1.weight"])


# -- checkpoints ----------------------------------------------------------------------------------------

def test_save_list_restore_round_trip(running):
    for seed in range(2):
        train(running.stub, *batch(8, seed=seed), omit_gradient_summaries=True)
    saved = running.stub.SaveCheckpoint(pb.SaveCheckpointRequest(name="two-steps"))
    assert (saved.name, saved.step, saved.reason) == ("two-steps", 2, "manual") and saved.size_bytes > 0
    at_two = weights(running)
    for seed in range(2, 5):
        train(running.stub, *batch(8, seed=seed), omit_gradient_summaries=True)
    unnamed = running.stub.SaveCheckpoint(pb.SaveCheckpointRequest())
    assert unnamed.name == "manual-00000005"
    listing = running.stub.ListCheckpoints(pb.ListCheckpointsRequest())
    assert [c.name for c in listing.checkpoints] == ["two-steps", "manual-00000005"]
    assert listing.latest == "manual-00000005"

    restored = running.stub.RestoreCheckpoint(pb.RestoreCheckpointRequest(name="two-steps"))
    assert restored.step == 2 and running.engine.step == 2
    assert_same_weights(at_two, weights(running))
    assert train(running.stub, *batch(8, seed=2), omit_gradient_summaries=True).step == 3


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden", "x" * 65, "spaces here", "/etc/passwd", "-flag"])
def test_checkpoint_names_are_names_not_paths(running, name, tmp_path):
    for call in (lambda: running.stub.SaveCheckpoint(pb.SaveCheckpointRequest(name=name)),
                 lambda: running.stub.RestoreCheckpoint(pb.RestoreCheckpointRequest(name=name))):
        assert_rejected(call, grpc.StatusCode.INVALID_ARGUMENT, f"checkpoint name {name!r} is not valid")
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.details() == (f"checkpoint name {name!r} is not valid: use 1-64 letters, digits, '.', '_' "
                                       "or '-', starting with a letter or digit")
    assert running.stub.ListCheckpoints(pb.ListCheckpointsRequest()).checkpoints == []


def test_restoring_an_unknown_checkpoint_is_not_found_and_changes_nothing(running):
    train(running.stub, *batch(4))
    before = weights(running)
    assert_rejected(lambda: running.stub.RestoreCheckpoint(pb.RestoreCheckpointRequest(name="nope")),
                    grpc.StatusCode.NOT_FOUND, "no checkpoint named 'nope'")
    with pytest.raises(grpc.RpcError) as err:
        running.stub.RestoreCheckpoint(pb.RestoreCheckpointRequest(name="nope"))
    assert err.value.details() == "no checkpoint named 'nope' (ListCheckpoints shows the saved ones)"
    assert_same_weights(before, weights(running))
    assert running.engine.step == 1


def test_automatic_checkpoints_every_n_steps_keep_the_newest(serve):
    running = serve(checkpoint_every_steps=2, keep_checkpoints=2)
    for seed in range(7):
        train(running.stub, *batch(4, seed=seed), omit_gradient_summaries=True)
    running.stub.SaveCheckpoint(pb.SaveCheckpointRequest(name="mine"))  # manual ones are never pruned
    names = [(c.name, c.reason) for c in running.stub.ListCheckpoints(pb.ListCheckpointsRequest()).checkpoints]
    assert names == [("step-00000004", "auto"), ("step-00000006", "auto"), ("mine", "manual")]


def test_automatic_checkpoints_every_t_seconds(serve):
    running = serve(checkpoint_every_seconds=0.3)
    train(running.stub, *batch(4), omit_gradient_summaries=True)
    deadline = threading.Event()
    for _ in range(50):
        if running.stub.ListCheckpoints(pb.ListCheckpointsRequest()).checkpoints:
            break
        deadline.wait(0.1)
    (checkpoint,) = running.stub.ListCheckpoints(pb.ListCheckpointsRequest()).checkpoints
    assert (checkpoint.step, checkpoint.reason) == (1, "auto")
    deadline.wait(0.8)  # nothing changed since: no more checkpoints
    assert len(running.stub.ListCheckpoints(pb.ListCheckpointsRequest()).checkpoints) == 1


def test_a_failed_checkpoint_write_leaves_no_entry(running, monkeypatch):
    train(running.stub, *batch(4))
    good = running.stub.SaveCheckpoint(pb.SaveCheckpointRequest(name="good"))

    def crash(path):
        path.write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(running.engine, "save_checkpoint", crash)
    with pytest.raises(grpc.RpcError) as err:
        running.stub.SaveCheckpoint(pb.SaveCheckpointRequest(name="good"))  # would replace "good"
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # a write failure names the folder
    assert err.value.details() == (f"checkpoint 'good' could not be written to "
                                   f"{running.trainer.checkpoints.store.root}: disk full")
    listing = running.stub.ListCheckpoints(pb.ListCheckpointsRequest())
    assert [(c.name, c.created_unix) for c in listing.checkpoints] == [("good", good.created_unix)]
    folder = running.trainer.checkpoints.store._dirs.root
    assert sorted(p.name for p in folder.iterdir()) == ["good"]  # no temporary left behind


def test_a_crash_between_the_renames_is_recovered(running):
    """Replacing a checkpoint moves the old one aside first; if the process dies before the new one is
    renamed in, the next start puts the old one back."""
    train(running.stub, *batch(4))
    running.stub.SaveCheckpoint(pb.SaveCheckpointRequest(name="keep"))
    root = running.trainer.checkpoints.store._dirs.root
    (root / "keep").rename(root / ".old-keep-1234abcd")  # the state such a crash leaves
    (root / ".tmp-keep-99999999").mkdir()  # and an unfinished new one
    from engine.store.files import AtomicDirs

    AtomicDirs(root)  # what a restart does
    assert sorted(p.name for p in root.iterdir()) == ["keep"]


def test_a_restart_resumes_from_the_latest_checkpoint_exactly(serve, tmp_path):
    data = tmp_path / "resume"
    first = serve(data_dir=data)
    for seed in range(3):
        train(first.stub, *batch(8, seed=seed), omit_gradient_summaries=True)
    first.stub.SetOptimizer(pb.SetOptimizerRequest(schedule=pb.LinearSchedule(peak_lr=2e-3, warmup_steps=3)))
    train(first.stub, *batch(8, seed=3), omit_gradient_summaries=True)
    at_stop = weights(first)
    first.stop()  # what SIGTERM does: the final checkpoint
    listing = [(c.name, c.reason, c.step) for c in first.trainer.list_checkpoints().checkpoints]
    assert listing == [("step-00000004", "shutdown", 4)]

    second = serve(data_dir=data)
    assert second.engine.step == 4
    assert_same_weights(at_stop, weights(second))  # byte for byte
    state = second.stub.GetOptimizer(pb.GetOptimizerRequest())
    assert state.schedule_position == 1 and state.learning_rate == pytest.approx(2e-3 * 2 / 3)

    # the next step equals the one an uninterrupted server takes
    reference = serve(data_dir=tmp_path / "reference")
    for seed in range(3):
        train(reference.stub, *batch(8, seed=seed), omit_gradient_summaries=True)
    reference.stub.SetOptimizer(pb.SetOptimizerRequest(schedule=pb.LinearSchedule(peak_lr=2e-3, warmup_steps=3)))
    train(reference.stub, *batch(8, seed=3), omit_gradient_summaries=True)
    a = train(second.stub, *batch(8, seed=4))
    b = train(reference.stub, *batch(8, seed=4))
    # ORT's multi-threaded reductions may sum in another order from run to run: computed values are
    # compared to float32 rounding (weights loaded from the checkpoint were compared byte for byte above).
    assert (a.step, a.learning_rate) == (b.step, b.learning_rate)
    assert a.loss == pytest.approx(b.loss, rel=1e-6) and a.grad_norm == pytest.approx(b.grad_norm, rel=1e-5)
    expected = weights(reference)
    for name, value in weights(second).items():
        np.testing.assert_allclose(value, expected[name], rtol=0, atol=1e-6, err_msg=name)


def test_a_checkpoint_holds_weights_and_optimizer_state(running, trainer):
    train(running.stub, *batch(8))
    running.stub.SaveCheckpoint(pb.SaveCheckpointRequest(name="inspect"))
    path = str(running.trainer.checkpoints.store.path(running.trainer.checkpoints.store.get("inspect")))
    if trainer == "ort":  # safetensors: weights by name, AdamW's moments, the step in the metadata
        from safetensors import safe_open

        tensors = load_file(path)
        for name, value in weights(running).items():
            assert np.array_equal(tensors[name], value), name
            assert tensors[f"exp_avg.{name}"].shape == value.shape and tensors[f"exp_avg_sq.{name}"].any(), name
        with safe_open(path, "numpy") as f:
            assert '"step": 1' in f.metadata()["vitserve_state"] and f.metadata()["optimizer_step"] == "1"
        return
    from onnxruntime.capi import _pybind_state as C

    state = C.load_checkpoint(path)
    for name, value in weights(running).items():
        assert np.array_equal(state.get_parameter(name).data.numpy(), value), name
    assert '"step": 1' in state.get_property("vitserve_state")


# -- publishing -----------------------------------------------------------------------------------------

def predict_logits(stub, images):
    r = stub.Predict(pb.PredictRequest(images=images_msg(images), return_logits=True))
    return r.model_version, np.frombuffer(r.logits.data, dtype="<f4").reshape(r.logits.shape)


def test_publish_serves_the_trained_weights(running, torch_model):
    images, labels = batch(8)
    version, before = predict_logits(running.stub, images)
    assert version == 0
    opt = adamw(torch_model)
    for seed in range(3):
        x, y = batch(8, seed=seed)
        train(running.stub, x, y, omit_gradient_summaries=True)
        opt.zero_grad()
        ce(torch_model, x, y).backward()
        opt.step()
    assert predict_logits(running.stub, images)[0] == 0  # training alone does not change Predict
    published = running.stub.Publish(pb.PublishRequest())
    assert (published.version, published.step) == (1, 3)
    version, after = predict_logits(running.stub, images)
    assert version == 1 and not np.allclose(after, before)
    torch_model.eval()
    with torch.no_grad():
        np.testing.assert_allclose(after, torch_model(torch.from_numpy(images)).numpy(), rtol=0, atol=2e-3)
    info = running.stub.GetModelInfo(pb.GetModelInfoRequest())
    assert info.model_version == 1 and [(v.version, v.step) for v in info.versions] == [(0, 0), (1, 3)]


def test_publishing_right_away_serves_the_same_logits(running):
    images, _ = batch(5)
    _, base = predict_logits(running.stub, images)
    running.stub.Publish(pb.PublishRequest())
    version, published = predict_logits(running.stub, images)
    assert version == 1
    np.testing.assert_allclose(published, base, rtol=1e-5, atol=1e-6)


def test_publish_does_not_fail_in_flight_predicts(running):
    """Four callers Predict in a loop through three Publishes: some Predict is in flight during every Publish,
    none fails, each caller sees every version switch in order (never an older one after a newer one)."""
    images, labels = batch(4)
    errors = []
    calls: list[list[tuple[float, float, int]]] = [[] for _ in range(4)]  # per caller: (start, end, version)
    stop = threading.Event()

    def hammer(mine):
        while not stop.is_set():
            start = time.monotonic()
            try:
                version = predict_logits(running.stub, images)[0]
            except grpc.RpcError as e:  # pragma: no cover - the assertion below reports it
                errors.append(e)
                continue
            mine.append((start, time.monotonic(), version))

    def seen(version):
        return errors or any(v == version for mine in calls for _, _, v in list(mine))

    threads = [threading.Thread(target=hammer, args=(mine,)) for mine in calls]
    for t in threads:
        t.start()
    publishes = []
    try:
        wait_for(lambda: seen(0), what="a Predict of version 0")
        for version in (1, 2, 3):
            train(running.stub, images, labels, omit_gradient_summaries=True)
            start = time.monotonic()
            assert running.stub.Publish(pb.PublishRequest()).version == version
            publishes.append((start, time.monotonic()))
            wait_for(lambda: seen(version), what=f"a Predict of version {version}")
    finally:
        stop.set()
        for t in threads:
            t.join()
    versions = [v for mine in calls for _, _, v in mine]
    assert errors == [] and len(versions) > 10 and set(versions) <= {0, 1, 2, 3} and max(versions) >= 2
    assert set(versions) == {0, 1, 2, 3}
    for mine in calls:
        assert [v for _, _, v in mine] == sorted(v for _, _, v in mine), "a caller got an older version back"
    for start, end in publishes:
        assert any(a < end and b > start for mine in calls for a, b, _ in mine), "no Predict during a Publish"


def test_published_versions_survive_a_restart_and_auto_publish(serve, tmp_path):
    data = tmp_path / "versions"
    first = serve(data_dir=data, publish_every_steps=2)
    images, labels = batch(4)
    for _ in range(4):
        train(first.stub, images, labels, omit_gradient_summaries=True)
    version, logits = predict_logits(first.stub, images)
    assert version == 2  # published automatically at steps 2 and 4
    first.stop()
    second = serve(data_dir=data)
    again_version, again = predict_logits(second.stub, images)
    assert again_version == 2 and np.array_equal(again, logits)
    assert [v.version for v in second.stub.GetModelInfo(pb.GetModelInfoRequest()).versions] == [0, 1, 2]


def test_sigterm_then_restart_of_a_real_server_process_loses_nothing(serve, exported, tmp_path):
    from client import ViTClient
    from tests.helpers import clean_env, start_server

    data = tmp_path / "process"
    process = start_server("--artifacts", str(exported[0]), "--port", "0", "--learning-rate", str(LEARNING_RATE),
                           env=clean_env(VITSERVE_DATA_DIR=str(data)))
    with ViTClient(process.address) as c:
        for seed in range(3):
            c.train_step(*batch(8, seed=seed), summaries=False)
    process.stop()  # SIGTERM: asserts exit status 0
    restarted = start_server("--artifacts", str(exported[0]), "--port", "0", "--learning-rate", str(LEARNING_RATE),
                             env=clean_env(VITSERVE_DATA_DIR=str(data)))
    try:
        with ViTClient(restarted.address) as c:
            assert c.model_info().step == 3
            resumed = c.train_step(*batch(8, seed=3), summaries=False)
    finally:
        restarted.stop()
    reference = serve(data_dir=tmp_path / "reference")
    for seed in range(3):
        train(reference.stub, *batch(8, seed=seed), omit_gradient_summaries=True)
    expected = train(reference.stub, *batch(8, seed=3), omit_gradient_summaries=True)
    assert resumed.step == expected.step  # computed values to float32 rounding (threaded reductions)
    assert resumed.loss == pytest.approx(expected.loss, rel=1e-6)
    assert resumed.grad_norm == pytest.approx(expected.grad_norm, rel=1e-5)
