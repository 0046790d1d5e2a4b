"""Gradient history: GetGradientHistory over a real server, and the TensorBoard events read back with tensorboard."""
from __future__ import annotations

import math

import grpc
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from proto import vitserve_pb2 as pb
from tests.helpers import TRAINERS, batch, images_msg, tensor


def step(stub, seed: int, **flags) -> pb.TrainStepResponse:
    images, labels = batch(8, seed=seed)
    return stub.TrainStep(pb.TrainStepRequest(images=images_msg(images), labels=tensor(labels), **flags))


@pytest.mark.parametrize("trainer", TRAINERS)
def test_history_keeps_the_last_applied_steps_as_train_step_answered_them(serve, trainer):
    server = serve(gradient_history=3)
    answers = [step(server.stub, seed) for seed in range(4)]
    step(server.stub, 9, accumulate_only=True)  # not applied: not history
    answers.append(step(server.stub, 5))
    history = server.stub.GetGradientHistory(pb.GradientHistoryRequest())
    assert history.capacity == 3
    assert [s.step for s in history.steps] == [3, 4, 5]
    assert list(history.steps) == answers[2:]  # field for field what TrainStep returned

    only = server.stub.GetGradientHistory(pb.GradientHistoryRequest(first_step=4, last_step=4))
    assert [s.step for s in only.steps] == [4]
    assert [s.step for s in server.stub.GetGradientHistory(pb.GradientHistoryRequest(first_step=5)).steps] == [5]
    assert [s.step for s in server.stub.GetGradientHistory(pb.GradientHistoryRequest(last_step=3)).steps] == [3]


def test_history_filters_parameters_by_pattern(serve):
    server = serve()
    full = step(server.stub, 0)
    history = server.stub.GetGradientHistory(pb.GradientHistoryRequest(parameter="*.to_qkv.weight"))
    (kept,) = history.steps
    assert [g.name for g in kept.gradients] == [g.name for g in full.gradients if g.name.endswith(".to_qkv.weight")]
    assert len(kept.gradients) == 4 and list(kept.attention) == list(full.attention)
    none = server.stub.GetGradientHistory(pb.GradientHistoryRequest(parameter="mlp_head.*")).steps[0]
    assert {g.sublayer for g in none.gradients} == {"head", "head.norm"} and list(none.attention) == []
    assert kept.loss == full.loss and kept.step == full.step


def test_a_bad_step_range_is_invalid_argument_and_history_off_keeps_nothing(serve):
    server = serve(gradient_history=0)
    step(server.stub, 0)
    with pytest.raises(grpc.RpcError) as e:
        server.stub.GetGradientHistory(pb.GradientHistoryRequest(first_step=5, last_step=2))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details() == ("step range [5, 2] is not valid: give 0 <= first_step <= last_step "
                                 "(0 leaves a side open)")
    history = server.stub.GetGradientHistory(pb.GradientHistoryRequest())
    assert history.capacity == 0 and list(history.steps) == []


@pytest.mark.parametrize("trainer", TRAINERS)
def test_tensorboard_events_equal_the_train_step_answers(serve, tmp_path, trainer):
    board = tmp_path / "tb"
    server = serve(tensorboard_dir=str(board), tensorboard_histogram_every=2)
    answers = [step(server.stub, seed, head_importance=seed == 2) for seed in range(4)]
    server.stop()  # closes the writer: every event is on disk

    events = EventAccumulator(str(board), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()

    def series(tag: str) -> dict[int, float]:
        return {e.step: e.value for e in events.Scalars(tag)}

    assert series("loss") == pytest.approx({a.step: a.loss for a in answers}, rel=1e-6)
    assert series("learning_rate") == pytest.approx({a.step: a.learning_rate for a in answers}, rel=1e-6)
    assert series("grad_norm") == pytest.approx({a.step: a.grad_norm for a in answers}, rel=1e-6)
    first = answers[0].attention[1]
    assert series("attention/block1/k")[1] == pytest.approx(first.k_norm, rel=1e-6)
    assert series("attention/block1/v_head3")[1] == pytest.approx(first.v_head_norms[3], rel=1e-6)
    name = answers[0].gradients[5].name
    ratios = {a.step: next(g.update_ratio for g in a.gradients if g.name == name) for a in answers}
    assert math.isinf(ratios[1])  # a zero-initialised bias moved: +Inf, which TensorBoard does not get
    assert series(f"update_ratio/{name}") == pytest.approx({s: r for s, r in ratios.items() if s > 1}, rel=1e-6)
    scored = answers[2]
    assert len(scored.head_importance) == 4
    assert series("head_importance/block2/head1") == pytest.approx({3: scored.head_importance[2].importance[1]},
                                                                   rel=1e-6)

    histograms = events.Histograms(f"gradient/{name}")
    assert [h.step for h in histograms] == [2, 4]  # every 2nd applied step
    for h in histograms:
        summary = next(g for g in answers[h.step - 1].gradients if g.name == name)
        assert h.histogram_value.num == math.prod(summary.shape)
        assert math.sqrt(h.histogram_value.sum_squares) == pytest.approx(summary.l2_norm, rel=1e-5)
        assert h.histogram_value.max == pytest.approx(summary.max, rel=1e-6)
    assert np.isfinite([a.loss for a in answers]).all()
