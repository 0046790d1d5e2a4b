"""`python -m engine.store.triton`: the Triton model repository it writes, run as the CLI (no Triton server here)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from google.protobuf import text_format
from onnx import numpy_helper
from tritonclient.grpc import model_config_pb2 as mc

from server.config import Settings
from engine.manifest import ATTRIBUTION_MODEL, INFERENCE_MODEL, Manifest, sha256
from tests.helpers import REPO



def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine.store.triton", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=60)


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under folder (hidden ones included): relative path -> (bytes, mtime_ns)."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))
            if p.is_file()}


def logits(model: Path, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images})[0]


def graph_io(model: Path) -> tuple[onnx.ValueInfoProto, onnx.ValueInfoProto]:
    graph = onnx.load(str(model)).graph
    initializers = {i.name for i in graph.initializer}
    (inp,) = [i for i in graph.input if i.name not in initializers]
    (out,) = graph.output
    return inp, out


def dims(value: onnx.ValueInfoProto) -> list:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim]


@pytest.fixture(scope="module")
def repo(exported, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """(the repository folder, the CLI run that wrote it with the defaults)."""
    out = tmp_path_factory.mktemp("triton") / "model_repository"
    run = cli("--artifacts", exported[0], "--out", out)
    assert run.returncode == 0, run.stderr
    return out, run


def test_layout(repo, exported):
    out, run = repo
    manifest = Manifest.load(exported[0])
    assert manifest.name == "digits4"
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert files == ["digits4", "digits4/1", "digits4/1/meta.json", "digits4/1/model.onnx",
                     f"digits4/{ATTRIBUTION_MODEL}", "digits4/config.pbtxt", "digits4/labels.txt", "digits4/manifest.json"]
    assert (out / "digits4" / ATTRIBUTION_MODEL).read_bytes() == manifest.path(ATTRIBUTION_MODEL).read_bytes()
    assert (out / "digits4/1/model.onnx").read_bytes() == manifest.path(INFERENCE_MODEL).read_bytes()
    assert (out / "digits4/labels.txt").read_text().splitlines() == [str(i) for i in range(10)]
    assert run.stdout.startswith(f"wrote {out / 'digits4'}: config.pbtxt, labels.txt, 1/model.onnx")
    assert f"tritonserver --model-repository={out}" in run.stdout


def test_config_matches_manifest_and_graph(repo, exported):
    out, _ = repo
    manifest = Manifest.load(exported[0])
    config = text_format.Parse((out / "digits4/config.pbtxt").read_text(), mc.ModelConfig())
    assert config.name == "digits4"
    assert config.platform == "onnxruntime_onnx" and config.backend == "onnxruntime"
    assert config.max_batch_size == Settings().max_batch_size == 256
    assert config.version_policy.WhichOneof("policy_choice") == "latest"
    assert config.version_policy.latest.num_versions == 1
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [("images", mc.TYPE_FP32, [1, 8, 8])]
    assert [(o.name, o.data_type, list(o.dims), o.label_filename) for o in config.output] == [
        ("logits", mc.TYPE_FP32, [10], "labels.txt")]
    assert config.HasField("dynamic_batching")
    assert config.dynamic_batching.max_queue_delay_microseconds == 100
    assert [(g.count, g.kind) for g in config.instance_group] == [(1, mc.ModelInstanceGroup.KIND_CPU)]

    # The graph Triton will load has exactly those tensors, plus a dynamic batch axis in front.
    inp, outp = graph_io(out / "digits4/1/model.onnx")
    assert (inp.name, outp.name) == (manifest.input_name, manifest.output_name) == ("images", "logits")
    assert inp.type.tensor_type.elem_type == outp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert dims(inp) == ["batch", *config.input[0].dims] and dims(outp) == ["batch", *config.output[0].dims]
    assert list(config.input[0].dims) == list(manifest.input_shape[1:])


def test_contrib_ops_are_named(repo, exported):
    graph = onnx.load(str(repo[0] / "digits4/1/model.onnx")).graph
    fused = sum(n.domain == "com.microsoft" and n.op_type == "MultiHeadAttention" for n in graph.node)
    assert fused == 4  # the export fuses each block's attention (engine/graph/fusion.py)
    assert "com.microsoft.MultiHeadAttention x4" in repo[1].stdout
    assert "Triton's onnxruntime backend runs them" in repo[1].stdout


@pytest.mark.parametrize("n", [3, 1])
def test_same_logits_as_artifacts(repo, exported, n):
    images = np.random.default_rng(n).standard_normal((n, 1, 8, 8), dtype=np.float32)
    got = logits(repo[0] / "digits4/1/model.onnx", images)
    expected = logits(exported[0] / INFERENCE_MODEL, images)
    assert got.shape == (n, 10)
    np.testing.assert_array_equal(got, expected)


def test_existing_repository_needs_force(exported, tmp_path):
    out = tmp_path / "repo"
    assert cli("--artifacts", exported[0], "--out", out).returncode == 0
    before = snapshot(out)
    again = cli("--artifacts", exported[0], "--out", out, "--max-batch-size", 8)
    assert again.returncode == 1 and again.stdout == ""
    assert again.stderr == f"error: {out / 'digits4'} already exists: pass --force to replace it " \
                           "(config.pbtxt, labels.txt, version 1)\n"
    assert snapshot(out) == before

    forced = cli("--artifacts", exported[0], "--out", out, "--max-batch-size", 8, "--gpu", "--force")
    assert forced.returncode == 0, forced.stderr
    config = text_format.Parse((out / "digits4/config.pbtxt").read_text(), mc.ModelConfig())
    assert config.max_batch_size == 8
    assert [(g.count, g.kind) for g in config.instance_group] == [(1, mc.ModelInstanceGroup.KIND_GPU)]
    assert sorted(p.name for p in out.iterdir()) == ["digits4"]  # no temporaries or old copies left


@pytest.mark.parametrize("args, message", [
    (["--artifacts", "{tmp}/missing"], "error: {tmp}/missing/manifest.json not found: run `make export` "
                                       "(or python -m model.export) first"),
    (["--max-batch-size", "0"], "error: --max-batch-size must be at least 1, got 0"),
    (["--model", "{tmp}/none.onnx"], "error: {tmp}/none.onnx is not a file"),
])
def test_bad_input_is_one_line_and_exit_1(exported, tmp_path, args, message):
    args = [a.format(tmp=tmp_path) for a in args]
    if "--artifacts" not in args:
        args += ["--artifacts", str(exported[0])]
    run = cli(*args, "--out", tmp_path / "repo")
    assert (run.returncode, run.stdout, run.stderr) == (1, "", message.format(tmp=tmp_path) + "\n")
    assert not (tmp_path / "repo").exists()


def test_model_flag_copies_that_model(repo, exported, tmp_path):
    """A fine-tuned version (here: the export with the classifier bias moved) goes into the repository instead."""
    proto = onnx.load(str(exported[0] / INFERENCE_MODEL))
    bias = next(i for i in proto.graph.initializer if i.name == "mlp_head.1.bias")
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + np.arange(10, dtype=np.float32), bias.name))
    tuned = tmp_path / "v000001" / "inference.onnx"
    tuned.parent.mkdir()
    onnx.save(proto, str(tuned))

    out = tmp_path / "repo"
    run = cli("--artifacts", exported[0], "--out", out, "--model", tuned)
    assert run.returncode == 0, run.stderr
    copied = out / "digits4/1/model.onnx"
    assert sha256(copied) == sha256(tuned) != sha256(exported[0] / INFERENCE_MODEL)
    assert f"# 1/model.onnx: {tuned} (sha256 {sha256(tuned)})" in (out / "digits4/config.pbtxt").read_text()
    images = np.random.default_rng(0).standard_normal((2, 1, 8, 8), dtype=np.float32)
    np.testing.assert_allclose(logits(copied, images) - logits(exported[0] / INFERENCE_MODEL, images),
                               np.tile(np.arange(10, dtype=np.float32), (2, 1)), atol=1e-5)


def test_model_without_dynamic_batch_or_with_other_names_is_refused(exported, tmp_path):
    proto = onnx.load(str(exported[0] / INFERENCE_MODEL))
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 3  # a static batch of 3
    static = tmp_path / "static.onnx"
    onnx.save(proto, str(static))
    run = cli("--artifacts", exported[0], "--out", tmp_path / "repo", "--model", static)
    assert (run.returncode, run.stderr) == (1, f"error: {static}: input 'images' has no dynamic batch axis (shape "
                                               "[3, 1, 8, 8]); Triton's batching (max_batch_size > 0) needs one: "
                                               "re-export the model\n")

    proto = onnx.load(str(exported[0] / INFERENCE_MODEL))
    proto.graph.output[0].name = "scores"
    for node in proto.graph.node:
        node.output[:] = ["scores" if o == "logits" else o for o in node.output]
    renamed = tmp_path / "renamed.onnx"
    onnx.save(proto, str(renamed))
    run = cli("--artifacts", exported[0], "--out", tmp_path / "repo", "--model", renamed)
    assert (run.returncode, run.stderr) == (1, f"error: {renamed} has no output named 'logits' (the manifest's); "
                                               "it has ['scores']\n")
    assert not (tmp_path / "repo").exists()


def test_no_torch():
    code = "import sys, engine.store.triton; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=60).returncode == 0
