"""The project as a package: pyproject.toml against requirements/*.txt, the Dockerfiles' choice of lock, and a real
`pip install .[ort-training]`.

pyproject.toml lists the pins flattened (setuptools cannot read the requirements files' `-r` lines); the
requirements files stay the lock that make and the Dockerfiles install. These tests fail when the two drift,
when a Dockerfile's install step picks another lock than its build arguments say, when a console script points
nowhere, and when an installed environment (no torch) cannot run the server and the client through their console
scripts. requirements/ort.txt (the maintained onnxruntime, --trainer ort) must equal ort-training.txt but for its
runtime lines; tests/test_trainer_env.py installs and runs it.
"""
from __future__ import annotations

import importlib
import json
import platform
import re
import shutil
import subprocess
import sys
import time
import tomllib
import typing
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from server.config import Settings
from tests.helpers import CALL_TIMEOUT, REPO, clean_env, ok, start_server

pytestmark = pytest.mark.e2e  # a real pip install and the Dockerfiles

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
NAME = canonicalize_name(PROJECT["name"])
ORT, ORT_GPU = "onnxruntime", "onnxruntime-gpu"
ORT_TRAINING, ORT_TRAINING_GPU = "onnxruntime-training-cpu", "onnxruntime-training"
# Each runtime extra brings one ONNX Runtime build (this one) and the onnx that goes with it.
RUNTIME_EXTRAS = {"ort": ORT, "gpu": ORT_GPU, "ort-training": ORT_TRAINING, "ort-training-gpu": ORT_TRAINING_GPU}
ORT_RUNTIME = {ORT, "onnx", "ml-dtypes"}  # the lines requirements/ort.txt has instead of ort-training.txt's
TRAINERS = ("ort", "ort-training")  # the Dockerfiles' TRAINER values = the server's --trainer values
INSTALL_EXTRA = "ort-training"  # what the real install below installs (ort is installed by tests/test_trainer_env.py)
INSTALL_TIMEOUT = 900.0  # seconds for the real install (a cold pip cache downloads ONNX Runtime and onnx)


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


def lock(name: str) -> list[Requirement]:
    return requirements_file(REPO / "requirements" / name)


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


def with_cuda_build(reqs: list[Requirement], cpu: str, gpu: str) -> list[Requirement]:
    """A lock with the CUDA build of its ONNX Runtime in place of the CPU one, same version (as Dockerfile.gpu does)."""
    return [Requirement(f"{gpu}{req.specifier}") if canonicalize_name(req.name) == cpu else req for req in reqs]


def diff(ours: dict[str, str], theirs: dict[str, str]) -> str:
    lines = [f"  only in pyproject.toml:   {ours[n]}" for n in sorted(ours.keys() - theirs.keys())]
    lines += [f"  only in requirements:     {theirs[n]}" for n in sorted(theirs.keys() - ours.keys())]
    lines += [f"  pyproject {ours[n]}  vs  requirements {theirs[n]}"
              for n in sorted(ours.keys() & theirs.keys()) if ours[n] != theirs[n]]
    return "\n".join(lines)


# ---------------------------------------------------------------- static: pyproject.toml

@pytest.mark.parametrize("extras, expected", [
    (("ort",), lambda: lock("ort.txt")),
    (("gpu",), lambda: with_cuda_build(lock("ort.txt"), ORT, ORT_GPU)),
    (("ort-training",), lambda: lock("ort-training.txt")),
    (("ort-training-gpu",), lambda: with_cuda_build(lock("ort-training.txt"), ORT_TRAINING, ORT_TRAINING_GPU)),
    (("ort-training", "export"), lambda: lock("export.txt")),
    (("ort-training", "dev"), lambda: lock("dev.txt")),
], ids=["ort=ort.txt", "gpu=ort.txt-with-onnxruntime-gpu", "ort-training=ort-training.txt",
        "ort-training-gpu=ort-training.txt-with-onnxruntime-training", "ort-training+export=export.txt",
        "ort-training+dev=dev.txt"])
