"""End to end over a real channel to a real server on 127.0.0.1, with PyTorch autograd as the oracle."""
from __future__ import annotations

import io

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from proto import vitserve_pb2 as pb
from tests.helpers import LEARNING_RATE, batch, images_msg, tensor, wait_for


def train_request(images, labels, **kw) -> pb.TrainStepRequest:
    return pb.TrainStepRequest(images=images_msg(images), labels=tensor(labels), **kw)


def assert_adam_weights_close(after: dict, model, grads: list[dict]):
    """Weights after len(grads) AdamW steps, ORT vs PyTorch.

    Adam moves a weight by about lr * g / (|g| + eps). Where every step's |g| is well above eps
    (1e-8), the update is well conditioned and must agree to 1% of one lr step (ORT's default
    Hugging Face-mode AdamW was 3% off). Where some |g| is float noise near eps, the step's size
    is noise too, and only Adam's bound (one lr per step) applies; those must stay rare.
    """
    steps = len(grads)
    for name, param in model.named_parameters():
        expected = param.detach().numpy()
        well = np.all([np.abs(g[name]) > 1e-6 for g in grads], axis=0)
        assert well.mean() > 0.99, f"{name}: too many near-zero gradients for a meaningful comparison"
        np.testing.assert_allclose(after[name][well], expected[well], rtol=0, atol=1e-2 * LEARNING_RATE, err_msg=name)
        np.testing.assert_allclose(after[name], expected, rtol=0, atol=2 * steps * LEARNING_RATE, err_msg=name)


def torch_step(model, images, labels):
    """One PyTorch AdamW step with the hyper-parameters of the exported optimizer graph."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    model.train()
    loss = F.cross_entropy(model(torch.from_numpy(images)), torch.from_numpy(labels))
    loss.backward()
    grads = {n: p.grad.detach().numpy().copy() for n, p in model.named_parameters()}
    optimizer.step()
    return float(loss.detach()), grads


def test_predict_logits_equal_in_process_onnxruntime(running, exported):
    images, _ = batch(5)
    response = running.stub.Predict(pb.PredictRequest(images=images_msg(images), top_k=3, return_logits=True))
    session = ort.InferenceSession(str(exported[0] / "inference.onnx"), providers=["CPUExecutionProvider"])
    expected = session.run(["logits"], {"images": images})[0]
    logits = np.frombuffer(response.logits.data, dtype="<f4").reshape(response.logits.shape)
    np.testing.assert_allclose(logits, expected, rtol=1e-6, atol=1e-6)
    probs = torch.softmax(torch.from_numpy(expected).double(), -1).numpy()
    for row, prediction in zip(probs, response.predictions):
        assert [s.index for s in prediction.top] == list(np.argsort(-row)[:3])
        assert [s.label for s in prediction.top] == [str(i) for i in np.argsort(-row)[:3]]
        np.testing.assert_allclose([s.probability for s in prediction.top], np.sort(row)[::-1][:3], rtol=1e-5)


def test_predict_without_logits_returns_top5_only(running):
    response = running.stub.Predict(pb.PredictRequest(images=images_msg(batch(2)[0])))
    assert not response.HasField("logits")
    assert [len(p.top) for p in response.predictions] == [5, 5]


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_predict_encoded_images_are_preprocessed_like_the_manifest_says(running):
    rng = np.random.default_rng(3)
    pixels = [rng.integers(0, 256, size=(8, 8), dtype=np.uint8) for _ in range(2)]
    big = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)  # RGB and 4x too large: converted and resized
    encoded = [png(p) for p in pixels] + [png(big)]
    response = running.stub.Predict(pb.PredictRequest(images=pb.Images(encoded=pb.EncodedImages(images=encoded)),
                                                      return_logits=True))
    small = Image.fromarray(big).convert("L").resize((8, 8), Image.Resampling.BILINEAR)
    manual = np.stack([p for p in pixels] + [np.asarray(small)]).astype(np.float32)[:, None] / 255.0
    manual = (manual - 0.5) / 0.5
    direct = running.stub.Predict(pb.PredictRequest(images=images_msg(manual), return_logits=True))
    assert response.logits.data == direct.logits.data


def test_train_step_loss_and_weights_match_pytorch(running, torch_model):
    images, labels = batch(8)
    response = running.stub.TrainStep(train_request(images, labels))
    loss, grads = torch_step(torch_model, images, labels)
    assert response.step == 1
    assert response.learning_rate == pytest.approx(LEARNING_RATE)
    assert response.loss == pytest.approx(loss, rel=1e-5)
    expected_norm = np.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads.values()))
    assert response.grad_norm == pytest.approx(expected_norm, rel=1e-4)
    assert_adam_weights_close(running.engine.parameters(), torch_model, [grads])


def test_second_step_still_matches_pytorch(running, torch_model):
    """AdamW's moments and bias correction carry over between steps."""
    optimizer = torch.optim.AdamW(torch_model.parameters(), lr=LEARNING_RATE, eps=1e-8, weight_decay=0.01)
    grads = []
    for seed in (1, 2):
        images, labels = batch(6, seed=seed)
        response = running.stub.TrainStep(train_request(images, labels, omit_gradient_summaries=True))
        optimizer.zero_grad()
        loss = F.cross_entropy(torch_model(torch.from_numpy(images)), torch.from_numpy(labels))
        loss.backward()
        grads.append({n: p.grad.numpy().copy() for n, p in torch_model.named_parameters()})
        optimizer.step()
        assert response.loss == pytest.approx(float(loss.detach()), rel=1e-5)
        assert not response.gradients and not response.attention
    assert_adam_weights_close(running.engine.parameters(), torch_model, grads)


