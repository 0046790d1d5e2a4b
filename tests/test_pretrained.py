"""Export from pretrained checkpoints (`python -m model.export --pretrained`): Hugging Face folders, timm, the seed's
layout and vit-pytorch from state_dict files; a new head (--num-classes), class names (--labels, --labels-from),
the checkpoint's own preprocessing, the load report, and one EXPORT FAILED line for every checkpoint that does not fit.

Every checkpoint is written here, by `save_pretrained` / `safetensors.torch.save_file` / `torch.save`, from small
randomly initialised models of the real packages. The oracle for the logits is the package's own loader
(`from_pretrained`, `load_state_dict`) on the same file.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file as load_torch
from safetensors.torch import save_file

from engine.manifest import INFERENCE_MODEL, WEIGHTS, Manifest
from model import export as exporter
from model.recipes import hugging_face_recipe, timm_recipe
from model.vit import PRESETS, build
from tests import layout_models as lm
from tests.torchvision_shim import import_timm

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
HF_MODEL = "transformers:ViTForImageClassification"
HF_CONFIG = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=64)
TIMM_MODEL = "timm:vit_tiny_patch16_224"
TIMM_KWARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 5}
LOGITS_RTOL = 1e-5  # relative to the largest |logit|


def hf_checkpoint(folder: Path, seed: int = 0, labels=("cat", "dog", "emu", "fox"), head: bool = True) -> Path:
    """A tiny ViTForImageClassification (or, head=False, a bare ViTModel) saved as the Hub has it, with a
    preprocessor_config.json: shorter side to 36, centre crop 32, bicubic, ImageNet mean/std."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor, ViTModel

    torch.manual_seed(seed)
    config = ViTConfig(**HF_CONFIG, num_labels=len(labels), id2label=dict(enumerate(labels)),
                       label2id={name: i for i, name in enumerate(labels)})
    (ViTForImageClassification if head else ViTModel)(config).save_pretrained(folder)
    ViTImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}, do_center_crop=True,
                      resample=3, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]
                      ).save_pretrained(folder)
    return folder


def timm_model(**overrides) -> torch.nn.Module:
    import_timm()
    import timm

    return timm.create_model(TIMM_MODEL.removeprefix("timm:"), pretrained=False, **{**TIMM_KWARGS, **overrides})


def onnx_logits(folder: Path, images: np.ndarray) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(folder / INFERENCE_MODEL), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": images})[0]


def assert_same_logits(folder: Path, reference: torch.nn.Module, channels: int, size: int) -> float:
    """ONNX Runtime's logits of the export equal the reference PyTorch model's to LOGITS_RTOL; returns the error."""
    images = np.random.default_rng(7).standard_normal((3, channels, size, size), dtype=np.float32)
    reference.eval()
    with torch.no_grad():
        expected = reference(torch.from_numpy(images))
    expected = (expected.logits if hasattr(expected, "logits") else expected).numpy()
    error = float(np.abs(onnx_logits(folder, images) - expected).max() / np.abs(expected).max())
    assert error < LOGITS_RTOL, error
    return error


def export_failed(capsys, argv: list[str]) -> str:
    """The one line an export that cannot be done prints (exit 1, no traceback)."""
    capsys.readouterr()  # what writing the checkpoint printed
    assert exporter.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.removeprefix("EXPORT FAILED: ").rstrip("\n")


# ---------------------------------------------------------------- exports, compared with the packages' own loaders