def test_extras_pin_what_the_requirements_files_pin(extras, expected):
    ours, theirs = pins(project_requirements(*extras)), pins(expected())
    assert ours == theirs, (f"pyproject.toml's dependencies + [{','.join(extras)}] drifted from the requirements "
                            f"files (change both together):\n{diff(ours, theirs)}")


@pytest.mark.parametrize("extra, runtimes", [("mpi", ("ort.txt", "ort-training.txt")), ("openvino", ("ort.txt",))])
def test_the_add_on_extras_are_their_files_which_go_on_top_of_a_runtime(extra, runtimes):
    """mpi.txt and openvino.txt have no -r line (make and the Dockerfile install them beside a runtime lock): the
    extra alone equals its file, and it shares no package with the runtime locks it goes with."""
    text = (REPO / f"requirements/{extra}.txt").read_text()
    assert not [line for line in text.splitlines() if line.startswith("-")]
    ours = pins([Requirement(r) for r in PROJECT["optional-dependencies"][extra]])
    assert ours == pins(lock(f"{extra}.txt")), diff(ours, pins(lock(f"{extra}.txt")))
    for runtime in runtimes:
        assert not ours.keys() & pins(lock(runtime)).keys(), runtime


def test_every_pin_is_exact():
    for req in project_requirements(*PROJECT["optional-dependencies"]):
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"{key(req)}: pin an exact version (==)"


def test_onnx_runtime_comes_from_the_runtime_extras_only():
    """Every build installs the module `onnxruntime`: one per environment, so only the runtime extras name one, each
    exactly one with the onnx that goes with it; a CPU build and its CUDA build share their version and onnx."""
    def ort_in(reqs):  # execution provider plugins (onnxruntime-ep-*) are libraries a runtime loads, not runtimes
        return {canonicalize_name(r.name): key(r) for r in reqs if canonicalize_name(r.name) == "onnx" or (
                canonicalize_name(r.name).startswith("onnxruntime")
                and not canonicalize_name(r.name).startswith("onnxruntime-ep-"))}
    assert ort_in(project_requirements()) == {}, "the base dependencies must not pick an ONNX Runtime build or onnx"
    for extra in PROJECT["optional-dependencies"]:
        if extra not in RUNTIME_EXTRAS:
            assert ort_in(project_requirements(extra)) == {}, f"[{extra}] must leave ONNX Runtime and onnx to {RUNTIME_EXTRAS}"
    found = {extra: ort_in(project_requirements(extra)) for extra in RUNTIME_EXTRAS}
    for extra, runtime in RUNTIME_EXTRAS.items():
        assert sorted(found[extra]) == sorted({"onnx", runtime}), (extra, found[extra])
    for cpu, gpu in (("ort", "gpu"), ("ort-training", "ort-training-gpu")):
        assert found[cpu]["onnx"] == found[gpu]["onnx"], f"the CPU and CUDA builds need the same onnx: {found}"
        version = found[cpu][RUNTIME_EXTRAS[cpu]].removeprefix(RUNTIME_EXTRAS[cpu])
        assert found[gpu][RUNTIME_EXTRAS[gpu]] == RUNTIME_EXTRAS[gpu] + version, f"CPU and CUDA builds differ: {found}"


def test_ort_txt_is_ort_training_txt_but_for_the_runtime():
    """requirements/ort.txt swaps only ONNX Runtime, onnx (and what onnx >= 1.18 pulls in): every other pin is
    ort-training.txt's, so both trainers serve with the same gRPC, protobuf, numpy, Pillow and safetensors."""
    training = pins(lock("ort-training.txt"))
    ort = pins(lock("ort.txt"))
    assert ort[ORT].startswith(ORT + "==") and ORT_TRAINING not in ort and "torch" not in ort, ort
    shared_training = {n: r for n, r in training.items() if n not in {ORT_TRAINING, "onnx"}}
    shared_ort = {n: r for n, r in ort.items() if n not in ORT_RUNTIME}
    assert shared_ort == shared_training, f"ort.txt and ort-training.txt drifted:\n{diff(shared_ort, shared_training)}"
    assert ORT_RUNTIME <= ort.keys(), sorted(ORT_RUNTIME - ort.keys())
    assert "safetensors" in shared_ort, "the ort trainer's checkpoint format"