def test_gradient_summaries_match_pytorch_gradients(running, torch_model):
    before = {n: p.detach().numpy().copy() for n, p in torch_model.named_parameters()}
    images, labels = batch(8)
    response = running.stub.TrainStep(train_request(images, labels))
    _, grads = torch_step(torch_model, images, labels)
    assert [g.name for g in response.gradients] == [n for n, _ in torch_model.named_parameters()]
    for summary in response.gradients:
        g = grads[summary.name].astype(np.float64)
        scale = np.abs(g).max() + 1e-12
        assert tuple(summary.shape) == g.shape
        assert summary.l2_norm == pytest.approx(np.linalg.norm(g), rel=1e-4, abs=1e-9)
        assert summary.mean == pytest.approx(g.mean(), abs=1e-4 * scale)
        assert summary.std == pytest.approx(g.std(), rel=1e-3, abs=1e-9)
        assert summary.min == pytest.approx(g.min(), abs=1e-4 * scale)
        assert summary.max == pytest.approx(g.max(), abs=1e-4 * scale)
        assert summary.max_abs == pytest.approx(scale, rel=1e-4)
        assert summary.nonfinite_count == 0
        assert 0.0 <= summary.zero_fraction <= 1.0
        w0 = before[summary.name].astype(np.float64)
        w1 = dict(torch_model.named_parameters())[summary.name].detach().numpy().astype(np.float64)
        assert summary.param_norm == pytest.approx(np.linalg.norm(w0), rel=1e-6)
        if np.linalg.norm(w0) > 0:
            assert summary.update_ratio == pytest.approx(np.linalg.norm(w1 - w0) / np.linalg.norm(w0), rel=1e-3)
        else:  # a zero-initialized bias that moved
            assert summary.update_ratio == float("inf") and np.linalg.norm(w1 - w0) > 0


