"""The CLI's training-lifecycle commands, as users run them: `python -m client` processes against a real
`python -m server` process on 127.0.0.1 with its data directory in tmp_path.

eval-step, train-step --accumulate, optimizer (show/set), checkpoint save/list/restore, publish (then predict),
explain (all parameters and one to_qkv weight in detail) and grads --plot.
"""
from __future__ import annotations

import json
import math
import re

import pytest
from PIL import Image

from tests.helpers import (
    NUM_PARAMS,
    assert_one_error_line,
    assert_printed,
    ok,
    run_client,
    start_server,
    text_rows,
    write_npz,
)

pytestmark = pytest.mark.slow

QKV = "transformer.layers.0.0.fn.to_qkv.weight"


@pytest.fixture(scope="module")
def server(exported, tmp_path_factory):
    """One `python -m server` process for this module, its data directory in a fresh temporary folder."""
    data_dir = tmp_path_factory.mktemp("data")
    process = start_server("--artifacts", str(exported[0]), "--host", "127.0.0.1", "--port", "0",
                           "--data-dir", str(data_dir))
    yield process
    process.stop()


@pytest.fixture
def cli(server):
    """cli(ARGS...) runs `python -m client --address <server> ARGS` and returns the CompletedProcess."""
    return lambda *args: run_client("--address", server.address, *args)


@pytest.fixture
def npz(tmp_path):
    return str(write_npz(tmp_path / "batch.npz", n=8, seed=5))


def as_json(result) -> dict | list:
    return json.loads(ok(result).stdout)


def current_step(cli) -> int:
    return as_json(cli("--json", "info"))["step"]


# ---------------------------------------------------------------- eval-step, train-step --accumulate

def test_eval_step_changes_nothing(cli, npz):
    before = current_step(cli)
    result = as_json(cli("--json", "eval-step", "--npz", npz))
    assert result["count"] == 8
    assert 0 <= result["correct"] <= 8
    assert result["accuracy"] == pytest.approx(result["correct"] / 8)
    assert math.isfinite(result["loss"]) and result["loss"] > 0
    assert result["step"] == before
    text = ok(cli("eval-step", "--npz", npz)).stdout
    assert "accuracy" in text and f"step {before}" in text
    match = re.fullmatch(r"step (\d+)  loss (\S+)  accuracy (\S+)% \((\d+)/(\d+)\)\n", text)
    assert match, text
    assert (int(match[1]), int(match[4]), int(match[5])) == (before, result["correct"], 8)
    assert_printed(match[2], result["loss"], noise=1e-6)
    assert match[3] == f"{result['accuracy'] * 100:.1f}"
    assert current_step(cli) == before


def test_eval_step_needs_labels_for_images(cli, tmp_path):
    line = assert_one_error_line(cli("eval-step", "--images", "examples/digits/000-0.png"), code=1)
    assert "--labels" in line, line
    assert line == "error: --images needs --labels, one class index per image"


def test_train_step_accumulate_then_apply(cli, npz):
    before = current_step(cli)
    pending = ok(cli("train-step", "--npz", npz, "--accumulate", "--no-summaries")).stdout
    assert "accumulated (1 batch)" in pending, pending
    assert current_step(cli) == before  # accumulating does not update the weights
    steps = as_json(cli("--json", "train-step", "--npz", npz, "--no-summaries"))
    assert steps["applied"] is True
    assert steps["accumulated_batches"] == 2
    assert steps["skipped_reason"] == ""
    assert steps["step"] == before + 1
    text = ok(cli("train-step", "--npz", npz, "--no-summaries")).stdout
    assert text.rstrip().endswith("applied"), text


# ---------------------------------------------------------------- optimizer