# ---------------------------------------------------------------- static: the Dockerfiles' install steps

def dockerfile_stages(name: str) -> list[list[tuple[str, str]]]:
    """A Dockerfile's stages, each a list of (INSTRUCTION, arguments) as a builder reads them: comment lines
    dropped, a line ending in a backslash joined to the next with both removed (one shell line for RUN)."""
    stages: list[list[tuple[str, str]]] = [[]]
    logical = ""
    for line in (REPO / name).read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        logical += line.rstrip()
        if logical.endswith("\\"):
            logical = logical[:-1]
            continue
        instruction, _, args = logical.strip().partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), args.strip()))
        logical = ""
    return stages  # stages[0]: the global ARGs before the first FROM


def install_step(stage: list[tuple[str, str]]) -> str:
    (run,) = [args for instruction, args in stage if instruction == "RUN" and 'case "$TRAINER"' in args]
    return run


STUB_PYTHON = """#!/bin/sh
case "$*" in
    "--version") echo "Python $STUB_VERSION" ;;
    "-c import sys; sys.exit(sys.version_info >= (3, 13))") case "$STUB_VERSION" in 3.1[3-9]*) exit 1 ;; esac ;;
    "-m pip install -r "*) echo "python $*"; cat "$5"; echo "# end of $5" ;;
    "-m pip list") echo "onnxruntime-stub 0" ;;
    *) echo "python $*" ;;
esac
"""


def run_install_step(tmp_path: Path, dockerfile: str, python: str = "3.13.0", **args: str) -> subprocess.CompletedProcess:
    """A Dockerfile's install step as sh (bash for Dockerfile.gpu, its SHELL) runs it, with /opt/venv/bin/python a
    stub (Python `python`) that prints its arguments and, for `pip install -r FILE`, FILE: nothing is installed,
    the step's choice of lock is what is tested. The locks are copies in tmp_path/requirements."""
    stub = tmp_path / "python"
    stub.write_text(STUB_PYTHON)
    stub.chmod(0o755)
    shutil.copytree(REPO / "requirements", tmp_path / "requirements", dirs_exist_ok=True)
    stages = dockerfile_stages(dockerfile)
    script = (install_step(stages[1]).replace("/opt/venv/bin/python", str(stub))
              .replace("/tmp/requirements", str(tmp_path / "requirements")).replace('"${PYTHON}"', str(stub)))
    shell = ["bash", "-o", "pipefail", "-c"] if dockerfile == "Dockerfile.gpu" else ["sh", "-c"]
    env = {"PATH": "/usr/bin:/bin", "STUB_VERSION": python, **args}
    return subprocess.run([*shell, script], env=env, capture_output=True, text=True, timeout=30)


def installed(result: subprocess.CompletedProcess) -> list[str]:
    """The `pip install` lines the stub printed."""
    assert result.returncode == 0, result.stderr
    return [line for line in result.stdout.splitlines() if line.startswith("python -m pip install")]


@pytest.mark.parametrize("trainer, python, mpi, expected", [
    ("ort", "3.13.0", "0", "-r {r}/ort.txt"),
    ("ort", "3.11.2", "0", "-r {r}/ort.txt"),
    ("ort-training", "3.12.8", "0", "-r {r}/ort-training.txt"),
    ("ort", "3.13.0", "1", "-r {r}/ort.txt -r {r}/mpi.txt"),
    ("ort-training", "3.11.2", "1", "-r {r}/ort-training.txt -r {r}/mpi.txt"),
])
def test_the_dockerfiles_trainer_picks_the_lock_and_mpi_goes_on_top(tmp_path, trainer, python, mpi, expected):
    result = run_install_step(tmp_path, "Dockerfile", python, TRAINER=trainer, ROLE="all", MPI=mpi)
    assert installed(result) == [f"python -m pip install {expected.format(r=tmp_path / 'requirements')}"], result.stdout