def test_qkv_and_per_head_norms_equal_pytorch_to_qkv_gradient_sliced_by_hand(running, torch_model):
    images, labels = batch(8)
    response = running.stub.TrainStep(train_request(images, labels))
    _, grads = torch_step(torch_model, images, labels)
    heads, dim_head, depth = 4, 16, 4
    inner = heads * dim_head
    assert [a.name for a in response.attention] == [f"transformer.layers.{i}.0.fn.to_qkv.weight" for i in range(depth)]
    for entry in response.attention:
        g = grads[entry.name].astype(np.float64)  # (3 * inner, dim): rows q | k | v, each (h d)
        assert (entry.block, entry.heads, entry.dim_head) == (int(entry.name.split(".")[2]), heads, dim_head)
        for part, (norm, per_head) in enumerate([(entry.q_norm, entry.q_head_norms), (entry.k_norm, entry.k_head_norms),
                                                 (entry.v_norm, entry.v_head_norms)]):
            rows = g[part * inner:(part + 1) * inner]
            assert norm == pytest.approx(np.linalg.norm(rows), rel=1e-4)
            expected = [np.linalg.norm(rows[h * dim_head:(h + 1) * dim_head]) for h in range(heads)]
            np.testing.assert_allclose(per_head, expected, rtol=1e-4)


def test_model_info_describes_the_export(running):
    info = running.stub.GetModelInfo(pb.GetModelInfoRequest())
    assert info.name == "digits4"
    assert list(info.input_shape) == [-1, 1, 8, 8] and info.input_name == "images" and info.input_dtype == pb.FLOAT32
    assert list(info.execution_providers) == ["CPUExecutionProvider"] and info.device == "cpu"
    assert list(info.class_names) == [str(i) for i in range(10)]
    assert info.preprocessing.height == 8 and list(info.preprocessing.mean) == [0.5]
    assert (info.loss_node, info.loss_op_type) == ("loss/Div", "Div")  # the ort trainer's gradient graph
    assert info.optimizer == "adamw" and info.step == 0 and info.max_batch_size == 32
    names = [p.name for p in info.parameters]
    assert "transformer.layers.0.0.fn.to_qkv.weight" in names and all(p.trainable for p in info.parameters)
    assert info.export_versions["onnxruntime"] == "1.19.2"


# -- bad input: INVALID_ARGUMENT with a message naming the problem, and nothing changes ---------------

def _bad_requests():
    images, labels = batch(4)
    good_images = images_msg(images)
    return {
        "wrong shape": (pb.TrainStepRequest(images=images_msg(images.reshape(4, 1, 4, 16)), labels=tensor(labels)),
                        "images: shape must be [batch, 1, 8, 8], got [4, 1, 4, 16]"),
        "wrong dtype": (pb.TrainStepRequest(images=images_msg(images.astype(np.float64)), labels=tensor(labels)),
                        "images: dtype must be FLOAT32 (normalized pixels), got FLOAT64"),
        "byte length": (pb.TrainStepRequest(images=pb.Images(tensor=pb.Tensor(dtype=pb.FLOAT32, shape=[4, 1, 8, 8],
                                                                              data=images.tobytes()[:-4])),
                                            labels=tensor(labels)),
                        "images: 1020 bytes do not match shape [4, 1, 8, 8] of FLOAT32 (1024 bytes expected)"),
        "undecodable image": (pb.TrainStepRequest(images=pb.Images(encoded=pb.EncodedImages(images=[b"not a png"])),
                                                  labels=tensor(labels[:1])),
                              "image 0: cannot be decoded as an image (9 bytes)"),
        "label out of range": (pb.TrainStepRequest(images=good_images, labels=tensor(np.array([0, 1, 12, 3]))),
                               "labels: must be in [0, 10), got 12"),
        "negative label": (pb.TrainStepRequest(images=good_images, labels=tensor(np.array([0, -1, 2, 3]))),
                           "labels: must be in [0, 10), got -1"),
        "labels dtype": (pb.TrainStepRequest(images=good_images, labels=tensor(labels.astype(np.int32))),
                         "labels: dtype must be INT64, got INT32"),
        "labels count": (pb.TrainStepRequest(images=good_images, labels=tensor(labels[:3])),
                         "labels: shape must be [4] (one per image), got [3]"),
        "non-finite pixels": (pb.TrainStepRequest(images=images_msg(np.where(images > 1.5, np.nan, images).astype(np.float32)),
                                                  labels=tensor(labels)),
                              f"images: {int((images > 1.5).sum())} pixel values are NaN or Inf"),
        "infinite pixels": (pb.TrainStepRequest(images=images_msg(np.full((4, 1, 8, 8), np.inf, np.float32)),
                                                labels=tensor(labels)),
                            "images: 256 pixel values are NaN or Inf"),
        "empty batch": (pb.TrainStepRequest(images=images_msg(np.zeros((0, 1, 8, 8), np.float32)),
                                            labels=tensor(np.zeros(0, np.int64))),
                        "images: the batch is empty"),
        "no images at all": (pb.TrainStepRequest(labels=tensor(labels)),
                             "images: none given (set images.tensor or images.encoded)"),
        "no labels": (pb.TrainStepRequest(images=good_images), "labels: none given (an INT64 tensor [batch])"),
        "batch over maximum": (pb.TrainStepRequest(images=images_msg(np.zeros((33, 1, 8, 8), np.float32)),
                                                   labels=tensor(np.zeros(33, np.int64))),
                               "images: batch of 33 is over the maximum of 32"),
    }


