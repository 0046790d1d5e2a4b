"""The model repository a fleet shares, in Triton's layout: a trainer writes it, predict replicas (and Triton) read it.

    <repo>/<model>/config.pbtxt        Triton's ModelConfig (engine/store/triton.py builds it; version_policy says how
                                       many versions replicas serve)
    <repo>/<model>/labels.txt          the class names, one a line (the output's label_filename)
    <repo>/<model>/manifest.json       the export's manifest: what a replica needs to decode and describe the model
    <repo>/<model>/<version>/model.onnx   the inference graph of a published version (1, 2, ...)
    <repo>/<model>/<version>/meta.json    version, training step, time, and every file's size and sha256

Triton reads config.pbtxt, labels.txt and <version>/model.onnx and ignores the rest (non-numeric folders
and other files). Everything appears whole or not at all: a new model folder (with its first version)
and every later version folder are built under a temporary name and renamed into place after fsync
(engine/store/files.py's AtomicDirs); config.pbtxt, labels.txt and manifest.json are replaced by rename.
Readers never write: `read_model` looks at a folder as it is and says what is wrong with each part.
No torch, no grpc.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import text_format

from engine.errors import ConfigError
from engine.manifest import ATTRIBUTION_MODEL, MANIFEST, Manifest, sha256
from engine.store.files import META, NAME, AtomicDirs, describe_os_error, fsync_path
from proto import model_config_pb2 as mc

CONFIG_FILE = "config.pbtxt"
LABELS_FILE = "labels.txt"
MODEL_FILE = "model.onnx"


def signature(manifest: Manifest) -> tuple:
    """What requests depend on: a model folder may only be taken over by an export with the same one."""
    return (manifest.input, manifest.output, manifest.class_names, manifest.preprocessing)


def labels_text(manifest: Manifest) -> str:
    return "".join(f"{n}\n" for n in manifest.class_names)


def config_text(config: mc.ModelConfig, header: str = "") -> str:
    return header + text_format.MessageToString(config)


def write_model_files(folder: Path, manifest: Manifest, config: mc.ModelConfig, header: str = "") -> None:
    """config.pbtxt, labels.txt and manifest.json of a model folder (each replaced atomically if it exists), and
    the export's attribution graph, so that replicas answer Attribute too (Triton ignores the extra file)."""
    for name, text in ((CONFIG_FILE, config_text(config, header)), (LABELS_FILE, labels_text(manifest)),
                       (MANIFEST, json.dumps(manifest.to_dict(), indent=2))):
        replace_file(folder / name, text)
    source = manifest.path(ATTRIBUTION_MODEL)
    if manifest.attribution is not None and source.is_file():
        replace_file(folder / ATTRIBUTION_MODEL, source.read_bytes())


def replace_file(path: Path, content: str | bytes) -> None:
    """Write `path` under a temporary name, fsync it and rename it over the old one: never half written."""
    tmp = path.with_name(f".write-{path.name}-{uuid.uuid4().hex[:8]}")  # a file: not an AtomicDirs .tmp- entry
    try:
        with open(tmp, "wb" if isinstance(content, bytes) else "w") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_version_files(folder: Path, source: Path, version: int, step: int, created_unix: float) -> None:
    """<version>/model.onnx (a copy of `source`) and its meta.json (the checksums a reader verifies)."""
    shutil.copyfile(source, folder / MODEL_FILE)
    model = folder / MODEL_FILE
    meta = {"version": version, "step": step, "created_unix": created_unix,
            "size_bytes": model.stat().st_size,
            "files": {MODEL_FILE: {"size": model.stat().st_size, "sha256": sha256(model)}}}
    (folder / META).write_text(json.dumps(meta))


# -- reading ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VersionFolder:
    """One <model>/<version>/ folder as found."""
    version: int
    path: Path
    step: int  # from meta.json (0 without one)
    created_unix: float
    fingerprint: tuple  # changes when the folder's files change
    problem: str  # what is wrong, from cheap checks ("" when it looks whole)

    @property
    def model(self) -> Path:
        return self.path / MODEL_FILE

    def verify(self) -> str:
        """Every file's sha256 against meta.json ("" when intact or when there is no meta.json to check with)."""
        meta = _meta(self.path)
        for name, expected in ((meta or {}).get("files") or {}).items():
            if sha256(self.path / name) != expected.get("sha256"):
                return f"{name} does not match the sha256 in {META} (its bytes changed)"
        return ""


@dataclass(frozen=True)
class ModelFolder:
    """One <model>/ folder as found: its manifest and configuration (or what is wrong with them) and versions."""
    name: str
    path: Path
    manifest: Manifest | None
    config: mc.ModelConfig | None
    fingerprint: tuple  # of manifest.json and config.pbtxt: a change reloads the model
    problem: str  # why the model cannot be served at all ("" when manifest and configuration are fine)
    versions: tuple[VersionFolder, ...] = field(default=())  # ascending

    @property
    def policy(self) -> mc.ModelVersionPolicy:
        """config.pbtxt's version_policy (Triton's default, the latest one, without a configuration)."""
        return self.config.version_policy if self.config is not None else mc.ModelVersionPolicy()

    def wanted(self) -> list[VersionFolder]:
        """The versions its version_policy asks for, newest first (with `latest`, every version: the follower
        keeps the newest `latest_count()` that load)."""
        present = sorted(self.versions, key=lambda v: -v.version)
        if self.policy.WhichOneof("policy_choice") == "specific":
            return [v for v in present if v.version in set(self.policy.specific.versions)]
        return present

    def latest_count(self) -> int | None:
        """num_versions of a `latest` policy (1 by default); None for `all` and `specific`."""
        kind = self.policy.WhichOneof("policy_choice")
        if kind in ("all", "specific"):
            return None
        return max(1, self.policy.latest.num_versions) if kind == "latest" else 1