@pytest.mark.parametrize("args, python, error", [
    ({"TRAINER": "ort-training"}, "3.13.1", "error: TRAINER=ort-training needs a base image with Python <= 3.12 "
     "(onnxruntime-training-cpu 1.19.2 has no wheels for Python 3.13.1): add --build-arg BASE_IMAGE=python:3.12-slim"),
    ({"TRAINER": "onnx"}, "3.13.0", "error: TRAINER must be ort or ort-training, got 'onnx'"),
    ({"ROLE": "predcit"}, "3.13.0", "error: ROLE must be all, train or predict, got 'predcit'"),
    ({"ROLE": "predict", "MPI": "1"}, "3.13.0", "error: MPI=1 trains: use ROLE=all or train, not predict"),
    ({"MPI": "yes"}, "3.13.0", "error: MPI must be 0 or 1, got 'yes'"),
], ids=["ort-training-on-3.13", "unknown-trainer", "unknown-role", "mpi-predict", "mpi-yes"])
def test_the_dockerfile_refuses_bad_arguments_before_installing(tmp_path, args, python, error):
    result = run_install_step(tmp_path, "Dockerfile", python, **{"TRAINER": "ort", "ROLE": "all", "MPI": "0", **args})
    assert (result.returncode, result.stderr) == (1, error + "\n"), result.stderr
    assert "pip install" not in result.stdout, result.stdout


@pytest.mark.parametrize("trainer, cuda, extra", [("ort", "13.0.2", "gpu"), ("ort-training", "11.8.0", "ort-training-gpu")])
def test_the_gpu_dockerfile_installs_its_extras_pins(tmp_path, trainer, cuda, extra):
    """Dockerfile.gpu installs the TRAINER's lock with the CUDA build swapped in: exactly [gpu]'s or
    [ort-training-gpu]'s pins."""
    result = run_install_step(tmp_path, "Dockerfile.gpu", TRAINER=trainer, CUDA_VERSION=cuda)
    (line,) = installed(result)
    assert line == f"python -m pip install -r {tmp_path / 'requirements/gpu.txt'}", result.stdout
    written = tmp_path / "written.txt"
    written.write_text(result.stdout.split(line, 1)[1].split("# end of ", 1)[0])
    ours, theirs = pins(project_requirements(extra)), pins(requirements_file(written))
    assert ours == theirs, f"Dockerfile.gpu (TRAINER={trainer}) installs other pins than [{extra}]:\n{diff(ours, theirs)}"


@pytest.mark.parametrize("trainer, cuda", [("ort", "12.8.1"), ("ort", ""), ("ort-training", "13.0.2")])
def test_the_gpu_dockerfile_refuses_a_base_of_another_cuda(tmp_path, trainer, cuda):
    result = run_install_step(tmp_path, "Dockerfile.gpu", TRAINER=trainer, **({"CUDA_VERSION": cuda} if cuda else {}))
    need = "13" if trainer == "ort" else "11"
    assert (result.returncode, result.stderr) == (1, f"error: TRAINER={trainer} needs a CUDA {need} base image, this one "
                                                     f"has CUDA '{cuda or 'none'}' (see the header)\n"), result.stderr