BAD = _bad_requests()


def assert_details(details: str, case: str) -> None:
    """The server's message is BAD[case]'s exactly; an undecodable image's adds PIL's reason after a colon."""
    message = BAD[case][1]
    assert message in details
    if case == "undecodable image":
        assert details.startswith(message + ": "), details
    else:
        assert details == message


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_train_step_is_rejected_and_changes_nothing(running, case):
    request, message = BAD[case]
    before = running.engine.parameters()
    with pytest.raises(grpc.RpcError) as err:
        running.stub.TrainStep(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()
    assert_details(err.value.details(), case)
    assert running.engine.step == 0
    after = running.engine.parameters()
    assert all(np.array_equal(before[n], after[n]) for n in before)
    # the server is still up and trains normally afterwards
    images, labels = batch(4)
    assert running.stub.TrainStep(train_request(images, labels)).step == 1


@pytest.mark.parametrize("case", ["wrong shape", "wrong dtype", "byte length", "undecodable image", "non-finite pixels",
                                  "empty batch", "batch over maximum"])
def test_bad_predict_is_rejected(running, case):
    request, message = BAD[case]
    with pytest.raises(grpc.RpcError) as err:
        running.stub.Predict(pb.PredictRequest(images=request.images))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()
    assert_details(err.value.details(), case)


def test_predict_calls_run_concurrently_with_training(running):
    """Many Predict calls in flight alongside train steps: all answer, each with its own rows, while all three
    train steps are still in flight (the training engine's lock is held until the Predicts are done), so
    Predict never waits for training."""
    from concurrent.futures import ThreadPoolExecutor

    images, labels = batch(16, seed=9)
    expected = running.plane.registry.model().latest.engine.logits(images)

    def predict(i):
        r = running.stub.Predict(pb.PredictRequest(images=images_msg(images[i:i + 1]), return_logits=True))
        return np.frombuffer(r.logits.data, dtype="<f4")

    training = running.engine._lock  # one train step at a time: while held, steps wait in flight
    with ThreadPoolExecutor(8) as pool:
        training.acquire()
        try:
            steps = [pool.submit(running.stub.TrainStep, train_request(images, labels, omit_gradient_summaries=True))
                     for _ in range(3)]
            wait_for(lambda: running.trainer.queued == 3, what="3 TrainSteps in the data plane")
            rows = list(pool.map(predict, range(16), timeout=60))  # a Predict that waited for training times out
            assert [s.done() for s in steps] == [False] * 3  # every Predict answered with all 3 steps in flight
            assert running.engine.step == 0
        finally:
            training.release()
    assert sorted(s.result().step for s in steps) == [1, 2, 3]
    np.testing.assert_allclose(np.stack(rows), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # making the test image
def test_an_image_too_large_to_decode_is_refused_before_decoding(running):
    big = io.BytesIO()
    Image.new("L", (4097, 4096)).save(big, format="PNG")  # 16.8 M pixels, a few KB compressed
    with pytest.raises(grpc.RpcError) as err:
        running.stub.Predict(pb.PredictRequest(images=pb.Images(encoded=pb.EncodedImages(images=[big.getvalue()]))))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == "image 0: larger than 16777216 pixels"
