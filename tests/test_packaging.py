"""The project as a package: pyproject.toml against requirements/*.txt, and a real `pip install .[serve]`.

pyproject.toml lists the pins flattened (setuptools cannot read the requirements files' `-r` lines); the
requirements files stay the lock that make and the Dockerfiles install. These tests fail when the two drift,
when a console script points nowhere, and when an installed [serve] environment (no torch) cannot run the
server and the client through their console scripts. requirements/predict.txt (plain onnxruntime, inference only)
must equal serve.txt but for its runtime lines; tests/test_predict_env.py installs and runs it.
"""
from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.helpers import CALL_TIMEOUT, REPO, clean_env, ok, start_server

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
NAME = canonicalize_name(PROJECT["name"])
ORT_CPU, ORT_GPU, ORT_PLAIN = "onnxruntime-training-cpu", "onnxruntime-training", "onnxruntime"
RUNTIME_EXTRAS = ("serve", "gpu", "predict")  # each brings one ONNX Runtime build and the onnx that goes with it
PREDICT_RUNTIME = {ORT_PLAIN, "onnx", "ml-dtypes"}  # the lines requirements/predict.txt has instead of serve.txt's
INSTALL_TIMEOUT = 900.0  # seconds for `pip install .[serve]` (a cold pip cache downloads ONNX Runtime and onnx)


# ---------------------------------------------------------------- requirement sets

def key(req: Requirement) -> str:
    """A requirement with its name normalized: `Foo_Bar[b,a]==1` and `foo-bar[a,b]==1` are the same pin."""
    extras = f"[{','.join(sorted(canonicalize_name(e) for e in req.extras))}]" if req.extras else ""
    marker = f"; {req.marker}" if req.marker else ""
    return f"{canonicalize_name(req.name)}{extras}{req.specifier}{marker}"


def pins(reqs: list[Requirement]) -> dict[str, str]:
    """{normalized name: normalized requirement}; a name listed twice is an error."""
    out: dict[str, str] = {}
    for req in reqs:
        name = canonicalize_name(req.name)
        assert name not in out, f"{name} is listed twice: {out[name]} and {key(req)}"
        out[name] = key(req)
    return out


def requirements_file(path: Path) -> list[Requirement]:
    """The requirements of a requirements/*.txt file, its `-r` includes flattened."""
    reqs: list[Requirement] = []
    for line in path.read_text().splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith(("-r ", "--requirement ")):
            reqs += requirements_file(path.parent / line.split(None, 1)[1])
        else:
            assert not line.startswith("-"), f"{path.name}: option lines other than -r are not supported: {line}"
            reqs.append(Requirement(line))
    return reqs


def project_requirements(*extras: str) -> list[Requirement]:
    """What `pip install .[extras]` asks for: the base dependencies plus the extras, self-references
    (`vitserve[export]`) resolved."""
    reqs, seen, todo = [Requirement(r) for r in PROJECT["dependencies"]], set(), list(extras)
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        assert extra in PROJECT["optional-dependencies"], f"pyproject.toml has no extra {extra!r}"
        for line in PROJECT["optional-dependencies"][extra]:
            req = Requirement(line)
            if canonicalize_name(req.name) == NAME:
                todo += sorted(req.extras)
            else:
                reqs.append(req)
    return reqs


def serve_txt_for_gpu() -> list[Requirement]:
    """requirements/serve.txt with the CUDA build of ONNX Runtime in place of the CPU one (as Dockerfile.gpu does)."""
    out = []
    for req in requirements_file(REPO / "requirements/serve.txt"):
        if canonicalize_name(req.name) == ORT_CPU:
            req = Requirement(f"{ORT_GPU}{req.specifier}")
        out.append(req)
    return out


def diff(ours: dict[str, str], theirs: dict[str, str]) -> str:
    lines = [f"  only in pyproject.toml:   {ours[n]}" for n in sorted(ours.keys() - theirs.keys())]
    lines += [f"  only in requirements:     {theirs[n]}" for n in sorted(theirs.keys() - ours.keys())]
    lines += [f"  pyproject {ours[n]}  vs  requirements {theirs[n]}"
              for n in sorted(ours.keys() & theirs.keys()) if ours[n] != theirs[n]]
    return "\n".join(lines)


# ---------------------------------------------------------------- static: pyproject.toml

@pytest.mark.parametrize("extras, lock", [
    (("serve",), lambda: requirements_file(REPO / "requirements/serve.txt")),
    (("gpu",), serve_txt_for_gpu),
    (("serve", "export"), lambda: requirements_file(REPO / "requirements/export.txt")),
    (("serve", "dev"), lambda: requirements_file(REPO / "requirements/dev.txt")),
    (("predict",), lambda: requirements_file(REPO / "requirements/predict.txt")),
    (("serve", "mpi"), lambda: requirements_file(REPO / "requirements/mpi.txt")),
], ids=["serve=serve.txt", "gpu=serve.txt-with-cuda-ort", "serve+export=export.txt", "serve+dev=dev.txt",
        "predict=predict.txt", "serve+mpi=mpi.txt"])
