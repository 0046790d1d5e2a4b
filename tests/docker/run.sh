#!/usr/bin/env bash
# Builds the CPU serving image (Dockerfile) and runs it for real: `make test-docker` or `bash tests/docker/run.sh`.
# The image's trainer is VITSERVE_TEST_TRAINER (default ort: requirements/ort.txt, onnxruntime 1.31, --trainer ort;
# ort-training: the deprecated training build), the Dockerfile's TRAINER build argument.
#
# Engine: `docker` when a Docker engine answers (`docker info`), else podman. With podman the script runs as
# root, installs podman/buildah/debootstrap/runc with apt-get when they are missing, and builds against a local
# base image: a debootstrapped Debian bookworm (python3 3.11, venv, pip, ca-certificates) imported as
# localhost/vitserve-base:bookworm, cached in $VITSERVE_DOCKER_CACHE (default /var/cache/vitserve-docker), so
# only the first run pays for debootstrap; pip inside the build reaches PyPI over the host network with the
# host's CA bundle. With docker it builds against the Dockerfile's default base (python:3.13-slim), or
# python:3.12-slim for TRAINER=ort-training.
# When the build or a run cannot happen, it prints why and exits 1: it never skips.
#
# Checks: the image builds; torch is not importable in it; its ONNX Runtime and VITSERVE_TRAINER are the
# trainer's (plain onnxruntime without its training module for ort); it runs as a non-root user; its size is under
# 700 MB (printed); the project is installed in it as the package vitserve (pyproject.toml's version), its
# entrypoint is the console script vitserve-server, and `python -m server --help` works too; a container
# with a data volume comes up and its HEALTHCHECK (`vitserve health`) passes; from the host, Predict (CLI, image
# files) and 3 TrainSteps (client library) work and equal an in-process reference (server.dataplane.DataPlane on
# the same artifacts and batches, the same trainer, run by REF_PYTHON), KServe v2 ModelInfer works with tritonclient, and the Prometheus endpoint
# (VITSERVE_METRICS_PORT, a free port: the host network is shared) counts those calls; SIGTERM (`stop`) makes
# it exit 0 after writing the final checkpoint step-00000003 (reason "shutdown") into the volume; a new
# container on the same volume resumes at step 3 with the same weights (EvalStep loss unchanged) and its
# 4th TrainStep gives the reference's 4th loss. Last line on success: "docker test: N passed, 0 failed".
#
# Environment: PYTHON (host python with the project and the clients installed; default .venv/bin/python),
# VITSERVE_TEST_TRAINER (ort|ort-training), REF_PYTHON (the reference's python: default .venv-ort/bin/python,
# `make ort-env`, for ort; PYTHON for ort-training),
# VITSERVE_TEST_ENGINE (docker|podman: force one), VITSERVE_TEST_BASE_IMAGE (base image to build against),
# VITSERVE_DOCKER_CACHE, DEBIAN_MIRROR (for debootstrap; default http://deb.debian.org/debian),
# VITSERVE_TEST_IMAGE (tag to build; default localhost/vitserve:test).
set -euo pipefail
cd "$(dirname "$0")/../.."

PY=${PYTHON:-.venv/bin/python}
TRAINER=${VITSERVE_TEST_TRAINER:-ort}
case "$TRAINER" in
ort) REF_PY=${REF_PYTHON:-.venv-ort/bin/python} ;;
ort-training) REF_PY=${REF_PYTHON:-$PY} ;;
*) echo "VITSERVE_TEST_TRAINER must be ort or ort-training, got '$TRAINER'" >&2; exit 1 ;;
esac
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the host client is this checkout's
IMAGE=${VITSERVE_TEST_IMAGE:-localhost/vitserve:test}
CACHE=${VITSERVE_DOCKER_CACHE:-/var/cache/vitserve-docker}
LOCAL_BASE=localhost/vitserve-base:bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
ARTIFACTS=artifacts/digits
MODEL=digits
MAX_MB=700
RUN_ID="vitserve-test-$$"
VOLUME="$RUN_ID-data"
CONTAINERS=()
START=$(date +%s)
passed=0
failed=0