def test_optimizer_show_and_set(cli):
    shown = ok(cli("optimizer")).stdout
    assert "adamw" in shown and "learning rate" in shown
    state = as_json(cli("--json", "optimizer"))
    assert text_rows(shown) == {
        "optimizer": "adamw", "learning rate": f"{state['learning_rate']:.6g} (next step)",
        "schedule": "none (constant learning rate)", "clipping": "off", "step": str(state["step"]),
        "accumulated": f"{state['accumulated_batches']} batch(es) pending"}
    try:
        state = as_json(cli("--json", "optimizer", "--schedule", "0.002", "10", "100", "--end-lr", "1e-5",
                            "--clip", "1"))
        assert state["schedule"] == {"peak_lr": 0.002, "warmup_steps": 10, "decay_steps": 100, "end_lr": 1e-5}
        assert state["schedule_position"] == 0
        assert state["learning_rate"] == pytest.approx(0.002 * 1 / 10)  # warmup step 1 of 10
        assert state["clip_grad_norm"] == 1
        text = ok(cli("optimizer")).stdout
        assert "linear warmup" in text and "global gradient norm 1" in text, text

        state = as_json(cli("--json", "optimizer", "--lr", "5e-4"))
        assert state["schedule"] is None  # a constant rate clears the schedule ...
        assert state["learning_rate"] == pytest.approx(5e-4)
        assert state["clip_grad_norm"] == 1  # ... and leaves clipping as it was
        assert "none (constant learning rate)" in ok(cli("optimizer")).stdout
    finally:
        ok(cli("optimizer", "--lr", "1e-3", "--clip", "0"))
    assert as_json(cli("--json", "optimizer"))["clip_grad_norm"] == 0


def test_optimizer_usage_errors(cli):
    line = assert_one_error_line(cli("optimizer", "--end-lr", "0.1"), code=1)
    assert "--schedule" in line, line
    assert line == "error: --end-lr goes with --schedule"
    line = assert_one_error_line(cli("optimizer", "--schedule", "0.1", "ten", "5"), code=1)
    assert "WARMUP" in line, line
    assert line == "error: --schedule needs PEAK (a number) WARMUP DECAY (whole steps), got 0.1 ten 5"


# ---------------------------------------------------------------- checkpoints

def test_checkpoint_save_list_restore(cli, npz):
    saved = as_json(cli("--json", "checkpoint", "save", "before-steps"))
    assert saved["name"] == "before-steps" and saved["reason"] == "manual" and saved["size_bytes"] > 0
    ok(cli("train-step", "--npz", npz, "--repeat", "2", "--no-summaries"))
    assert current_step(cli) == saved["step"] + 2

    listing = as_json(cli("--json", "checkpoint", "list"))
    names = [c["name"] for c in listing["checkpoints"]]
    assert "before-steps" in names
    assert listing["latest"] == names[-1]
    assert "before-steps" in ok(cli("checkpoint", "list")).stdout

    restored = ok(cli("checkpoint", "restore", "before-steps")).stdout
    assert f"restored checkpoint before-steps: step {saved['step']}" in restored, restored
    assert current_step(cli) == saved["step"]


def test_checkpoint_save_default_name(cli):
    step = current_step(cli)
    text = ok(cli("checkpoint", "save")).stdout
    assert text.startswith("saved checkpoint manual-"), text
    assert f"step {step}" in text, text
    assert text.startswith(f"saved checkpoint manual-{step:08d}: step {step}, "), text


@pytest.mark.parametrize("name", ["bad name", ".hidden", "../escape", "x" * 65, "naïve"])
def test_checkpoint_invalid_name(cli, name):
    line = assert_one_error_line(cli("checkpoint", "save", name), code=1)
    assert line.startswith("error: INVALID_ARGUMENT"), line
    assert line == (f"error: INVALID_ARGUMENT: checkpoint name {name!r} is not valid: use 1-64 letters, digits, "
                    "'.', '_' or '-', starting with a letter or digit")


def test_checkpoint_unknown_name(cli):
    line = assert_one_error_line(cli("checkpoint", "restore", "no-such-checkpoint"), code=1)
    assert line.startswith("error: NOT_FOUND"), line
    assert "no-such-checkpoint" in line, line
    assert line == "error: NOT_FOUND: no checkpoint named 'no-such-checkpoint' (ListCheckpoints shows the saved ones)"


# ---------------------------------------------------------------- publish