def test_extras_pin_what_the_requirements_files_pin(extras, lock):
    ours, theirs = pins(project_requirements(*extras)), pins(lock())
    assert ours == theirs, (f"pyproject.toml's dependencies + [{','.join(extras)}] drifted from the requirements "
                            f"files (change both together):\n{diff(ours, theirs)}")


def test_every_pin_is_exact():
    for req in project_requirements(*PROJECT["optional-dependencies"]):
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"{key(req)}: pin an exact version (==)"


def test_onnx_runtime_comes_from_serve_gpu_or_predict_only():
    """Every build installs the module `onnxruntime`: one per environment, so only `serve`, `gpu` and `predict` name
    one, and each names the onnx that goes with it."""
    def ort_in(reqs):
        return sorted(key(r) for r in reqs if canonicalize_name(r.name).startswith("onnxruntime")
                      or canonicalize_name(r.name) == "onnx")
    assert ort_in(project_requirements()) == [], "the base dependencies must not pick an ONNX Runtime build or onnx"
    for extra in PROJECT["optional-dependencies"]:
        if extra not in RUNTIME_EXTRAS:
            assert ort_in(project_requirements(extra)) == [], f"[{extra}] must leave ONNX Runtime and onnx to {RUNTIME_EXTRAS}"
    cpu, gpu, plain = (ort_in(project_requirements(extra)) for extra in RUNTIME_EXTRAS)
    assert len(cpu) == 2 and cpu[1].startswith(ORT_CPU + "=="), cpu
    assert len(gpu) == 2 and gpu[1].startswith(ORT_GPU + "=="), gpu
    assert len(plain) == 2 and plain[1].startswith(ORT_PLAIN + "=="), plain
    assert cpu[0] == gpu[0] and cpu[0].startswith("onnx=="), f"the CPU and CUDA builds need the same onnx: {cpu} {gpu}"
    cpu, gpu = cpu[1:], gpu[1:]
    assert cpu[0].removeprefix(ORT_CPU) == gpu[0].removeprefix(ORT_GPU), f"CPU and CUDA builds differ: {cpu} {gpu}"
    dockerfile_gpu = re.search(r"^ARG ORT_PACKAGE=(\S+)$", (REPO / "Dockerfile.gpu").read_text(), re.M)
    assert dockerfile_gpu and key(Requirement(dockerfile_gpu[1])) == gpu[0], "Dockerfile.gpu's ORT_PACKAGE != [gpu]"



def test_predict_txt_is_serve_txt_but_for_the_runtime():
    """requirements/predict.txt swaps only ONNX Runtime, onnx (and what onnx >= 1.18 pulls in): every other pin is
    serve.txt's, so an inference replica serves with the same gRPC, protobuf, numpy and Pillow as a trainer."""
    serve = pins(requirements_file(REPO / "requirements/serve.txt"))
    predict = pins(requirements_file(REPO / "requirements/predict.txt"))
    assert predict[ORT_PLAIN].startswith(ORT_PLAIN + "==") and ORT_CPU not in predict, predict
    swapped = {ORT_CPU, "onnx"}
    shared_serve = {n: r for n, r in serve.items() if n not in swapped}
    shared_predict = {n: r for n, r in predict.items() if n not in PREDICT_RUNTIME}
    assert shared_predict == shared_serve, f"predict.txt and serve.txt drifted:\n{diff(shared_predict, shared_serve)}"
    assert PREDICT_RUNTIME <= predict.keys(), sorted(PREDICT_RUNTIME - predict.keys())


def test_console_scripts_point_at_callables():
    scripts = PROJECT["scripts"]
    assert scripts == {"vitserve-server": "server.__main__:main", "vitserve": "client.__main__:main"}
    for target in scripts.values():
        module, _, attr = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), target


def test_console_scripts_import_neither_model_nor_torch():
    """Even where torch is installed (this venv), the server's and client's entry points never load it, nor model/."""
    code = ("import sys, server, server.__main__, client.__main__, proto; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('model', 'torch', 'einops')))")
    result = ok(subprocess.run([sys.executable, "-c", code], cwd=REPO, env=clean_env(),
                               capture_output=True, text=True, timeout=CALL_TIMEOUT))
    assert result.stdout.strip() == "[]", f"imported: {result.stdout}"


# ---------------------------------------------------------------- a real install: pip install .[serve]

def packaged_sources() -> list[str]:
    """The repository's top-level folders that pyproject.toml ships (its packages.find include patterns)."""
    include = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    return sorted({pattern.split(".")[0] for pattern in include})