pass() { echo "PASS $*"; passed=$((passed + 1)); }
fail() { echo "FAIL $*"; failed=$((failed + 1)); }
note() { echo "---- $* ($(( $(date +%s) - START )) s)"; }
finish() {
    echo "docker test: $passed passed, $failed failed"
    if [ "$failed" -eq 0 ] && [ "$passed" -gt 0 ]; then exit 0; fi
    exit 1
}
# A check that cannot go on: the rest depends on it.
abort() {
    fail "$*"
    finish
}
# The test cannot run at all on this machine.
cannot_run() {
    echo "docker test: cannot run: $*"
    echo "FAIL docker test could not run (see the line above)"
    echo "docker test: $passed passed, 1 failed"
    exit 1
}

# ---- engine ------------------------------------------------------------------------------------------
ENGINE=${VITSERVE_TEST_ENGINE:-}
if [ -z "$ENGINE" ]; then
    if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
        ENGINE=docker
    else
        ENGINE=podman
    fi
fi
case "$ENGINE" in
docker)
    docker info >/dev/null 2>&1 || cannot_run "VITSERVE_TEST_ENGINE=docker but no Docker engine answers ('docker info' fails)"
    E=(docker)
    BUILD_FLAGS=()
    RUN_FLAGS=(--network host)
    BASE_IMAGE=${VITSERVE_TEST_BASE_IMAGE:-}
    [ -z "$BASE_IMAGE" ] && [ "$TRAINER" = ort-training ] && BASE_IMAGE=python:3.12-slim
    ;;
podman)
    why="no Docker engine answers ('docker info' fails or docker is not installed), so the test uses podman"
    if ! command -v podman >/dev/null 2>&1 || ! command -v runc >/dev/null 2>&1 \
        || { [ -z "${VITSERVE_TEST_BASE_IMAGE:-}" ] && ! command -v debootstrap >/dev/null 2>&1; }; then
        [ "$(id -u)" -eq 0 ] || cannot_run "$why; podman, runc or debootstrap is missing and installing them needs root (run as root, or: apt-get install podman buildah debootstrap runc)"
        command -v apt-get >/dev/null 2>&1 || cannot_run "$why; podman, runc or debootstrap is missing and there is no apt-get to install them"
        note "installing podman buildah debootstrap runc"
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman buildah debootstrap runc >/dev/null; } \
            || cannot_run "$why; 'apt-get install podman buildah debootstrap runc' failed"
    fi
    [ "$(id -u)" -eq 0 ] || cannot_run "$why; this script runs podman as root (debootstrap, runc, volumes): run it as root"
    # runc, host ulimits and the host network: the recipe that works on these machines (see docs/deploy.md).
    E=(podman --runtime runc)
    nofile=$(ulimit -Hn)
    ULIMITS=(--ulimit "nofile=$nofile:$nofile" --ulimit nproc=32768:32768)
    # --format docker keeps HEALTHCHECK (the OCI format has none); the CA bundle lets pip in RUN reach PyPI.
    BUILD_FLAGS=(--pull=never --format docker --network host "${ULIMITS[@]}")
    [ -f /etc/ssl/certs/ca-certificates.crt ] \
        && BUILD_FLAGS+=(-v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)
    RUN_FLAGS=(--network host "${ULIMITS[@]}")
    BASE_IMAGE=${VITSERVE_TEST_BASE_IMAGE:-$LOCAL_BASE}
    ;;
*) cannot_run "VITSERVE_TEST_ENGINE must be docker or podman, got '$ENGINE'" ;;
esac
note "engine: ${E[*]}; base image: ${BASE_IMAGE:-the default of the Dockerfile}; trainer: $TRAINER"

