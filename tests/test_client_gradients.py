"""The client side of the gradient window against real servers on 127.0.0.1, for several ViT layouts.

The client methods (head_importance, gradient_history, train_step(head_importance=True)) return what the
server returned (raw stub calls are the oracle); the CLI's heads, history, train-step --heads, explain --plot
and grads --plot print text and JSON that agree with each other and with the RPCs, for the seed's fused
to_qkv, Hugging Face's separate q_proj/k_proj/v_proj and timm's fused qkv with a bias; the pictures are valid
PNG or SVG, the heatmap holds the RPC's numbers and the explain picture names the nodes ExplainGradients
named, drawn by graphviz's dot and by the matplotlib fallback; the gradient-flow figure is right for every
layout, a CNN without attention included.
"""
from __future__ import annotations

import fnmatch
import json
import math
import re
import shutil
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import grpc
import numpy as np
import pytest
from matplotlib.text import Text
from PIL import Image

from client import (
    ClientError,
    GradientHistory,
    HeadImportanceResult,
    TrainStepResult,
    ViTClient,
)
from client.graphs import (
    branches,
    draw_gradient_path,
    gradient_path_dot,
    gradient_path_figure,
    node_names,
)
from client.plots import (
    _gradient_groups,
    gradient_flow,
    gradient_flow_figure,
    gradient_history_figure,
    head_heatmap_figure,
    head_value,
)
from client.render import render
from client.render_training import History
from proto import vitserve_pb2 as pb
from proto import vitserve_pb2_grpc
from proto.convert import from_proto
from tests.helpers import (
    TRAINERS,
    assert_one_error_line,
    assert_printed,
    clean_env,
    images_msg,
    ok,
    run_client,
    start_server,
    tensor,
)
from tests.layout_models import CLASSES, DEPTH, HEADS, LAYOUTS, SIZE


@pytest.fixture(params=TRAINERS)
def trainer(request) -> str:
    """Every test of this file that serves in-process runs on both trainers, but the gradient-flow figure's."""
    return request.param


pytestmark = pytest.mark.slow

CLI_LAYOUTS = ["seed", "hugging-face", "timm"]  # fused without bias, separate with biases, fused with a bias
PATTERNS = {"seed": "*to_qkv.weight", "hugging-face": "*_proj.weight", "timm": "*attn.qkv.*"}
NO_DOT_PATH = str(Path(sys.executable).parent)  # the virtualenv's bin: python, no graphviz


# ---------------------------------------------------------------- models, batches, servers

@pytest.fixture(scope="module")
def folders(layout_exports):
    """folders(name) -> the artifact folder of layout `name` (or "cnn"), exported once per session."""
    return lambda name: layout_exports(name)[0]


def labelled_batch(n: int = 6, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 3, SIZE, SIZE), dtype=np.float32), rng.integers(0, CLASSES, n, dtype=np.int64)


class CliServer:
    """A `python -m server` process serving one layout, a batch file for it and a stub on its port."""

    def __init__(self, layout: str, folder: Path, npz: Path) -> None:
        self.layout, self.npz = layout, str(npz)
        self.process = start_server("--artifacts", str(folder), "--host", "127.0.0.1", "--port", "0")
        self.address = self.process.address
        self.channel = grpc.insecure_channel(self.address)
        self.stub = vitserve_pb2_grpc.VitServeStub(self.channel)

    def cli(self, *args: str, env: dict[str, str] | None = None):
        return run_client("--address", self.address, *args, env=env)

    def json(self, *args: str, env: dict[str, str] | None = None):
        return json.loads(ok(self.cli("--json", *args, env=env)).stdout)

    def text(self, *args: str, env: dict[str, str] | None = None) -> str:
        return ok(self.cli(*args, env=env)).stdout

    def stop(self) -> None:
        self.channel.close()
        self.process.stop()


@pytest.fixture(scope="module", params=CLI_LAYOUTS)
def server(request, folders, tmp_path_factory):
    images, labels = labelled_batch(8, seed=11)
    npz = tmp_path_factory.mktemp("batch") / "batch.npz"
    np.savez(npz, images=images, labels=labels)
    running = CliServer(request.param, folders(request.param), npz)
    yield running
    running.stop()


def svg_texts(path: Path) -> list[str]:
    """The text of every <text> element of an SVG, in document order (the file must parse as XML)."""
    root = ET.parse(path).getroot()
    assert root.tag.endswith("svg"), root.tag
    return ["".join(e.itertext()) for e in root.iter() if e.tag.rpartition("}")[2] == "text"]