def model_names(root: Path) -> list[str]:
    """The model folders of a repository (Triton's rule: every subfolder whose name is not hidden)."""
    try:
        return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as e:
        raise ConfigError(f"model repository {root} cannot be read: {describe_os_error(e)}") from None


def read_model(path: Path) -> ModelFolder:
    """A model folder as it is, never raising for what is inside it."""
    fingerprint = tuple(_stamp(path / name) for name in (MANIFEST, CONFIG_FILE))
    manifest = config = None
    problem = ""
    try:
        manifest = Manifest.load(path, files=())
    except ConfigError as e:
        problem = f"{MANIFEST}: {e}" if (path / MANIFEST).is_file() else (
            f"it has no {MANIFEST} (vitserve replicas need the export's manifest: publish it from a trainer with "
            "--model-repository, or write the folder with python -m engine.store.triton)")
    if not problem:
        try:
            config = text_format.Parse((path / CONFIG_FILE).read_text(), mc.ModelConfig())
        except OSError as e:
            problem = f"{CONFIG_FILE} cannot be read: {describe_os_error(e)}"
        except text_format.ParseError as e:
            problem = f"{CONFIG_FILE} is not a ModelConfig: {e}"
    if not problem and config.name and config.name != path.name:
        problem = f"{CONFIG_FILE} names the model {config.name!r}, but its folder is {path.name!r} (Triton refuses that)"
    versions = []
    try:
        children = list(path.iterdir())
    except OSError as e:
        return ModelFolder(path.name, path, manifest, config, fingerprint, f"cannot be listed: {describe_os_error(e)}")
    for child in children:
        if child.is_dir() and child.name.isdigit() and int(child.name) > 0:
            versions.append(_read_version(child))
    return ModelFolder(path.name, path, manifest, config, fingerprint, problem,
                       tuple(sorted(versions, key=lambda v: v.version)))


def _read_version(path: Path) -> VersionFolder:
    meta = _meta(path)
    model = path / MODEL_FILE
    fingerprint = (_stamp(model), _stamp(path / META))
    step, created = 0, model.stat().st_mtime if model.is_file() else 0.0
    problem = ""
    if not model.is_file():
        problem = f"{MODEL_FILE} is missing"
    elif meta is False:
        problem = f"{META} cannot be read"
    elif meta is not None:
        step, created = int(meta.get("step", 0)), float(meta.get("created_unix", created))
        for name, expected in (meta.get("files") or {}).items():
            size = (path / name).stat().st_size if (path / name).is_file() else None
            if size != expected.get("size"):
                problem = f"{name} has {size} bytes, {expected.get('size')} were written"
                break
    return VersionFolder(int(path.name), path, step, created, fingerprint, problem)


def _meta(path: Path) -> dict | None | bool:
    """meta.json as a dict, None when there is none, False when it cannot be read."""
    try:
        meta = json.loads((path / META).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return False
    return meta if isinstance(meta, dict) else False


def _stamp(path: Path) -> tuple:
    try:
        s = path.stat()
    except OSError:
        return ()
    return (s.st_size, s.st_mtime_ns, s.st_ino)


# -- writing (the trainer) ----------------------------------------------------------------------------

class RepositoryWriter:
    """A trainer's side of the repository: its one model's folder, and a new version folder per Publish."""

    def __init__(self, root: Path, manifest: Manifest, config: mc.ModelConfig):
        if not NAME.fullmatch(manifest.name):
            raise ConfigError(f"model name {manifest.name!r} cannot name a folder of the model repository")
        self.root, self.manifest, self.config = Path(root), manifest, config
        self.folder = self.root / manifest.name
        try:
            self._top = AtomicDirs(self.root)  # finishes or drops what a crashed write left behind
        except OSError as e:
            raise ConfigError(f"model repository {self.root} cannot be written: {describe_os_error(e)}") from None
        if self.folder.is_dir():
            found = read_model(self.folder)
            if found.manifest is not None and signature(found.manifest) != signature(manifest):
                raise ConfigError(f"model repository {self.root} already holds a different model named "
                                  f"{manifest.name!r} (other inputs, outputs or classes): use another "
                                  "--model-repository, or remove that folder")
            AtomicDirs(self.folder)  # recovery of version folders
            try:
                write_model_files(self.folder, manifest, config, self._header())
            except OSError as e:
                raise ConfigError(f"model repository {self.folder} cannot be written: {describe_os_error(e)}") \
                    from None

    def _header(self) -> str:
        return f"# Triton model configuration of {self.manifest.name}, written by a vitserve trainer\n"

    def versions(self) -> list[int]:
        return [v.version for v in read_model(self.folder).versions] if self.folder.is_dir() else []

    def publish(self, source: Path, version: int, step: int, created_unix: float | None = None) -> Path:
        """<model>/<version>/ from the inference graph at `source`; the model folder too, on its first version."""
        created = time.time() if created_unix is None else created_unix
        if not self.folder.is_dir():  # the model appears with its first version, whole
            with self._top.write(self.manifest.name, meta_file=False) as (staging, _):
                write_model_files(staging, self.manifest, self.config, self._header())
                (staging / str(version)).mkdir()
                write_version_files(staging / str(version), source, version, step, created)
        else:
            with AtomicDirs(self.folder).write(str(version), meta_file=False) as (staging, _):
                write_version_files(staging, source, version, step, created)
        return self.folder / str(version)