WORK=$(mktemp -d)
cleanup() {
    local c
    for c in "${CONTAINERS[@]}"; do "${E[@]}" rm -f "$c" >/dev/null 2>&1 || true; done
    "${E[@]}" volume rm -f "$VOLUME" >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

# The engine, minus the noise of podman without systemd ("unable to get systemd connection" for the health
# check timers it cannot create: the test runs the health check itself).
eng() {
    local rc=0
    "${E[@]}" "$@" 2>"$WORK/engine.err" || rc=$?
    grep -v 'systemd connection' "$WORK/engine.err" >&2 || true
    return $rc
}
# One-off commands in the image, without its health check.
in_image() {  # in_image [run options...] --entrypoint CMD IMAGE ARGS...
    eng run --rm --no-healthcheck "${RUN_FLAGS[@]}" "$@"
}

# ---- (0) artifacts and the host client -----------------------------------------------------------------
[ -x "$PY" ] || cannot_run "no host python at $PY (run 'make install' first, or set PYTHON)"
[ -x "$REF_PY" ] || cannot_run "no python for the reference at $REF_PY (run 'make ort-env' first, or set REF_PYTHON)"
# make re-exports when the model or engine code changed (artifacts of an older export may lack what the trainer reads).
if command -v make >/dev/null 2>&1; then
    note "make export ($ARTIFACTS)"
    make export PRESET=$MODEL >/dev/null
elif [ ! -f "$ARTIFACTS/manifest.json" ]; then
    note "exporting $ARTIFACTS"
    "$PY" -m model.export --preset $MODEL --out artifacts
fi
[ -f "$ARTIFACTS/manifest.json" ] || cannot_run "$ARTIFACTS/manifest.json is missing after the export"

# ---- (1) the base image and the build ---------------------------------------------------------------
make_local_base() {
    local rootfs=$CACHE/rootfs
    if eng image exists "$LOCAL_BASE"; then
        note "base image $LOCAL_BASE: cached"
        return
    fi
    if [ ! -f "$rootfs/.vitserve-complete" ]; then
        note "debootstrap bookworm into $rootfs (first run only)"
        mkdir -p "$CACHE"
        rm -rf "$rootfs.tmp"
        debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates \
            bookworm "$rootfs.tmp" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
            || { tail -20 "$CACHE/debootstrap.log" >&2; cannot_run "debootstrap of bookworm from $MIRROR failed (log: $CACHE/debootstrap.log)"; }
        # What an image does not need: package caches and lists, documentation, locales.
        rm -rf "$rootfs.tmp"/var/cache/apt/* "$rootfs.tmp"/var/lib/apt/lists/* "$rootfs.tmp"/usr/share/doc/* \
            "$rootfs.tmp"/usr/share/man/* "$rootfs.tmp"/usr/share/info/* "$rootfs.tmp"/usr/share/locale/*
        touch "$rootfs.tmp/.vitserve-complete"
        rm -rf "$rootfs"
        mv "$rootfs.tmp" "$rootfs"
    fi
    note "importing $rootfs as $LOCAL_BASE"
    tar -C "$rootfs" --exclude=./.vitserve-complete -c . \
        | eng import --change 'CMD ["/bin/bash"]' - "$LOCAL_BASE" >"$WORK/import.log" 2>&1 \
        || { cat "$WORK/import.log"; cannot_run "podman import of $rootfs failed"; }
}
if [ "$BASE_IMAGE" = "$LOCAL_BASE" ]; then make_local_base; fi

note "building $IMAGE"
build_args=(--build-arg TRAINER=$TRAINER --build-arg MODEL=$MODEL --build-arg ARTIFACTS=$ARTIFACTS)
[ -n "$BASE_IMAGE" ] && build_args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
if eng build "${BUILD_FLAGS[@]}" "${build_args[@]}" -t "$IMAGE" -f Dockerfile . >"$WORK/build.log" 2>&1; then
    pass "the image builds ($(( $(date +%s) - START )) s so far)"
else
    tail -40 "$WORK/build.log"
    abort "the image builds (the build log's tail is above)"
fi

# ---- (6 first: needs no server) the image itself ----------------------------------------------------------
if out=$(in_image --entrypoint /opt/venv/bin/python "$IMAGE" -c "import torch" 2>&1); then
    fail "torch is not importable in the image (it imported)"
elif grep -q "No module named 'torch'" <<<"$out"; then
    pass "torch is not importable in the image"
else
    fail "torch is not importable in the image (unexpected output: $out)"
fi
# The trainer's runtime: plain onnxruntime without a training module for ort, the training build for ort-training.
runtime=$(in_image --entrypoint /opt/venv/bin/python "$IMAGE" -c \
    "import importlib.util as u, os, onnxruntime as o; print(os.environ.get('VITSERVE_TRAINER'), o.__version__, u.find_spec('onnxruntime.training') is not None)" 2>&1 || true)
case "$TRAINER" in ort) want="ort 1.31.* False" ;; *) want="ort-training 1.19.2 True" ;; esac
# shellcheck disable=SC2254
case "$runtime" in
$want) pass "the image's VITSERVE_TRAINER and ONNX Runtime are the trainer's ($runtime)" ;;
*) fail "the image's VITSERVE_TRAINER and ONNX Runtime are the trainer's (want $want, got: $runtime)" ;;
esac
uid=$(in_image --entrypoint id "$IMAGE" -u 2>&1 || true)
if [ "$uid" != "0" ] && [[ "$uid" =~ ^[0-9]+$ ]]; then pass "the image runs as a non-root user (uid $uid)"; else fail "the image runs as a non-root user (got: $uid)"; fi
size=$(eng image inspect --format '{{.Size}}' "$IMAGE")
size_mb=$(( size / 1000000 ))
echo "image size: $size_mb MB ($size bytes, base ${BASE_IMAGE:-python:3.13-slim}, trainer $TRAINER)"
if [ "$size_mb" -le "$MAX_MB" ]; then pass "the image is at most $MAX_MB MB ($size_mb MB)"; else fail "the image is at most $MAX_MB MB ($size_mb MB)"; fi
version=$("$PY" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
entrypoint=$(eng image inspect --format '{{json .Config.Entrypoint}}' "$IMAGE")
installed=$(in_image --entrypoint /opt/venv/bin/python "$IMAGE" -c \
    "import importlib.metadata as m; d = m.distribution('vitserve'); print(d.version, *sorted(e.name for e in d.entry_points if e.group == 'console_scripts'))" 2>&1 || true)
if [ "$installed" = "$version vitserve vitserve-server" ] && [ "$entrypoint" = '["/opt/venv/bin/vitserve-server"]' ]; then
    pass "the image holds the package vitserve $version; its entrypoint is the console script vitserve-server"
else
    fail "the image holds the package vitserve $version with its console scripts (got: $installed), entrypoint vitserve-server (got: $entrypoint)"
fi
if out=$(in_image --entrypoint /opt/venv/bin/python "$IMAGE" -m server --help 2>&1) && grep -q -- "--artifacts" <<<"$out"; then
    pass "python -m server still works in the image (--help)"
else
    fail "python -m server still works in the image (--help said: $(tail -5 <<<"$out"))"
fi

# ---- (2) run with a volume, wait for health ---------------------------------------------------------
PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
ADDRESS=127.0.0.1:$PORT
METRICS_PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
HTTP_PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
eng volume create "$VOLUME" >/dev/null

start_container() {  # start_container NAME
    CONTAINERS+=("$1")
    local health=()
    # docker runs the first health check only after --interval (30 s in the image): check often here.
    [ "$ENGINE" = docker ] && health=(--health-interval 2s)
    eng run -d --name "$1" "${RUN_FLAGS[@]}" "${health[@]}" -v "$VOLUME:/data" -e "VITSERVE_PORT=$PORT" \
        -e "VITSERVE_METRICS_PORT=$METRICS_PORT" -e "VITSERVE_HTTP_PORT=$HTTP_PORT" "$IMAGE" >/dev/null
}

# The image's own HEALTHCHECK (vitserve health inside the container) until it passes.
wait_healthy() {  # wait_healthy NAME -> 0 when healthy within 120 s
    local deadline=$(( $(date +%s) + 120 )) state
    while [ "$(date +%s)" -lt "$deadline" ]; do
        state=$(eng inspect --format '{{.State.Status}}' "$1" 2>/dev/null || echo gone)
        if [ "$state" != running ]; then
            echo "container $1 is $state; its log:"; eng logs "$1" 2>&1 | tail -30
            return 1
        fi
        if [ "$ENGINE" = podman ]; then
            eng healthcheck run "$1" >/dev/null 2>&1 && return 0
        else
            [ "$(docker inspect --format '{{.State.Health.Status}}' "$1")" = healthy ] && return 0
        fi
        sleep 1
    done
    echo "container $1 did not become healthy in 120 s; its log:"; eng logs "$1" 2>&1 | tail -30
    explain_health "$1"
    return 1
}
explain_health() {  # why the HEALTHCHECK fails although the container runs
    local from_host
    from_host=$("$PY" -m client --address "$ADDRESS" health 2>&1 || true)
    echo "from the host, 'python -m client --address $ADDRESS health' says: $from_host"
    echo "inside the container, the HEALTHCHECK says:"
    eng inspect --format '{{json .State.Health}}' "$1" 2>&1 | tail -c 2000 || true
    [ "$ENGINE" = podman ] && { eng healthcheck run "$1" 2>&1 || true; }
}

# The host-side half: the client library and CLI against the container, and the in-process reference.
cat >"$WORK/host.py" <<'EOF'
import json, sys, tempfile
from pathlib import Path
import numpy as np

def batch(step):  # the same deterministic batches everywhere
    rng = np.random.default_rng(100 + step)
    return rng.standard_normal((16, 1, 8, 8), dtype=np.float32), rng.integers(0, 10, 16).astype(np.int64)

EVAL = batch(0)
what, arg = sys.argv[1], sys.argv[2]
TRAINER = sys.argv[3] if len(sys.argv) > 3 else "ort"
out = {}
if what == "reference":  # in-process data plane on the same artifacts: the losses of steps 1-4, evals after 3
    from server.config import Settings
    from server.dataplane import DataPlane
    with tempfile.TemporaryDirectory() as data:
        plane = DataPlane(Settings(artifacts=Path(arg), data_dir=Path(data), trainer=TRAINER))
        out["losses"] = []
        for step in (1, 2, 3, 4):
            out["losses"].append(float(plane.trainer("train step").train_step(*batch(step), summaries=False).loss))
            if step == 3:
                out["eval3"] = float(plane.trainer("eval step").eval_step(*EVAL).loss)
        out["eval0_fresh"] = float(DataPlane(Settings(artifacts=Path(arg), data_dir=Path(data) / "fresh",
                                                      trainer=TRAINER)).trainer("eval step").eval_step(*EVAL).loss)
else:
    from client import ViTClient
    with ViTClient(arg, timeout=60) as c:
        out["step_before"] = c.model_info().step
        if what == "train3":  # first container: 3 steps
            out["losses"] = []
            for step in (1, 2, 3):
                r = c.train_step(*batch(step), summaries=False)
                out["losses"].append(float(r.loss))
                out["step"] = r.step
        elif what == "train4":  # second container: one more step
            out["eval3"] = float(c.eval_step(*EVAL).loss)
            r = c.train_step(*batch(4), summaries=False)
            out["losses"] = [float(r.loss)]
            out["step"] = r.step
        if what == "train3":
            out["eval3"] = float(c.eval_step(*EVAL).loss)
print(json.dumps(out))
EOF
host() { "$PY" "$WORK/host.py" "$@"; }
field() { "$PY" -c 'import json, sys; d = json.loads(sys.argv[1]); print(eval(sys.argv[2], {}, d))' "$1" "$2"; }
close() { "$PY" -c 'import sys, numpy as np; a, b = (np.array(eval(x), dtype=float) for x in sys.argv[1:3]); sys.exit(0 if a.shape == b.shape and np.allclose(a, b, rtol=1e-5, atol=1e-6) else 1)' "$1" "$2"; }

note "reference run in-process ($REF_PY, --trainer $TRAINER)"
REF=$("$REF_PY" "$WORK/host.py" reference "$ARTIFACTS" "$TRAINER") || abort "the in-process reference runs"
echo "reference: $REF"

FIRST=$RUN_ID-1
note "starting $FIRST on $ADDRESS with volume $VOLUME"
start_container "$FIRST" || abort "the container starts"
if wait_healthy "$FIRST"; then
    pass "the container's HEALTHCHECK passes (vitserve health, $(( $(date +%s) - START )) s so far)"
else
    abort "the container's HEALTHCHECK passes"
fi

# ---- (3) Predict and 3 TrainSteps from the host -------------------------------------------------------
digits=(examples/digits/*.png)
if out=$("$PY" -m client --address "$ADDRESS" predict "${digits[@]}" --top-k 1 2>&1) \
    && [ "$(grep -cF -f <(printf '%s\n' "${digits[@]}") <<<"$out")" -eq "${#digits[@]}" ] \
    && grep -q "model version 0" <<<"$out"; then
    pass "Predict from the host CLI classifies the ${#digits[@]} example digits (PNG files)"
else
    fail "Predict from the host CLI classifies the ${#digits[@]} example digits (output: $out)"
fi
ONE=$(host train3 "$ADDRESS") || abort "3 TrainSteps from the host client library"
echo "first container: $ONE"
if [ "$(field "$ONE" step_before)" = 0 ] && [ "$(field "$ONE" step)" = 3 ] \
    && close "$(field "$ONE" losses)" "$(field "$REF" 'losses[:3]')"; then
    pass "3 TrainSteps from the host: steps 1-3, losses equal the in-process reference's"
else
    fail "3 TrainSteps from the host: steps 1-3, losses equal the in-process reference's"
fi

# KServe v2 from the host with tritonclient, and the Prometheus endpoint after those calls.
if out=$("$PY" - "$ADDRESS" "$MODEL" 2>&1 <<'PYEOF'
import sys
import numpy as np
import tritonclient.grpc as tc
client = tc.InferenceServerClient(sys.argv[1])
assert client.is_server_live() and client.is_model_ready(sys.argv[2]), "not ready"
images = tc.InferInput("images", [2, 1, 8, 8], "FP32")
images.set_data_from_numpy(np.zeros((2, 1, 8, 8), np.float32))
result = client.infer(sys.argv[2], [images])
print(result.as_numpy("logits").shape, result.get_response().model_version)
PYEOF
) && [ "$out" = "(2, 10) 0" ]; then
    pass "KServe v2 from the host (tritonclient): model ready, ModelInfer gives logits (2, 10) of version 0"
else
    fail "KServe v2 from the host (tritonclient) (output: $out)"
fi
if metrics=$("$PY" -c 'import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())' \
        "http://127.0.0.1:$METRICS_PORT/metrics" 2>&1) \
    && grep -qx 'vitserve_train_step 3.0' <<<"$metrics" \
    && grep -qx 'vitserve_requests_total{code="OK",method="TrainStep"} 3.0' <<<"$metrics" \
    && grep -qx 'vitserve_requests_total{code="OK",method="ModelInfer"} 1.0' <<<"$metrics"; then
    pass "the metrics endpoint (VITSERVE_METRICS_PORT=$METRICS_PORT) counts the 3 TrainSteps and the ModelInfer"
else
    fail "the metrics endpoint counts the calls (got: $(grep -E '^vitserve_(train_step|requests_total)' <<<"$metrics" | head -20))"
fi

if ready=$("$PY" -c 'import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=10).status)' \
        "http://127.0.0.1:$HTTP_PORT/v2/health/ready" 2>&1) && [ "$ready" = 200 ]; then
    pass "the HTTP door (VITSERVE_HTTP_PORT=$HTTP_PORT) answers /v2/health/ready with 200"
else
    fail "the HTTP door answers /v2/health/ready (got: $ready)"
fi

# ---- (4) SIGTERM: clean exit, final checkpoint in the volume --------------------------------------------
note "stopping $FIRST (SIGTERM)"
t0=$(date +%s)
eng stop -t 30 "$FIRST" >/dev/null
took=$(( $(date +%s) - t0 ))
code=$(eng inspect --format '{{.State.ExitCode}}' "$FIRST")
if [ "$code" = 0 ] && [ "$took" -lt 30 ]; then
    pass "SIGTERM stops the server cleanly (exit code 0 after $took s)"
else
    fail "SIGTERM stops the server cleanly (exit code $code after $took s; 137 means it was killed)"
    eng logs "$FIRST" 2>&1 | tail -20
fi
if eng logs "$FIRST" 2>&1 | grep -q "final checkpoint step-00000003"; then
    pass "the server logs its final checkpoint step-00000003"
else
    fail "the server logs its final checkpoint step-00000003"; eng logs "$FIRST" 2>&1 | tail -20
fi
meta=$(in_image -v "$VOLUME:/data" --entrypoint cat "$IMAGE" \
    /data/$MODEL/checkpoints/step-00000003/meta.json 2>&1 || true)
if [ "$(field "$meta" '(step, reason)' 2>/dev/null)" = "(3, 'shutdown')" ] \
    && in_image -v "$VOLUME:/data" --entrypoint test "$IMAGE" \
        -s /data/$MODEL/checkpoints/step-00000003/checkpoint; then
    pass "the volume holds $MODEL/checkpoints/step-00000003 (step 3, reason shutdown)"
else
    fail "the volume holds $MODEL/checkpoints/step-00000003 (meta.json: $meta)"
fi

# ---- (5) a new container on the same volume resumes ---------------------------------------------------
SECOND=$RUN_ID-2
note "starting $SECOND on the same volume"
start_container "$SECOND" || abort "the second container starts"
wait_healthy "$SECOND" || abort "the second container becomes healthy"
TWO=$(host train4 "$ADDRESS") || abort "a TrainStep on the second container"
echo "second container: $TWO"
if [ "$(field "$TWO" step_before)" = 3 ]; then
    pass "the new container resumes at step 3"
else
    fail "the new container resumes at step 3 (got $(field "$TWO" step_before))"
fi
if close "$(field "$TWO" eval3)" "$(field "$ONE" eval3)" && close "$(field "$TWO" eval3)" "$(field "$REF" eval3)" \
    && ! close "$(field "$TWO" eval3)" "$(field "$REF" eval0_fresh)"; then
    pass "the weights resumed (EvalStep loss $(field "$TWO" eval3) as before the stop, not the fresh model's $(field "$REF" eval0_fresh))"
else
    fail "the weights resumed (EvalStep loss after restart $(field "$TWO" eval3), before $(field "$ONE" eval3), fresh $(field "$REF" eval0_fresh))"
fi
if [ "$(field "$TWO" step)" = 4 ] && close "$(field "$TWO" losses)" "$(field "$REF" 'losses[3:]')"; then
    pass "the 4th TrainStep is step 4 with the reference's loss (the optimizer state resumed too)"
else
    fail "the 4th TrainStep is step 4 with the reference's loss"
fi
eng stop -t 30 "$SECOND" >/dev/null
code=$(eng inspect --format '{{.State.ExitCode}}' "$SECOND")
if [ "$code" = 0 ]; then pass "the second container stops cleanly too"; else fail "the second container stops cleanly (exit code $code)"; fi

note "done in $(( $(date +%s) - START )) s"
finish