def assert_png(path: Path, min_size: tuple[int, int] = (300, 200)) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size[0] >= min_size[0] and image.size[1] >= min_size[1], image.size
        image.verify()


def is_subsequence(wanted: list[str], seen: list[str]) -> bool:
    it = iter(seen)
    return all(any(w == s for s in it) for w in wanted)


# ---------------------------------------------------------------- the client methods against raw stub calls

@pytest.mark.parametrize("layout", CLI_LAYOUTS)
def test_client_methods_return_what_the_server_returned(layout, folders, serve):
    running = serve(artifacts=folders(layout))
    images, labels = labelled_batch()
    request = dict(images=images_msg(images), labels=tensor(labels))
    with ViTClient(running.address) as client:
        mine = client.head_importance(images, labels)
        raw = from_proto(HeadImportanceResult, running.stub.HeadImportance(pb.HeadImportanceRequest(**request)))
        assert mine.step == raw.step == 0
        assert [(h.block, h.module) for h in mine.heads] == [(h.block, h.module) for h in raw.heads]
        assert [h.block for h in raw.heads] == list(range(DEPTH))
        assert mine.loss == pytest.approx(raw.loss, rel=1e-6)
        np.testing.assert_allclose(mine.matrix(), raw.matrix(), rtol=1e-6)
        assert mine.matrix().shape == (DEPTH, HEADS)

        plain = client.train_step(images, labels)
        assert plain.head_importance == []
        gated = client.train_step(images, labels, head_importance=True)
        assert [h.block for h in gated.head_importance] == list(range(DEPTH))
        kept = running.stub.GetGradientHistory(pb.GradientHistoryRequest(first_step=2, last_step=2))
        assert gated.as_dict() == from_proto(TrainStepResult, kept.steps[0]).as_dict()  # the step the server kept

        pattern = PATTERNS[layout]
        history = client.gradient_history(1, 2, pattern)
        raw_history = running.stub.GetGradientHistory(
            pb.GradientHistoryRequest(first_step=1, last_step=2, parameter=pattern))
        assert history.as_dict() == from_proto(GradientHistory, raw_history).as_dict()
        assert [s.step for s in history.steps] == [1, 2] and history.capacity == 100
        assert history.parameters() and all(fnmatch.fnmatchcase(n, pattern) for n in history.parameters())
        assert len(history.steps[1].attention) == DEPTH
        assert [s.step for s in client.gradient_history().steps] == [1, 2]
        assert client.gradient_history(first_step=2).steps[0].as_dict() == gated.as_dict()

        client.train_step(images, labels, accumulate_only=True)
        with pytest.raises(ClientError) as refused:
            client.head_importance(images, labels)
        assert refused.value.code == "FAILED_PRECONDITION"
        with pytest.raises(ClientError) as bad:
            client.gradient_history(3, 1)
        assert bad.value.code == "INVALID_ARGUMENT"


def test_heatmap_holds_the_rpc_numbers(folders, serve):
    running = serve(artifacts=folders("hugging-face"))
    images, labels = labelled_batch()
    raw = running.stub.HeadImportance(pb.HeadImportanceRequest(images=images_msg(images), labels=tensor(labels)))
    result = from_proto(HeadImportanceResult, raw)
    fig = head_heatmap_figure(result)
    (ax, _colorbar) = fig.axes
    (image,) = ax.images
    np.testing.assert_array_equal(np.asarray(image.get_array()), [list(h.importance) for h in raw.heads])
    cells = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
    assert cells == {(b, h): head_value(v)
                     for b, scores in enumerate(raw.heads) for h, v in enumerate(scores.importance)}
    assert [t.get_text() for t in ax.get_yticklabels()] == [f"block {h.block}" for h in raw.heads]


# ---------------------------------------------------------------- heads

HEAD_ROW = re.compile(r"\s+(\d+)\s+(\S+)((?:\s+\S+)+)")