def venv_env(data_dir: Path) -> dict[str, str]:
    """The test environment minus anything that could make the venv see this checkout instead of its own install."""
    env = clean_env(VITSERVE_DATA_DIR=str(data_dir))
    for name in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"):
        env.pop(name, None)
    return env


def run(cmd: list, env: dict[str, str], cwd: Path, timeout: float = CALL_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def serve_venv(tmp_path_factory) -> Path:
    """A fresh virtual environment with `pip install <copy of this repository>[serve]` (not editable)."""
    root = tmp_path_factory.mktemp("packaging")
    src = root / "src"  # a copy: pip builds in the source tree (build/, *.egg-info), which must not be this checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for name in packaged_sources():
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    venv = root / "venv"
    env = venv_env(root)
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    result = run([venv / "bin/python", "-m", "pip", "install", "--quiet", f"{src}[serve]"], env, root,
                 timeout=INSTALL_TIMEOUT)
    took = time.monotonic() - t0
    if result.returncode != 0:
        pytest.fail(f"`pip install {src}[serve]` into a fresh venv failed (exit {result.returncode}) after {took:.0f}s. "
                    f"It needs the package index (PyPI, or pip's configured index) to be reachable; pip said:\n"
                    f"{(result.stdout + result.stderr)[-4000:]}")
    print(f"\nvenv + pip install .[serve]: {took:.1f}s")
    return venv


def site_packages(venv: Path) -> Path:
    (path,) = venv.glob("lib/python3.*/site-packages")
    return path


def test_serve_install_has_no_torch_and_one_onnx_runtime(serve_venv, tmp_path):
    env = venv_env(tmp_path)
    result = run([serve_venv / "bin/python", "-c", "import torch"], env, tmp_path)
    assert result.returncode == 1 and "No module named 'torch'" in result.stderr, result.stdout + result.stderr
    listed = ok(run([serve_venv / "bin/python", "-m", "pip", "list", "--format", "json"], env, tmp_path)).stdout
    names = {canonicalize_name(p["name"]): p["version"] for p in json.loads(listed)}
    assert [n for n in names if n.startswith("onnxruntime")] == [ORT_CPU], sorted(names)
    assert names[NAME] == PROJECT["version"]
    assert not {"torch", "einops", "pytest"} & names.keys(), sorted(names)


def test_serve_install_ships_the_packages_and_proto_files(serve_venv, tmp_path):
    """Every .py, .pyi and .proto of the shipped packages is in the install, and `import server` resolves there."""
    site = site_packages(serve_venv)
    for name in packaged_sources():
        for path in sorted((REPO / name).rglob("*")):
            if path.suffix in (".py", ".pyi", ".proto") and "__pycache__" not in path.parts:
                assert (site / path.relative_to(REPO)).is_file(), f"{path.relative_to(REPO)} is not in the installed package"
    for name in ("proto/vitserve.proto", "proto/vitserve_pb2.py", "proto/vitserve_pb2_grpc.py"):
        assert (site / name).is_file(), name
    code = "import server, client, proto; print(server.__file__, client.__file__, proto.__file__)"
    files = ok(run([serve_venv / "bin/python", "-c", code], venv_env(tmp_path), tmp_path)).stdout.split()
    assert files and all(Path(f).is_relative_to(site) for f in files), files


def test_serve_install_console_scripts_serve_and_call(serve_venv, exported, tmp_path):
    """vitserve-server and vitserve from the [serve] venv: --help, a real server, health, info --json, SIGTERM -> 0."""
    env, bin_ = venv_env(tmp_path / "data"), serve_venv / "bin"
    server_help = ok(run([bin_ / "vitserve-server", "--help"], env, tmp_path)).stdout
    assert "--artifacts" in server_help and "--data-dir" in server_help, server_help
    client_help = ok(run([bin_ / "vitserve", "--help"], env, tmp_path)).stdout
    assert "health" in client_help and "train-step" in client_help, client_help

    server = start_server("--artifacts", str(exported[0]), "--host", "127.0.0.1", "--port", "0",
                          "--data-dir", str(tmp_path / "data"), "--metrics-port", "-1",
                          env=env, command=[str(bin_ / "vitserve-server")], cwd=tmp_path)
    try:
        health = ok(run([bin_ / "vitserve", "--address", server.address, "health"], env, tmp_path))
        assert health.stdout.strip() == "SERVING"
        info = json.loads(ok(run([bin_ / "vitserve", "--address", server.address, "info", "--json"], env, tmp_path)).stdout)
        assert info["name"] == "digits4" and info["step"] == 0 and len(info["class_names"]) == 10, info
        assert info["execution_providers"][0] == "CPUExecutionProvider", info["execution_providers"]
        down = run([bin_ / "vitserve", "--address", "127.0.0.1:1", "--timeout", "2", "health"], env, tmp_path)
        assert down.returncode == 1 and down.stderr.startswith("error: "), down.stdout + down.stderr
    finally:
        server.stop()  # SIGTERM; asserts exit status 0