def test_the_dockerfiles_agree_with_the_settings_the_locks_and_the_build_context():
    """Both Dockerfiles take TRAINER (default ort) and set VITSERVE_TRAINER from it; the CPU one's roles are the
    server's; the default bases are Python 3.13 (CPU) and CUDA 13 + cuDNN 9 on Ubuntu 24.04 (GPU); the locks
    they copy exist and are allowed into the build context."""
    allowed = (REPO / ".dockerignore").read_text().splitlines()
    for name in ("Dockerfile", "Dockerfile.gpu"):
        stages = dockerfile_stages(name)
        for stage in stages[1:]:
            assert ("ARG", "TRAINER=ort") in stage, (name, stage)
        env = "\n".join(args for instruction, args in stages[-1] if instruction == "ENV")
        assert "VITSERVE_TRAINER=${TRAINER}" in env.split(), (name, env)
        assert set(re.findall(r"(\S+)\) lock=", install_step(stages[1]))) == set(TRAINERS), name
        copies = [args.split() for instruction, args in stages[1] if instruction == "COPY" and "/tmp/requirements/" in args]
        assert len(copies) == 1 and copies[0][-1] == "/tmp/requirements/", (name, copies)
        for source in copies[0][:-1]:
            assert (REPO / source).is_file() and f"!{source}" in allowed, (name, source)
    cpu, gpu = dockerfile_stages("Dockerfile"), dockerfile_stages("Dockerfile.gpu")
    assert ("ARG", "BASE_IMAGE=python:3.13-slim") in cpu[0]
    assert ("ARG", "ROLE=all") in cpu[1] and ("ARG", "ROLE=all") in cpu[2]
    assert "VITSERVE_ROLE=${ROLE}" in "\n".join(args for instruction, args in cpu[2] if instruction == "ENV").split()
    roles = {role for role in re.search(r'case "\$ROLE" in\s+(\S+)\)', install_step(cpu[1]))[1].split("|")}
    assert roles == set(typing.get_args(Settings.model_fields["role"].annotation)), roles
    (base,) = [args for instruction, args in gpu[0] if instruction == "ARG" and args.startswith("BASE_IMAGE=")]
    assert re.fullmatch(r"BASE_IMAGE=nvidia/cuda:13\.\d+\.\d+-cudnn-runtime-ubuntu24\.04", base), base


def test_the_dockerfiles_trainers_are_the_servers():
    assert set(typing.get_args(Settings.model_fields["trainer"].annotation)) == set(TRAINERS)


def make_dry_run(*args: str) -> list[str]:
    out = ok(subprocess.run(["make", "-n", "--no-print-directory", *args], cwd=REPO, env=clean_env(),
                            capture_output=True, text=True, timeout=60)).stdout
    return out.replace("\\\n", " ").splitlines()


@pytest.mark.parametrize("target, trainer, expected", [
    ("docker", "ort", "--build-arg TRAINER=ort --build-arg MODEL=digits"),
    ("docker", "ort-training", "--build-arg BASE_IMAGE=python:3.12-slim --build-arg TRAINER=ort-training"),
    ("docker-mpi", "ort", "--build-arg TRAINER=ort --build-arg MODEL=digits --build-arg ARTIFACTS=artifacts/digits --build-arg MPI=1"),
])
def test_make_docker_passes_the_trainer_and_a_base_that_fits_it(target, trainer, expected):
    (build,) = [line for line in make_dry_run(target, "DOCKER=docker", f"TRAINER={trainer}") if line.startswith("docker build ")]
    assert expected in build, build
    assert ("BASE_IMAGE" in build) == (trainer == "ort-training"), build


@pytest.mark.parametrize("trainer, python, device", [("ort", ".venv-ort/bin/python", "openvino"),
                                                     ("ort-training", ".venv/bin/python", "cpu")])
def test_make_serve_serves_from_the_trainers_environment(trainer, python, device):
    """The ort trainer trains on OpenVINO's execution provider where its plugin installs (x86-64), which measured
    faster; the training build cannot load it. Predict stays on the CPU provider."""
    (serve,) = [" ".join(line.split()) for line in make_dry_run("serve", f"TRAINER={trainer}") if " -m server " in line]
    assert serve.startswith(f"{python} -m server --trainer {trainer} --artifacts artifacts/digits "), serve
    if platform.machine() == "x86_64":
        assert serve.endswith(f"--device cpu --training-device {device}"), serve


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


