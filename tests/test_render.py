"""The CLI's renderer (client/render.py, and render_training.py for train-step and grads) without a server: the
exact text of each result, its JSON document, the exit status of `health`, and the gradient-flow figure's grouping
by block and sublayer."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import client.__main__ as cli_main
from client import (
    ClassScore,
    GradientSummary,
    LinearSchedule,
    ModelInfo,
    ModelVersion,
    OptimizerState,
    ParameterInfo,
    Prediction,
    PredictResult,
    Preprocessing,
    QkvGradient,
    TrainStepResult,
    ViTClient,
)
from client.plots import _gradient_groups
from client.render import Health, Predictions, document, render, text
from client.render_training import GradientPlot, TrainSteps


def gradient(name, shape, l2, nonfinite=0, block=-1, sublayer="other") -> GradientSummary:
    return GradientSummary(name, shape, l2, 0.0, 0.1, -1.0, 1.0, 0.5, 0.25, nonfinite, 3.0, 1e-3, block, sublayer)


def train_step(step=8, **overrides) -> TrainStepResult:
    values = dict(loss=2.3456, step=step, learning_rate=0.0005, grad_norm=1.2345, step_seconds=0.0123,
                  gradients=[gradient("w1", (4, 4), 0.5), gradient("b1", (4,), 0.25, nonfinite=2),
                             gradient("s", (), 2.0)],
                  attention=[QkvGradient("qkv", 0, 2, 8, 0.1, 0.2, 0.3, (0.01, 0.02), (0.03, 0.04), (0.05, 0.06))],
                  clip_coefficient=0.5)
    return TrainStepResult(**{**values, **overrides})


MODEL_INFO = ModelInfo(
    name="digits", config_json='{"dim": 64}', input_name="images", input_shape=(-1, 1, 8, 8), input_dtype="FLOAT32",
    preprocessing=Preprocessing(height=8, width=8, channels=1, mean=(0.485,), std=(0.229,)),
    class_names=[str(i) for i in range(12)],
    parameters=[ParameterInfo("a", (3, 4), True, 0, "feedforward"), ParameterInfo("b", (1000,), False, -1, "head")],
    execution_providers=["CPUExecutionProvider"], device="cpu", opset=17, optimizer="adamw", step=7,
    learning_rate=0.0005, max_batch_size=64, export_versions={}, loss_node="loss",
    loss_op_type="SoftmaxCrossEntropyLoss", model_version=1,
    versions=[ModelVersion(0, 0, 0.0), ModelVersion(1, 7, 0.0)], checkpoint_every_steps=100,
    checkpoint_every_seconds=90.0, trainer="ort", onnxruntime_version="1.31.1")

# The text these results printed before the renderer was split out of client/__main__.py.
INFO_TEXT = """\
model           digits
device          cpu (CPUExecutionProvider)
trainer         ort on onnxruntime 1.31.1
input           images [-1, 1, 8, 8] FLOAT32
preprocessing   8x8, bilinear, 1 channel(s), mean [0.485], std [0.229]
classes         12 (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, ...)
parameters      2 tensors, 1,012 elements
trainable       1 tensors, 12 elements
step            7
learning rate   0.0005
optimizer       adamw
loss node       loss (SoftmaxCrossEntropyLoss)
opset           17
max batch       64
model version   1 (Predict)
versions        0 (step 0), 1 (step 7)
auto checkpoint every 100 steps, every 90 s
auto publish    off
"""
STEP_TEXT = "step {step}  loss 2.3456  lr 0.0005  grad-norm 1.234  clipped x0.5  (12.3 ms)  applied\n"
SUMMARIES_TEXT = """
top 2 of 3 parameters by gradient L2 norm
  parameter  shape     grad L2     max|g|  zero %  update ratio
  s          scalar  2.000e+00  5.000e-01    25.0     1.000e-03
  w1         4x4     5.000e-01  5.000e-01    25.0     1.000e-03
warning: non-finite gradients in 1 parameter(s): b1

attention q/k/v gradients
  block 0  q ||g|| 1.000e-01  k ||g|| 2.000e-01  v ||g|| 3.000e-01  (2 heads x 8)
    q heads  1.000e-02  2.000e-02
    k heads  3.000e-02  4.000e-02
    v heads  5.000e-02  6.000e-02
