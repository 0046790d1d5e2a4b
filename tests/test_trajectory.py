"""100 AdamW steps through the service against 100 PyTorch AdamW steps on the same weights and batches.

The single-step tests bound one update; this one bounds where a fine-tuning run ends up: whatever the
export or the engine does to the graph (fusions, kernels, the training engine in its own process), every
weight after 100 steps stays within 1e-4 of PyTorch's, relative to the weight tensor's norm.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from proto import vitserve_pb2 as pb
from tests.helpers import LEARNING_RATE, TRAINERS, batch, images_msg, tensor

pytestmark = pytest.mark.slow

STEPS = 100


@pytest.fixture(params=TRAINERS)
def trainer(request) -> str:
    return request.param


def test_100_adamw_steps_end_where_pytorch_ends(running, torch_model):
    optimizer = torch.optim.AdamW(torch_model.parameters(), lr=LEARNING_RATE, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=0.01)
    torch_model.train()
    losses = []
    for step in range(STEPS):
        images, labels = batch(16, seed=1000 + step)
        answer = running.stub.TrainStep(pb.TrainStepRequest(images=images_msg(images), labels=tensor(labels),
                                                             omit_gradient_summaries=True))
        optimizer.zero_grad()
        loss = F.cross_entropy(torch_model(torch.from_numpy(images)), torch.from_numpy(labels))
        loss.backward()
        optimizer.step()
        losses.append((answer.loss, float(loss.detach())))
    assert answer.step == STEPS
    ours, theirs = np.array(losses).T
    np.testing.assert_allclose(ours, theirs, rtol=1e-4)
    assert theirs[-10:].mean() < theirs[:10].mean()  # it trained: the comparison is of a moving model
    after = running.engine.parameters()
    for name, param in torch_model.named_parameters():
        expected = param.detach().numpy()
        relative = np.linalg.norm(after[name] - expected) / np.linalg.norm(expected)
        assert relative < 1e-4, f"{name}: {relative:.2e} from PyTorch's weights after {STEPS} steps"