# ---------------------------------------------------------------- a real install: pip install .[ort-training]

def packaged_sources() -> list[str]:
    """The repository's top-level folders that pyproject.toml ships (its packages.find include patterns)."""
    include = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    return sorted({pattern.split(".")[0] for pattern in include})


def venv_env(data_dir: Path) -> dict[str, str]:
    """The test environment minus anything that could make the venv see this checkout instead of its own install;
    the server's trainer is the installed runtime's."""
    env = clean_env(VITSERVE_DATA_DIR=str(data_dir), VITSERVE_TRAINER=INSTALL_EXTRA)
    for name in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"):
        env.pop(name, None)
    return env


def run(cmd: list, env: dict[str, str], cwd: Path, timeout: float = CALL_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def installed_venv(tmp_path_factory) -> Path:
    """A fresh virtual environment with `pip install <copy of this repository>[ort-training]` (not editable)."""
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
    result = run([venv / "bin/python", "-m", "pip", "install", "--quiet", f"{src}[{INSTALL_EXTRA}]"], env, root,
                 timeout=INSTALL_TIMEOUT)
    took = time.monotonic() - t0
    if result.returncode != 0:
        pytest.fail(f"`pip install {src}[{INSTALL_EXTRA}]` into a fresh venv failed (exit {result.returncode}) after {took:.0f}s. "
                    f"It needs the package index (PyPI, or pip's configured index) to be reachable; pip said:\n"
                    f"{(result.stdout + result.stderr)[-4000:]}")
    print(f"\nvenv + pip install .[{INSTALL_EXTRA}]: {took:.1f}s")
    return venv


def site_packages(venv: Path) -> Path:
    (path,) = venv.glob("lib/python3.*/site-packages")
    return path


def test_the_install_has_no_torch_and_one_onnx_runtime(installed_venv, tmp_path):
    env = venv_env(tmp_path)
    result = run([installed_venv / "bin/python", "-c", "import torch"], env, tmp_path)
    assert result.returncode == 1 and "No module named 'torch'" in result.stderr, result.stdout + result.stderr
    listed = ok(run([installed_venv / "bin/python", "-m", "pip", "list", "--format", "json"], env, tmp_path)).stdout
    names = {canonicalize_name(p["name"]): p["version"] for p in json.loads(listed)}
    assert [n for n in names if n.startswith("onnxruntime")] == [RUNTIME_EXTRAS[INSTALL_EXTRA]], sorted(names)
    assert names[NAME] == PROJECT["version"]
    assert not {"torch", "einops", "pytest"} & names.keys(), sorted(names)


def test_the_install_ships_the_packages_and_proto_files(installed_venv, tmp_path):
    """Every .py, .pyi and .proto of the shipped packages is in the install, and `import server` resolves there."""
    site = site_packages(installed_venv)
    for name in packaged_sources():
        for path in sorted((REPO / name).rglob("*")):
            if path.suffix in (".py", ".pyi", ".proto") and "__pycache__" not in path.parts:
                assert (site / path.relative_to(REPO)).is_file(), f"{path.relative_to(REPO)} is not in the installed package"
    for name in ("proto/vitserve.proto", "proto/vitserve_pb2.py", "proto/vitserve_pb2_grpc.py"):
        assert (site / name).is_file(), name
    code = "import server, client, proto; print(server.__file__, client.__file__, proto.__file__)"
    files = ok(run([installed_venv / "bin/python", "-c", code], venv_env(tmp_path), tmp_path)).stdout.split()
    assert files and all(Path(f).is_relative_to(site) for f in files), files


def test_the_install_console_scripts_serve_and_call(installed_venv, exported, tmp_path):
    """vitserve-server and vitserve from the installed venv: --help, a real server, health, info --json, SIGTERM -> 0."""
    env, bin_ = venv_env(tmp_path / "data"), installed_venv / "bin"
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