"""
OPTIMIZER_TEXT = """\
optimizer       adamw
learning rate   0.0002 (next step)
schedule        linear warmup 0 -> 0.002 over 10 steps, decay to 1e-05 over 100 steps (position 3)
clipping        global gradient norm 1
step            8
accumulated     2 batch(es) pending
"""
PREDICT_TEXT = "x.png\n  three   75.0%\n  ten     12.5%\n  logits [ 0.5  -1.25]\n(model version 2)\n"


def printed(capsys, result, as_json=False) -> str:
    render(result, as_json)
    return capsys.readouterr().out


def test_info_text(capsys):
    assert printed(capsys, MODEL_INFO) == INFO_TEXT


def test_info_text_names_a_checkpoints_resize_and_crop(capsys):
    pre = Preprocessing(height=224, width=224, channels=3, mean=(0.5,) * 3, std=(0.5,) * 3, resize_shorter=248,
                        interpolation="bicubic")
    rows = printed(capsys, dataclasses.replace(MODEL_INFO, preprocessing=pre)).splitlines()
    assert rows[4] == ("preprocessing   224x224 (shorter side to 248, centre crop), bicubic, 3 channel(s), "
                       "mean [0.5, 0.5, 0.5], std [0.5, 0.5, 0.5]")


def test_train_steps_text(capsys):
    steps = TrainSteps(iter([train_step(8), train_step(9)]), summaries=True, top=2)
    assert printed(capsys, steps) == STEP_TEXT.format(step=8) + STEP_TEXT.format(step=9) + SUMMARIES_TEXT
    quiet = TrainSteps(iter([train_step(8)]), summaries=False, top=2)
    assert printed(capsys, quiet) == STEP_TEXT.format(step=8)


def test_train_steps_print_as_they_run(capsys):
    """A step that fails leaves the lines of the steps before it on stdout (text) and nothing half-written (JSON)."""
    def steps():
        yield train_step(8)
        raise RuntimeError("the second step failed")

    with pytest.raises(RuntimeError):
        render(TrainSteps(steps(), summaries=True, top=2), as_json=False)
    assert capsys.readouterr().out == STEP_TEXT.format(step=8)
    with pytest.raises(RuntimeError):
        render(TrainSteps(steps(), summaries=True, top=2), as_json=True)
    assert capsys.readouterr().out == ""


def test_optimizer_and_predict_text(capsys):
    state = OptimizerState("adamw", 0.0002, LinearSchedule(0.002, 10, 100, 1e-5), 3, 1.0, 8, 2)
    assert printed(capsys, state) == OPTIMIZER_TEXT
    result = PredictResult([Prediction([ClassScore(3, "three", 0.75), ClassScore(10, "ten", 0.125)])],
                           np.array([[0.5, -1.25]], np.float32), 2)
    assert printed(capsys, Predictions(["x.png"], result)) == PREDICT_TEXT


def test_json_documents(capsys):
    assert json.loads(printed(capsys, MODEL_INFO, as_json=True))["parameters"][1] == {
        "name": "b", "shape": [1000], "trainable": False, "block": -1, "sublayer": "head"}
    one = json.loads(printed(capsys, TrainSteps(iter([train_step(8)]), True, 10), as_json=True))
    assert one["step"] == 8 and one["gradients"][0]["sublayer"] == "other"  # one step: one object
    several = json.loads(printed(capsys, TrainSteps(iter([train_step(8), train_step(9)]), True, 10), as_json=True))
    assert [s["step"] for s in several] == [8, 9]  # --repeat: a list
    assert json.loads(printed(capsys, Health("SERVING"), as_json=True)) == {"status": "SERVING"}
    plot = json.loads(printed(capsys, GradientPlot("flow.png", train_step()), as_json=True))
    assert plot["plot"] == "flow.png" and plot["step"]["step"] == 8
    result = PredictResult([Prediction([ClassScore(3, "three", 0.75)])], None, 2)
    assert document(Predictions(["x.png"], result)) == result.as_dict() == {
        "predictions": [[[3, "three", 0.75]]], "logits": None, "model_version": 2}


def test_every_command_result_has_text():
    """Whatever a CLI command returns (its return annotation) has a text renderer of its own; anything else is a
    TypeError naming the type, never a silent blank."""
    import typing

    from client.__main__ import COMMANDS

    fallback = text.dispatch(object)
    for name, command in COMMANDS.items():
        answer = typing.get_type_hints(command)["return"]
        for result_type in typing.get_args(answer) or (answer,):
            assert text.dispatch(result_type) is not fallback, f"{name} returns a {result_type.__name__} with no text"
    with pytest.raises(TypeError, match="no text for a object"):
        text(object())


@pytest.mark.parametrize("status, code", [("SERVING", 0), ("NOT_SERVING", 1), ("SERVICE_UNKNOWN", 1)])
def test_health_exit_status(monkeypatch, capsys, status, code):
    monkeypatch.setattr(ViTClient, "health", lambda self, service="": status)
    assert cli_main.main(["--address", "127.0.0.1:1", "health"]) == code
    assert capsys.readouterr().out == status + "\n"


def test_gradient_flow_groups_by_block_and_sublayer():
    """Bars come from each gradient's block and sublayer and the qkv split; names play no part."""
    gradients = [
        gradient("p0", (1, 5, 8), 3.0, sublayer="embedding"),
        gradient("p1", (8, 4), 4.0, sublayer="embedding"),
        gradient("p2", (24, 8), 99.0, block=0, sublayer="attention.qkv"),  # drawn as q, k, v instead
        gradient("p3", (8,), 1.0, block=0, sublayer="attention.norm"),
        gradient("p4", (8, 8), 2.0, block=0, sublayer="attention.out"),
        gradient("p5", (8,), 1.0, block=0, sublayer="feedforward.norm"),
        gradient("p6", (16, 8), 6.0, block=0, sublayer="feedforward"),
        gradient("p7", (16,), 8.0, block=0, sublayer="feedforward"),
        gradient("p8", (8,), 5.0, sublayer="head.norm"),
        gradient("p9", (10, 8), 7.0, sublayer="head"),
        gradient("p10", (3,), 50.0, sublayer="other"),  # not drawn
    ]
    attention = [QkvGradient("p2", 0, 2, 4, 0.1, 0.2, 0.3, (), (), ())]
    groups = _gradient_groups(train_step(gradients=gradients, attention=attention))
    assert list(groups) == ["embedding", "block 0", "head"]
    assert groups["embedding"] == {"embedding": 5.0}
    assert groups["block 0"] == pytest.approx({"q": 0.1, "k": 0.2, "v": 0.3, "norm": 2 ** 0.5, "out": 2.0,
                                               "ff": 10.0})
    assert groups["head"] == {"norm": 5.0, "head": 7.0}