def test_cli_exports_a_hugging_face_folder_with_a_new_head_and_the_classes_of_an_image_folder(tmp_path):
    """End to end as a user runs it: a save_pretrained folder, --num-classes, --labels-from an ImageFolder."""
    from transformers import ViTForImageClassification

    checkpoint = hf_checkpoint(tmp_path / "hf")
    data = tmp_path / "photos"
    for name in ("zebra", "ant", "moth", ".cache"):
        (data / name).mkdir(parents=True)
    (data / "notes.txt").write_text("not a class")
    result = subprocess.run([sys.executable, "-m", "model.export", "--pretrained", str(checkpoint), "--model", HF_MODEL,
                             "--num-classes", "3", "--labels-from", str(data), "--seed", "4", "--name", "photos",
                             "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # transformers' load report and progress bars are the export's own lines instead
    assert result.stdout.splitlines()[:5] == [
        f"loaded 38 tensors from {checkpoint}",
        "  new (initialised here, not loaded): classifier.weight, classifier.bias",
        "  unused (checkpoint tensors not loaded): classifier.weight, classifier.bias",
        "  preprocessing from preprocessor_config.json: 32x32 (shorter side to 36, centre crop), bicubic, "
        "mean [0.485, 0.456, 0.406], std [0.229, 0.224, 0.225]",
        f"exported photos to {tmp_path / 'out' / 'photos'} in " + result.stdout.splitlines()[4].rpartition(" in ")[2],
    ]
    manifest = Manifest.load(tmp_path / "out" / "photos")
    assert manifest.class_names == ("ant", "moth", "zebra") and manifest.output.shape == (-1, 3)
    pre = manifest.preprocessing
    assert (pre.height, pre.width, pre.resize_shorter, pre.interpolation) == (32, 32, 36, "bicubic")
    assert pre.mean == pytest.approx((0.485, 0.456, 0.406)) and pre.std == pytest.approx((0.229, 0.224, 0.225))
    assert manifest.source["num_classes"] == 3
    assert manifest.source["pretrained"] == {"checkpoint": str(checkpoint), "loaded": 38,
                                             "new": ["classifier.weight", "classifier.bias"],
                                             "unused": ["classifier.weight", "classifier.bias"],
                                             "preprocessing": "preprocessor_config.json"}
    # transformers renames the saved tensors on loading (vit.encoder.layer.0.attention.attention.key -> ...k_proj):
    # the checkpoint's tensors under the model's names are from_pretrained's
    saved = ViTForImageClassification.from_pretrained(checkpoint, local_files_only=True).state_dict()
    exported = load_numpy(manifest.path(WEIGHTS))
    backbone = [n for n in saved if not n.startswith("classifier.")]
    assert len(backbone) == 38 and all(np.array_equal(exported[n], saved[n].numpy()) for n in backbone)
    assert exported["classifier.weight"].shape == (3, 32) and exported["classifier.bias"].shape == (3,)
    torch.manual_seed(4)  # the new head is --seed's
    assert np.array_equal(exported["classifier.weight"], torch.nn.Linear(32, 3).weight.detach().numpy())


def test_a_hugging_face_export_gives_from_pretrained_logits_and_names(tmp_path, capsys):
    from transformers import ViTForImageClassification

    checkpoint = hf_checkpoint(tmp_path / "hf", seed=1)
    assert exporter.main(["--pretrained", str(checkpoint), "--out", str(tmp_path)]) == 0  # the class from config.json
    folder = tmp_path / "vitforimageclassification"
    manifest = Manifest.load(folder)
    assert manifest.class_names == ("cat", "dog", "emu", "fox")  # config.id2label
    assert manifest.source["model"] == HF_MODEL and manifest.source["pretrained"]["new"] == []
    assert_same_logits(folder, ViTForImageClassification.from_pretrained(checkpoint, local_files_only=True), 3, 32)


def test_a_timm_safetensors_file_gives_timms_logits_and_its_pretrained_cfg(tmp_path, capsys):
    torch.manual_seed(2)
    save_file(timm_model().state_dict(), tmp_path / "model.safetensors")
    assert exporter.main(["--model", TIMM_MODEL, "--kwargs", json.dumps(TIMM_KWARGS), "--pretrained",
                          str(tmp_path / "model.safetensors"), "--out", str(tmp_path), "--name", "tiny"]) == 0
    manifest = Manifest.load(tmp_path / "tiny")
    pre = manifest.preprocessing  # vit_tiny_patch16_224's: crop_pct 0.9, bicubic, mean = std = 0.5
    assert (pre.height, pre.resize_shorter, pre.interpolation, pre.mean) == (32, 35, "bicubic", (0.5,) * 3)
    assert manifest.source["pretrained"]["preprocessing"] == "timm pretrained_cfg"
    reference = timm_model()
    reference.load_state_dict(load_torch(tmp_path / "model.safetensors"))
    assert_same_logits(tmp_path / "tiny", reference, 3, 32)


def test_the_seeds_layout_from_a_bare_safetensors_file_with_a_new_head(tmp_path, capsys):
    torch.manual_seed(3)
    trained = build(PRESETS["digits"])
    save_file(trained.state_dict(), tmp_path / "digits.safetensors")
    (tmp_path / "labels.txt").write_text("yes\nno\nmaybe\n")
    assert exporter.main(["--preset", "digits", "--pretrained", str(tmp_path / "digits.safetensors"),
                          "--num-classes", "3", "--labels", str(tmp_path / "labels.txt"), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "new (initialised here, not loaded): mlp_head.1.weight, mlp_head.1.bias" in out  # the last nn.Linear of 10
    manifest = Manifest.load(tmp_path / "digits")
    assert manifest.class_names == ("yes", "no", "maybe")
    exported = load_numpy(manifest.path(WEIGHTS))
    for name, value in trained.state_dict().items():
        if not name.startswith("mlp_head.1."):
            np.testing.assert_array_equal(exported[name], value.numpy(), err_msg=name)
    assert exported["mlp_head.1.weight"].shape == (3, 64) and exported["mlp_head.1.bias"].shape == (3,)


def test_a_vit_pytorch_training_checkpoint_gives_its_logits(tmp_path, capsys):
    """A .pt holding {"state_dict": ..., "epoch": ...}, as training loops save them."""
    torch.manual_seed(5)
    trained = lm.vit_pytorch_vit()
    torch.save({"state_dict": trained.state_dict(), "epoch": 3}, tmp_path / "last.pt")
    kwargs = {"image_size": lm.SIZE, "patch_size": lm.PATCH, "num_classes": lm.CLASSES, "dim": lm.DIM,
              "depth": lm.DEPTH, "heads": lm.HEADS, "mlp_dim": 2 * lm.DIM, "dim_head": lm.DIM_HEAD}
    assert exporter.main(["--model", "vit_pytorch.vit:ViT", "--kwargs", json.dumps(kwargs), "--pretrained",
                          str(tmp_path / "last.pt"), "--out", str(tmp_path)]) == 0
    assert f"loaded {len(trained.state_dict())} tensors from {tmp_path / 'last.pt'}" in capsys.readouterr().out
    assert Manifest.load(tmp_path / "vit").class_names == tuple(f"class_{i}" for i in range(lm.CLASSES))
    assert_same_logits(tmp_path / "vit", trained, 3, lm.SIZE)


# ---------------------------------------------------------------- checkpoints that do not fit: one line each

def test_a_head_of_another_size_is_named_with_the_way_out(tmp_path, capsys):
    torch.manual_seed(0)
    save_file(timm_model().state_dict(), tmp_path / "model.safetensors")
    kwargs = json.dumps({**TIMM_KWARGS, "num_classes": 10})
    assert export_failed(capsys, ["--model", TIMM_MODEL, "--kwargs", kwargs, "--pretrained",
                                  str(tmp_path / "model.safetensors"), "--out", str(tmp_path)]) == (
        f"checkpoint {tmp_path / 'model.safetensors'} does not fit timm:vit_tiny_patch16_224: head.weight is [5, 32] in "
        "the checkpoint, [10, 32] in the model; head.bias is [5] in the checkpoint, [10] in the model "
        "(use --num-classes to replace the head)")
    assert list(tmp_path.iterdir()) == [tmp_path / "model.safetensors"]


def test_another_architectures_tensors_are_named(tmp_path, capsys):
    torch.manual_seed(0)
    save_file(timm_model().state_dict(), tmp_path / "timm.safetensors")
    assert export_failed(capsys, ["--preset", "digits", "--pretrained", str(tmp_path / "timm.safetensors"),
                                  "--out", str(tmp_path)]) == (
        f"checkpoint {tmp_path / 'timm.safetensors'} does not fit digits: pos_embedding is missing from the checkpoint; "
        "cls_token is [1, 1, 32] in the checkpoint, [1, 1, 64] in the model; to_patch_embedding.1.weight is missing "
        "from the checkpoint; and 49 more (the checkpoint has 31 tensors the model lacks, e.g. blocks.0.attn.proj.bias)")


def test_a_hugging_face_backbone_without_a_head_needs_num_classes(tmp_path, capsys):
    checkpoint = hf_checkpoint(tmp_path / "backbone", head=False)
    assert export_failed(capsys, ["--model", HF_MODEL, "--pretrained", str(checkpoint), "--out", str(tmp_path)]) == (
        f"checkpoint {checkpoint} does not fit {HF_MODEL}: classifier.weight is missing from the checkpoint; "
        "classifier.bias is missing from the checkpoint (use --num-classes to replace the head)")


def test_names_must_match_the_class_count(tmp_path, capsys):
    checkpoint = hf_checkpoint(tmp_path / "hf")
    (tmp_path / "data" / "a").mkdir(parents=True)
    (tmp_path / "data" / "b").mkdir()
    assert export_failed(capsys, ["--pretrained", str(checkpoint), "--labels-from", str(tmp_path / "data"),
                                  "--out", str(tmp_path)]) == (
        f"the model has 4 classes but --labels-from {tmp_path / 'data'} names 2 (--num-classes 2 gives it a new head)")
    (tmp_path / "names.txt").write_text("a\nb\na\nc\n")
    assert export_failed(capsys, ["--pretrained", str(checkpoint), "--labels", str(tmp_path / "names.txt"),
                                  "--out", str(tmp_path)]) == (
        f"--labels {tmp_path / 'names.txt'}: class names must be unique and not empty")


@pytest.mark.parametrize("name, content, message", [
    ("absent.safetensors", None, "--pretrained {path}: no such file or folder (nothing is downloaded: give a local path)"),
    ("broken.safetensors", b"not a safetensors file", "cannot read checkpoint {path}: "),
    ("weights.npz", b"", "--pretrained {path}: expected a Hugging Face folder or a .safetensors, .pt, .pth, .bin file"),
    ("list.pt", [1, 2], "checkpoint {path} holds no state_dict (a dict of tensor names to tensors)"),
])
def test_an_unreadable_checkpoint_is_one_line(tmp_path, capsys, name, content, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    assert export_failed(capsys, ["--preset", "digits", "--pretrained", str(path), "--out", str(tmp_path)]).startswith(
        message.format(path=path))


def test_the_export_never_replaces_the_checkpoints_own_folder(tmp_path, capsys):
    checkpoint = hf_checkpoint(tmp_path / "vit")
    assert export_failed(capsys, ["--pretrained", str(checkpoint), "--out", str(tmp_path), "--name", "vit"]) == (
        f"the export would replace {tmp_path / 'vit'}, which holds the checkpoint: give another --name or --out")
    assert (checkpoint / "model.safetensors").is_file()


def test_a_hub_name_is_not_downloaded(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert export_failed(capsys, ["--model", HF_MODEL, "--pretrained", "google/vit-base-patch16-224"]) == (
        "--pretrained google/vit-base-patch16-224: no such file or folder (nothing is downloaded: give a local path)")


# ---------------------------------------------------------------- the checkpoint's own preprocessing

def write_processor(folder: Path, **config) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "preprocessor_config.json").write_text(json.dumps(config))
    return folder


def test_hugging_face_resize_crop_and_normalisation(tmp_path):
    straight = hugging_face_recipe(write_processor(tmp_path / "a", size={"height": 224, "width": 224}, resample=2,
                                                   image_mean=[0.5] * 3, image_std=[0.5] * 3), 224)
    assert (straight.resize_shorter, straight.interpolation, straight.mean, straight.notes) == (0, "bilinear",
                                                                                                 (0.5,) * 3, ())
    cropped = hugging_face_recipe(write_processor(tmp_path / "b", size={"shortest_edge": 256}, do_center_crop=True,
                                                  crop_size={"height": 224, "width": 224}, resample=3), 224)
    assert (cropped.resize_shorter, cropped.interpolation, cropped.mean) == (256, "bicubic", None)
    at_half = hugging_face_recipe(tmp_path / "b", 112)  # the model takes smaller images: the crop fraction is kept
    assert at_half.resize_shorter == 128 and at_half.notes == (
        "it gives 224x224 images, the model takes 112x112: scaled to fit",)
    convnext = hugging_face_recipe(write_processor(tmp_path / "c", size={"shortest_edge": 224}, crop_pct=0.875), 224)
    assert convnext.resize_shorter == 256
    raw = hugging_face_recipe(write_processor(tmp_path / "d", size={"height": 8, "width": 8}, do_rescale=False,
                                              do_normalize=False, resample=4), 8)  # the model takes 0..255
    assert (raw.mean, raw.std, raw.interpolation) == ((0.0,), (1 / 255,), "bilinear")
    assert raw.notes == ("interpolation 'box' is not one of nearest, bilinear, bicubic, lanczos: bilinear instead",)
    assert hugging_face_recipe(tmp_path / "none", 8) is None


def test_timm_crop_pct_and_interpolation():
    cfg = {"input_size": (3, 224, 224), "interpolation": "bicubic", "crop_pct": 0.9, "crop_mode": "center",
           "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    recipe = timm_recipe(cfg, 224)
    assert (recipe.resize_shorter, recipe.interpolation, recipe.mean) == (248, "bicubic", (0.485, 0.456, 0.406))
    assert timm_recipe({**cfg, "crop_pct": 1.0}, 224).resize_shorter == 224
    squash = timm_recipe({**cfg, "crop_mode": "squash"}, 224)
    assert squash.resize_shorter == 0 and squash.notes == (
        "crop_mode 'squash' is not a centre crop: images are resized straight to 224x224",)


def test_a_manifest_from_before_the_resize_fields_loads_with_todays_resize(exported, tmp_path):
    import shutil

    copy = tmp_path / "old"
    shutil.copytree(exported[0], copy)
    raw = json.loads((copy / "manifest.json").read_text())
    for key in ("resize_shorter", "interpolation"):
        del raw["preprocessing"][key]
    (copy / "manifest.json").write_text(json.dumps(raw))
    pre = Manifest.load(copy).preprocessing
    assert (pre.resize_shorter, pre.interpolation) == (0, "bilinear")