def head_rows(text: str, after: str) -> list[tuple[int, str, list[str]]]:
    """The rows of the head table printed after the line starting with `after`: (block, module, cells)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(after))
    header = lines[start + 1].split()
    assert header[:2] == ["block", "module"] and header[2:] == [x for h in range(HEADS) for x in ("head", str(h))]
    rows = []
    for line in lines[start + 2:start + 2 + DEPTH]:
        match = HEAD_ROW.fullmatch(line)
        assert match, line
        rows.append((int(match[1]), match[2], match[3].split()))
    return rows


def test_heads_text_json_and_heatmap(server, tmp_path):
    svg, png = tmp_path / "heads.svg", tmp_path / "heads.png"
    doc = server.json("heads", "--npz", server.npz, "--plot", str(svg))
    images, labels = np.load(server.npz)["images"], np.load(server.npz)["labels"]
    raw = server.stub.HeadImportance(pb.HeadImportanceRequest(images=images_msg(images), labels=tensor(labels)))
    assert doc["plot"] == str(svg) and doc["step"] == raw.step
    assert doc["loss"] == pytest.approx(raw.loss, rel=1e-6)
    assert [(h["block"], h["module"]) for h in doc["heads"]] == [(h.block, h.module) for h in raw.heads]
    np.testing.assert_allclose([h["importance"] for h in doc["heads"]], [list(h.importance) for h in raw.heads],
                               rtol=1e-5, atol=1e-9)
    # The heatmap the CLI wrote holds the numbers it printed, cell by cell in block and head order.
    texts = svg_texts(svg)
    assert is_subsequence([head_value(v) for h in doc["heads"] for v in h["importance"]], texts), texts
    assert {f"block {b}" for b in range(DEPTH)} | {f"head {h}" for h in range(HEADS)} <= set(texts)

    out = server.text("heads", "--npz", server.npz, "--plot", str(png))
    assert out.splitlines()[0].startswith(f"head importance |dL/d xi_h| at step {raw.step}  loss ")
    assert out.splitlines()[0].endswith(f"({DEPTH} attention modules x {HEADS} heads)")
    assert out.splitlines()[-1] == f"wrote {png}"
    rows = head_rows(out, "head importance")
    assert [(b, m) for b, m, _ in rows] == [(h["block"], h["module"]) for h in doc["heads"]]
    for (_, _, cells), h in zip(rows, doc["heads"]):
        for cell, value in zip(cells, h["importance"], strict=True):
            assert_printed(cell, value, noise=1e-5)
    assert_png(png)


def test_train_step_heads_prints_them_after_the_attention_rows(server):
    before = server.json("heads", "--npz", server.npz)
    step = server.json("train-step", "--npz", server.npz, "--heads")
    assert step["applied"] and [h["block"] for h in step["head_importance"]] == list(range(DEPTH))
    for got, want in zip(step["head_importance"], before["heads"]):  # the step's are those of the weights before it
        assert got["module"] == want["module"]
        np.testing.assert_allclose(got["importance"], want["importance"], rtol=1e-5, atol=1e-9)

    out = server.text("train-step", "--npz", server.npz, "--heads")
    number = int(re.match(r"step (\d+) ", out)[1])
    lines = out.splitlines()
    attention, heads = lines.index("attention q/k/v gradients"), lines.index(
        "head importance |dL/d xi_h| (the weights before the update)")
    assert attention < heads and sum(line.startswith("  block ") for line in lines[attention:heads]) == DEPTH
    (kept,) = server.json("history", "--from", str(number), "--to", str(number))["steps"]
    for (block, module, cells), h in zip(head_rows(out, "head importance"), kept["head_importance"], strict=True):
        assert (block, module) == (h["block"], h["module"])
        for cell, value in zip(cells, h["importance"], strict=True):
            assert_printed(cell, value, noise=0)
    assert "head importance" not in server.text("train-step", "--npz", server.npz)


# ---------------------------------------------------------------- history

def test_history_text_json_and_plot(server, tmp_path):
    steps = server.json("train-step", "--npz", server.npz, "--repeat", "2")
    first, last = steps[0]["step"], steps[1]["step"]
    pattern = PATTERNS[server.layout]
    doc = server.json("history", "--from", str(first), "--to", str(last), "--parameter", pattern)
    assert doc["capacity"] == 100 and [s["step"] for s in doc["steps"]] == [first, last]
    for kept, ran in zip(doc["steps"], steps):
        wanted = [g for g in ran["gradients"] if fnmatch.fnmatchcase(g["name"], pattern)]
        assert wanted and kept["gradients"] == wanted  # the summaries TrainStep returned, filtered
        assert kept["attention"] == ran["attention"] and len(kept["attention"]) == DEPTH
        assert (kept["loss"], kept["grad_norm"]) == (ran["loss"], ran["grad_norm"])
    names = [g["name"] for g in doc["steps"][0]["gradients"]]

    png = tmp_path / "history.png"
    out = server.text("history", "--from", str(first), "--to", str(last), "--parameter", pattern, "--plot", str(png))
    lines = out.splitlines()
    assert lines[0] == f"2 kept steps, {first} to {last} (the server keeps the last 100 applied steps)"
    assert lines[1] == f"gradient L2 norms of the {len(names)} parameters matching {pattern!r}:"
    assert lines[2:2 + len(names)] == [f"  [{i}] {n}" for i, n in enumerate(names, 1)]
    header = lines[2 + len(names)].split()
    assert header == ["step", "loss", "lr", "grad", "norm", *[f"[{i}]" for i in range(1, len(names) + 1)]]
    for line, kept in zip(lines[3 + len(names):5 + len(names)], doc["steps"], strict=True):
        cells = line.split()
        assert int(cells[0]) == kept["step"]
        assert_printed(cells[1], kept["loss"], noise=0)
        assert_printed(cells[2], kept["learning_rate"], noise=0)
        assert_printed(cells[3], kept["grad_norm"], noise=0)
        for cell, g in zip(cells[4:], kept["gradients"], strict=True):
            assert_printed(cell, g["l2_norm"], noise=0)
    biases = bool(doc["steps"][0]["attention"][0]["biases"])
    title = "q/k/v gradient L2 norms of their attention modules" + (" (weights, then biases)" if biases else "")
    start = lines.index(title)
    rows = lines[start + 2:start + 2 + 2 * DEPTH]
    assert lines[start + 1].split() == ["step", "block", "q", "k", "v", *(["q", "bias", "k", "bias", "v", "bias"]
                                                                            if biases else [])]
    entries = [(s["step"], a) for s in doc["steps"] for a in s["attention"]]
    for line, (number, a) in zip(rows, entries, strict=True):
        cells = line.split()
        assert (int(cells[0]), int(cells[1])) == (number, a["block"])
        values = [a["q_norm"], a["k_norm"], a["v_norm"]]
        values += [a["q_bias_norm"], a["k_bias_norm"], a["v_bias_norm"]] if biases else []
        for cell, value in zip(cells[2:], values, strict=True):
            assert_printed(cell, value, noise=0)
    assert lines[-1] == f"wrote {png}"
    assert_png(png, (600, 400))

    svg = tmp_path / "history.svg"
    plotted = server.json("history", "--parameter", pattern, "--plot", str(svg))
    assert plotted["plot"] == str(svg)
    texts = svg_texts(svg)
    assert set(names) <= set(texts)  # the legend names every matched parameter
    assert {f"block {b} {p}" for b in range(DEPTH) for p in "qkv"} <= set(texts)  # and each block's q, k, v

    everything = server.text("history", "--from", str(last))
    assert everything.splitlines()[-1] == \
        "(--parameter PATTERN adds the gradient L2 norms of the matching parameters and their q/k/v)"
    none = server.text("history", "--from", str(last + 1000))
    assert none == "no kept steps in that range (the server keeps the last 100 applied steps)\n"


# ---------------------------------------------------------------- explain --plot

def explained_names(doc: dict) -> list[str]:
    """The names of the nodes ExplainGradients reported for the one parameter of `doc`."""
    (p,) = doc["parameters"]
    names = [doc["loss"]["name"], doc["loss_gradient"]["name"], *[n["name"] for n in p["path"]],
             p["gradient_node"]["name"], *[q["gradient_node"]["name"] for q in p["qkv_parts"]]]
    return list(dict.fromkeys(names))


def attention_parameters(server: CliServer) -> tuple[str, str]:
    """Block 0's first q/k/v weight and the last block's last bias (weight when there is none)."""
    attention = server.json("info")["attention"]
    return attention[0]["weights"][0], (attention[-1]["biases"] or attention[-1]["weights"])[-1]


@pytest.mark.parametrize("renderer", ["graphviz", "matplotlib"])
def test_explain_plot_names_every_node(server, tmp_path, renderer):
    if renderer == "graphviz" and shutil.which("dot") is None:
        pytest.skip("graphviz's dot is not installed")
    env = clean_env() if renderer == "graphviz" else clean_env(PATH=NO_DOT_PATH)
    assert shutil.which("dot", path=env["PATH"]) is None or renderer == "graphviz"
    weight, bias = attention_parameters(server)
    drawn = "graphviz dot" if renderer == "graphviz" else "matplotlib: graphviz's dot is not on PATH"

    svg = tmp_path / "path.svg"
    doc = server.json("explain", "--parameter", weight, "--plot", str(svg), env=env)
    assert (doc["plot"], doc["renderer"]) == (str(svg), renderer)
    names = explained_names(doc)
    assert doc["plotted_nodes"][0] == doc["loss"]["name"] and set(doc["plotted_nodes"]) == set(names)
    text = "\n".join(svg_texts(svg))
    for name in names:
        assert name in text, name
    (p,) = doc["parameters"]
    fused = server.layout != "hugging-face"
    assert [q["part"] for q in p["qkv_parts"]] == (["q", "k", "v"] if fused else ["q"])
    for part in p["qkv_parts"]:
        assert f"{part['part']} gradient ({part['gradient_tensor']})" in text

    png = tmp_path / "bias.png"
    out = server.text("explain", "--parameter", bias, "--plot", str(png), env=env)
    assert out.splitlines()[-1] == f"wrote {png} ({drawn})"
    assert f"parameter {bias}  [" in out
    marks = [line for line in out.splitlines() if re.search(r"  <- [qkv] gradient$", line)]
    assert len(marks) == 1, out  # the path runs through one part's gradient node, marked in the listing
    if server.layout == "seed":
        assert "q rows [0, 32), k rows [32, 64), v rows [64, 96)" in out  # a fused weight, its rows
    elif server.layout == "timm":
        assert "the gradient of the fused q/k/v bias" in out and "q [0, 32), k [32, 64), v [64, 96)" in out
    else:
        assert "the gradient of the v projection's bias" in out and "the bias's gradient is v's alone" in out
    assert_png(png)


def test_explain_plot_failures_are_one_error_line(server, tmp_path):
    weight, _ = attention_parameters(server)
    line = assert_one_error_line(server.cli("explain", "--plot", str(tmp_path / "x.svg")), code=1)
    assert line == "error: --plot draws one parameter's path: give --parameter NAME"
    line = assert_one_error_line(server.cli("explain", "--parameter", weight, "--plot", "x.jpg"), code=1)
    assert line == "error: --plot x.jpg: the picture must be a .png or .svg file"
    line = assert_one_error_line(server.cli("heads", "--npz", server.npz, "--plot", "x.pdf"), code=1)
    assert line == "error: --plot x.pdf: the picture must be a .png or .svg file"
    line = assert_one_error_line(server.cli("history", "--from", "3", "--to", "1"), code=1)
    assert line == ("error: INVALID_ARGUMENT: step range [3, 1] is not valid: give 0 <= first_step <= last_step "
                    "(0 leaves a side open)")
    assert not list(tmp_path.iterdir())


def test_heads_while_accumulating_is_one_error_line(server):
    ok(server.cli("train-step", "--npz", server.npz, "--accumulate"))
    line = assert_one_error_line(server.cli("heads", "--npz", server.npz), code=1)
    assert line == ("error: FAILED_PRECONDITION: 1 batches of gradients are being accumulated; apply them with a "
                    "TrainStep before asking for head importance")
    assert server.json("train-step", "--npz", server.npz)["accumulated_batches"] == 2  # applies them


@pytest.mark.parametrize("layout", CLI_LAYOUTS)
def test_explain_picture_in_process(layout, folders, serve, tmp_path, trainer):
    """The DOT source and the matplotlib figure name every node; q/k/v parts are on the path or join it."""
    running = serve(artifacts=folders(layout))
    with ViTClient(running.address) as client:
        attention = client.model_info().attention
        names = [*attention[0].weights[:1], *attention[0].biases[-1:]]
        for name in names:
            e = client.explain(name)
            p = e.parameter(name)
            wanted = node_names(e, p)
            assert e.loss.name in wanted and [n.name for n in p.path] == wanted[1:1 + len(p.path)]
            source = gradient_path_dot(e, p)
            for node in wanted:
                assert json.dumps(node)[1:-1] in source, node  # DOT escapes these names as JSON does
            texts = "\n".join(t.get_text() for t in gradient_path_figure(e, p).findobj(Text))
            for node in wanted:
                assert node in texts, node
            placed = branches(p)
            if attention[0].fused:
                assert [b.part.part for b in placed] == ["q", "k", "v"]
                (on,) = [b for b in placed if b.on_path is not None]  # the shortest path runs through one part
                for b in placed:
                    if b.on_path is None:  # the others join where the fused output's gradient is assembled:
                        joins = p.path[b.joins]
                        assert b.joins > on.on_path, (b, on)
                        if trainer == "ort-training":  # the Split's gradient, a Concat, reads them (model/rewrite.py)
                            assert b.part.gradient_tensor in joins.inputs and joins.op_type == "Concat", joins
            else:
                (b,) = placed
                assert b.on_path is not None and p.path[b.on_path].name == b.part.gradient_node.name
            for renderer in (["graphviz"] if shutil.which("dot") else []) + ["matplotlib"]:
                picture = draw_gradient_path(e, name, tmp_path / f"{renderer}.png", renderer=renderer)
                assert (picture.renderer, picture.nodes) == (renderer, wanted)
                assert_png(picture.path)


# ---------------------------------------------------------------- grads --plot, every layout

def test_grads_plot_cli(server, tmp_path):
    svg, png = tmp_path / "flow.svg", tmp_path / "flow.png"
    doc = server.json("grads", "--npz", server.npz, "--plot", str(svg))
    assert doc["plot"] == str(svg) and len(doc["step"]["attention"]) == DEPTH
    texts = set(svg_texts(svg))
    assert {"embedding", "head", *[f"block {b}" for b in range(DEPTH)]} <= texts
    assert {"q projection", "k projection", "v projection"} <= texts
    out = server.text("grads", "--npz", server.npz, "--plot", str(png))
    assert out.splitlines()[-1] == f"wrote {png}"
    assert_png(png, (600, 400))


@pytest.mark.parametrize("trainer", ["ort"])  # the client's drawing of the summaries (test_layouts checks those
@pytest.mark.parametrize("layout", [*LAYOUTS, "cnn"])  # against autograd, test_trainers the trainers side by side)
def test_gradient_flow_figure_for_every_layout(layout, folders, serve, tmp_path):
    running = serve(artifacts=folders(layout))
    with ViTClient(running.address) as client:
        result = client.train_step(*labelled_batch())
    groups = _gradient_groups(result)
    by_name = {g.name: g.l2_norm for g in result.gradients}
    if layout == "cnn":
        assert groups == {} and result.attention == []
        fig = gradient_flow_figure(result)
        assert len(fig.axes[0].patches) == len(result.gradients) > 0  # one bar per parameter
        assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == [g.name for g in result.gradients]
    else:
        assert list(groups) == ["embedding", *[f"block {b}" for b in range(DEPTH)], "head"]
        assert len(result.attention) == DEPTH
        for a in result.attention:
            bars = groups[f"block {a.block}"]
            assert "qkv" not in bars and {"q", "k", "v", "out", "ff", "norm"} <= set(bars)
            for i, part in enumerate("qkv"):
                weight, bias = getattr(a, f"{part}_norm"), getattr(a, f"{part}_bias_norm")
                assert bars[part] == pytest.approx(math.hypot(weight, bias), rel=1e-12)
                if len(set(a.weights)) == 3:  # separate projections: each has its own summaries
                    own = [by_name[a.weights[i]], *([by_name[a.biases[i]]] if a.biases else [])]
                    assert bars[part] == pytest.approx(math.hypot(*own), rel=1e-5)
            if len(set(a.weights)) == 1:  # fused: q, k and v together are the projection's weight gradient
                assert math.hypot(a.q_norm, a.k_norm, a.v_norm) == pytest.approx(by_name[a.weights[0]], rel=1e-5)
            assert bool(a.biases) == LAYOUTS[layout][2]
            if a.biases:
                assert a.q_bias_norm > 0 and bars["q"] > a.q_norm
    for suffix in ("png", "svg"):
        written = gradient_flow(result, tmp_path / f"flow.{suffix}")
        if suffix == "png":
            assert_png(written, (600, 400))
        else:
            assert svg_texts(written)


def test_history_of_a_server_that_keeps_none(folders, serve, capsys):
    running = serve(artifacts=folders("seed"), gradient_history=0)
    with ViTClient(running.address) as client:
        client.train_step(*labelled_batch())
        history = client.gradient_history()
    assert (history.steps, history.capacity) == ([], 0)
    render(History(history, "*"), as_json=False)
    assert capsys.readouterr().out == "the server keeps no gradient history (it runs with --gradient-history 0)\n"
    render(History(history, "*"), as_json=True)
    assert json.loads(capsys.readouterr().out) == {"steps": [], "capacity": 0}
    with pytest.raises(ValueError, match="no kept steps to plot"):
        gradient_history_figure(history)