def test_publish_then_predict_uses_new_version(cli, npz):
    old = as_json(cli("--json", "info"))["model_version"]
    ok(cli("train-step", "--npz", npz, "--no-summaries"))
    published = as_json(cli("--json", "publish"))
    assert published["version"] == old + 1
    assert published["step"] == current_step(cli)

    prediction = as_json(cli("--json", "predict", "examples/digits/003-3.png"))
    assert prediction["model_version"] == published["version"]
    assert f"(model version {published['version']})" in ok(cli("predict", "examples/digits/003-3.png")).stdout

    info = as_json(cli("--json", "info"))
    assert info["model_version"] == published["version"]
    assert [v["version"] for v in info["versions"]][-1] == published["version"]
    text = ok(cli("publish")).stdout
    assert text.startswith(f"published model version {published['version'] + 1}"), text


# ---------------------------------------------------------------- explain

def test_explain_all_parameters(cli, exported):
    text = ok(cli("explain")).stdout
    assert "`loss/Div` (Div)" in text  # the default trainer (ort): the last op of torch's cross-entropy
    assert f"{NUM_PARAMS} trainable parameters" in text
    for name in exported[1]:  # every parameter of the PyTorch state_dict has a row
        assert name in text, name
    explanation = as_json(cli("--json", "explain"))
    assert (explanation["loss"]["name"], explanation["loss"]["op_type"]) == ("loss/Div", "Div")
    assert explanation["loss_gradient"]["name"] == "backward/loss/Div"
    assert len(explanation["parameters"]) == NUM_PARAMS
    sublayers = {p["name"]: p["sublayer"] for p in explanation["parameters"]}
    assert sublayers[QKV] == "attention.qkv"


def test_explain_qkv_weight(cli):
    text = ok(cli("explain", "--parameter", QKV)).stdout
    assert "loss/Div" in text
    assert QKV in text
    for part in ("q", "k", "v"):
        assert f"       {part}: `" in text, text  # one line per part, naming its gradient node
    assert "q rows [0, 64), k rows [64, 128), v rows [128, 192)" in text

    detail = as_json(cli("--json", "explain", "--parameter", QKV))
    (parameter,) = detail["parameters"]
    assert parameter["name"] == QKV and parameter["block"] == 0
    assert [p["part"] for p in parameter["qkv_parts"]] == ["q", "k", "v"]
    assert all(p["gradient_node"]["name"] for p in parameter["qkv_parts"])
    path = parameter["path"]
    assert len(path) == parameter["ops_from_loss"]
    assert path[0]["name"] == detail["loss_gradient"]["name"]
    assert path[-1]["name"] == parameter["gradient_node"]["name"]
    for i, node in enumerate(path, 1):  # the text lists the same path, one node per line
        assert f"{i:>3}  {node['op_type']}" in text


def test_explain_unknown_parameter(cli):
    line = assert_one_error_line(cli("explain", "--parameter", "no.such.weight"), code=1)
    assert "no.such.weight" in line, line
    assert line == (f"error: NOT_FOUND: parameter 'no.such.weight' is not in this model; ExplainGradients knows "
                    f"{NUM_PARAMS} trainable parameters, e.g. pos_embedding")


# ---------------------------------------------------------------- grads --plot

def test_grads_plot_writes_png(cli, tmp_path, npz):
    before = current_step(cli)
    png = tmp_path / "flow.png"
    out = ok(cli("grads", "--plot", str(png), "--npz", npz)).stdout
    assert f"wrote {png}" in out
    assert current_step(cli) == before + 1  # it ran one real train step
    with Image.open(png) as image:
        assert image.format == "PNG"
        width, height = image.size
        assert width >= 600 and height >= 400, image.size
        image.verify()


def test_grads_plot_from_image_files(cli, tmp_path):
    png = tmp_path / "files.png"
    files = [f"examples/digits/00{i}-{i}.png" for i in range(4)]
    result = as_json(cli("--json", "grads", "--plot", str(png), "--images", *files, "--labels", "0", "1", "2", "3"))
    assert result["plot"] == str(png)
    assert len(result["step"]["attention"]) == 4
    with Image.open(png) as image:
        assert image.format == "PNG"
