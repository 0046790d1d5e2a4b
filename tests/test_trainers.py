"""The two trainers side by side, and the `ort` trainer's own parts: its optimizers and its checkpoints.

`ort` runs PyTorch's autograd exported as plain ONNX ops (engine/train/graph_backend.py) with torch.optim's
arithmetic in numpy (engine/train/optim.py); `ort-training` runs ONNX Runtime's training artifacts. Given the
same weights and batches they must train the same model: 20 AdamW steps, losses and weights within 1e-5.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

from engine.train import gradients, optim
from engine.train.graph_backend import CheckpointError, GradientGraphBackend
from engine.manifest import Manifest
from engine.runtime import session_options
from engine.train.step import TrainingEngine
from tests.helpers import batch

STEPS = 20


def engines(folder, lr=1e-3):
    manifest = Manifest.load(folder)
    return {t: TrainingEngine(manifest, "cpu", session_options(1), lr, trainer=t) for t in ("ort", "ort-training")}


def test_the_two_trainers_train_the_same_model(exported):
    pair = engines(exported[0])
    for step in range(STEPS):
        images, labels = batch(16, seed=2000 + step)
        ours, theirs = (pair[t].train_step(images, labels, summaries=step == STEPS - 1) for t in ("ort", "ort-training"))
        assert ours.loss == pytest.approx(theirs.loss, rel=1e-5), step
        assert ours.grad_norm == pytest.approx(theirs.grad_norm, rel=1e-4), step
    assert ours.step == theirs.step == STEPS
    a, b = pair["ort"].parameters(), pair["ort-training"].parameters()
    assert a.keys() == b.keys()
    for name in a:
        relative = np.linalg.norm(a[name] - b[name]) / max(np.linalg.norm(b[name]), 1e-12)
        assert relative < 1e-5, f"{name}: {relative:.2e} apart after {STEPS} steps"
    names = [s.name for s in ours.gradients]
    assert names == [s.name for s in theirs.gradients] and len(names) == len(a)


def test_eval_and_accumulation_agree_across_trainers(exported):
    pair = engines(exported[0])
    images, labels = batch(12, seed=5)
    evals = [pair[t].eval_step(images, labels) for t in pair]
    assert evals[0].loss == pytest.approx(evals[1].loss, rel=1e-5) and evals[0].correct == evals[1].correct
    for t, engine in pair.items():  # two accumulated halves == one step on the whole batch
        engine.train_step(images[:6], labels[:6], accumulate_only=True, summaries=False)
        engine.train_step(images[6:], labels[6:], summaries=False)
    a, b = pair["ort"].parameters(), pair["ort-training"].parameters()
    for name in a:  # by tensor norm: Adam turns a gradient of ~1e-8 into a step of lr, so single values are noise
        assert np.linalg.norm(a[name] - b[name]) / np.linalg.norm(b[name]) < 1e-5, name


@settings(max_examples=20, deadline=None)
@given(lr=st.floats(1e-5, 1e-1), wd=st.sampled_from([0.0, 0.01, 0.1]), seed=st.integers(0, 2**16))
def test_adamw_is_torch_adamw(lr, wd, seed):
    rng = np.random.default_rng(seed)
    w0 = rng.standard_normal(257, dtype=np.float32)
    grads = [(rng.standard_normal(257) * 10.0 ** rng.integers(-6, 2)).astype(np.float32) for _ in range(5)]
    ours = optim.AdamW(257, weight_decay=wd)
    w = w0.copy()
    param = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    theirs = torch.optim.AdamW([param], lr=lr, weight_decay=wd)
    for g in grads:
        ours.update(w, g, lr)
        param.grad = torch.from_numpy(g.copy())
        theirs.step()
        # The same float32 operations; ATen's vector kernels fuse a multiply and an add (one rounding where
        # numpy has two), so values may differ in the last bit or two.
        np.testing.assert_allclose(w, param.detach().numpy(), rtol=1e-6, atol=1e-6 * lr)  # Adam's step is ~lr
    state = theirs.state[param]
    for mine, torch_moment in ((ours.exp_avg, state["exp_avg"]), (ours.exp_avg_sq, state["exp_avg_sq"])):
        scale = float(np.abs(torch_moment.numpy()).max())  # entries that cancel to ~0 compare to the scale
        np.testing.assert_allclose(mine, torch_moment.numpy(), rtol=1e-5, atol=1e-6 * scale)


def test_adamw_walks_long_vectors_in_blocks_like_torch():
    """Past one block (optim.BLOCK) the update runs block by block: still torch's AdamW across the seams."""
    size = 2 * optim.BLOCK + 77
    rng = np.random.default_rng(3)
    w = rng.standard_normal(size, dtype=np.float32)
    param = torch.nn.Parameter(torch.from_numpy(w.copy()))
    theirs, ours = torch.optim.AdamW([param], lr=1e-2), optim.AdamW(size)
    for _ in range(3):
        g = rng.standard_normal(size, dtype=np.float32)
        ours.update(w, g, 1e-2)
        param.grad = torch.from_numpy(g.copy())
        theirs.step()
    np.testing.assert_allclose(w, param.detach().numpy(), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(ours.exp_avg_sq, theirs.state[param]["exp_avg_sq"].numpy(), rtol=1e-6)


def test_sgd_is_torch_sgd():
    rng = np.random.default_rng(0)
    w = rng.standard_normal(100, dtype=np.float32)
    param = torch.nn.Parameter(torch.from_numpy(w.copy()))
    theirs, ours = torch.optim.SGD([param], lr=0.05), optim.SGD(100)
    for _ in range(3):
        g = rng.standard_normal(100, dtype=np.float32)
        ours.update(w, g, 0.05)
        param.grad = torch.from_numpy(g.copy())
        theirs.step()
    np.testing.assert_allclose(w, param.detach().numpy(), rtol=1e-6, atol=1e-9)  # ATen fuses w + (-lr) * g


def test_an_ort_checkpoint_restores_weights_moments_and_step(exported, tmp_path):
    manifest = Manifest.load(exported[0])
    engine = TrainingEngine(manifest, "cpu", session_options(1), 1e-3, trainer="ort")
    for seed in range(3):
        engine.train_step(*batch(8, seed=seed), summaries=False)
    engine.save_checkpoint(tmp_path / "c")
    after_save = engine.train_step(*batch(8, seed=9), summaries=False)
    resumed = TrainingEngine(manifest, "cpu", session_options(1), 1e-3, checkpoint=tmp_path / "c", trainer="ort")
    assert resumed.step == 3
    again = resumed.train_step(*batch(8, seed=9), summaries=False)  # the moments came back too
    assert again.loss == after_save.loss and again.step == 4
    for name, value in engine.parameters().items():
        np.testing.assert_array_equal(resumed.parameter(name), value, err_msg=name)


def test_a_damaged_or_foreign_ort_checkpoint_is_refused_naming_it(exported, tmp_path):
    manifest = Manifest.load(exported[0])
    engine = TrainingEngine(manifest, "cpu", session_options(1), 1e-3, trainer="ort")
    engine.save_checkpoint(tmp_path / "good")
    (tmp_path / "cut").write_bytes((tmp_path / "good").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="^checkpoint cut cannot be read"):
        engine.restore_checkpoint(tmp_path / "cut")
    tensors = load_file(tmp_path / "good")
    save_file(tensors, str(tmp_path / "foreign"))  # no vitserve metadata: e.g. a bare state_dict file
    with pytest.raises(CheckpointError, match="^checkpoint foreign is not a vitserve ort checkpoint"):
        engine.restore_checkpoint(tmp_path / "foreign")
    name = manifest.trainable[0]
    del tensors[name]
    save_file(tensors, str(tmp_path / "short"), metadata={"format": "vitserve-ort-checkpoint-1"})
    with pytest.raises(CheckpointError, match=f"^checkpoint has no tensor '{name}'"):
        engine.restore_checkpoint(tmp_path / "short")
    assert engine.step == 0  # nothing changed


# -- the device-resident path (engine/train/buffers.DeviceBuffers), run on the CPU execution provider ------------------

def backend_pair(folder):
    """The `ort` backend twice on the same weights: buffers on the host (numpy optimizer) and device-resident
    buffers with the optimizer's ONNX graph (what CUDA runs), here on the CPU execution provider."""
    manifest = Manifest.load(folder)
    params = {p.name: p for p in manifest.parameters}
    pair = {}
    for resident in (False, True):
        flat = gradients.FlatLayout([params[n] for n in manifest.trainable])
        pair[resident] = GradientGraphBackend(manifest, "cpu", session_options(1), flat, resident=resident)
        pair[resident].load(None)
    return pair


def test_device_resident_training_matches_host_training(exported, tmp_path):
    pair = backend_pair(exported[0])
    for step in range(8):
        images, labels = batch(12, seed=300 + step)
        results = {}
        for resident, backend in pair.items():
            loss, grads, _ = backend.forward_backward(images, labels, head_importance=False)
            fresh = step % 3 != 2
            if not fresh:  # what clipping or accumulation hands the optimizer: a changed host gradient
                grads = grads * np.float32(0.5)
            backend.update(grads, 1e-3, fresh)
            results[resident] = loss
        assert results[True] == pytest.approx(results[False], rel=1e-6), step
    host, device = pair[False].snapshot(0), pair[True].snapshot(0)
    # 1e-5 relative, the two trainers' tolerance: the two optimizers round a bit or two apart per op, which AdamW's
    # division by sqrt(v) + eps grows where v is tiny (seen: 3e-6 on one weight of 135,370 after 8 steps)
    np.testing.assert_allclose(device, host, rtol=1e-5, atol=1e-7)
    images, labels = batch(10, seed=7)
    (a, la), (b, lb) = (pair[r].evaluate(images, labels) for r in (False, True))
    assert a == pytest.approx(b, rel=1e-6) and np.allclose(la, lb, rtol=1e-5, atol=1e-6)
    pair[True].save(tmp_path / "device", "{}")  # a device checkpoint resumes on the host and vice versa
    pair[False].load(tmp_path / "device")
    np.testing.assert_array_equal(pair[False].snapshot(0), device)
    assert pair[False].parameter_names() == pair[True].parameter_names()


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_the_optimizer_graph_is_the_numpy_optimizer(name):
    """optim.update_graph computes what optim.AdamW / optim.SGD compute, step for step, on flat vectors."""
    import onnxruntime as ort

    rng = np.random.default_rng(1)
    numpy_opt, graph_opt = optim.build({"name": name}, 1000), optim.build({"name": name}, 0)
    session = ort.InferenceSession(optim.update_graph(graph_opt).SerializeToString(), providers=["CPUExecutionProvider"])
    w = rng.standard_normal(1000, dtype=np.float32)
    state = {"weights": w.copy(), **{k: np.zeros(1000, np.float32) for k in numpy_opt.state()}}
    for lr in (1e-3, 3e-2, 1e-4):
        g = (rng.standard_normal(1000) * 10.0 ** rng.integers(-5, 1)).astype(np.float32)
        numpy_opt.update(w, g, lr)
        graph_opt.step += 1
        outputs = session.run(None, {**state, "grads": g, **optim.update_scalars(graph_opt, lr)})
        state = dict(zip(["weights", *numpy_opt.state()], outputs))
        np.testing.assert_allclose(state["weights"], w, rtol=1e-6, atol=1e-7)
        for moment, values in numpy_opt.state().items():
            np.testing.assert_allclose(state[moment], values, rtol=1e-6, atol=1e-12)


def test_the_step_guards_have_one_code_and_message_each(exported):
    """The deadline and accumulation guards live in the step function (isolation and data-parallel call them)."""
    import time

    from engine.errors import DeadlineExceeded, FailedPrecondition

    engine = TrainingEngine(Manifest.load(exported[0]), "cpu", session_options(1), 1e-3, trainer="ort")
    images, labels = batch(4)
    with pytest.raises(DeadlineExceeded) as e:
        engine.train_step(images, labels, deadline=time.monotonic() - 1)
    assert str(e.value) == "the deadline passed while the step waited for the running one; it was not applied"
    assert engine.step == 0
    engine.train_step(images, labels, accumulate_only=True)
    for call, what in ((engine.gradients, "the gradients of one batch"), (engine.head_importance, "head importance")):
        with pytest.raises(FailedPrecondition) as e:
            call(images, labels)
        assert str(e.value) == ("1 batches of gradients are being accumulated; apply them with a TrainStep before "
                                f"asking for {what}")
    assert engine.train_step(images, labels).accumulated_batches == 2
