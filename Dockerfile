# vitserve CPU image: the gRPC server on ONNX Runtime (CPU), every role, training included; no torch.
#
#   make export                                    # artifacts/digits (the context must hold the model)
#   docker build -t vitserve:cpu .                 # or: make docker
#   docker run -d --name vitserve -p 50051:50051 -v vitserve-data:/data vitserve:cpu
#   vitserve --address 127.0.0.1:50051 info          # or python -m client (pip install .: see the README)
#   docker stop vitserve                           # SIGTERM: drain, final checkpoint in /data, exit 0
#
# Build arguments:
#   BASE_IMAGE  any Debian-like image with python3 >= 3.11 and its venv module (default python:3.13-slim;
#               tests/docker/run.sh uses a local debootstrapped bookworm, Python 3.11)
#   TRAINER     the ONNX Runtime and the trainer (VITSERVE_TRAINER): ort (default) installs requirements/ort.txt,
#               the maintained onnxruntime 1.31 (Python 3.11-3.13); ort-training installs
#               requirements/ort-training.txt, the deprecated onnxruntime-training-cpu 1.19.2, which needs a base
#               with Python <= 3.12 (the build stops with an error line on 3.13+):
#               docker build --build-arg TRAINER=ort-training --build-arg BASE_IMAGE=python:3.12-slim .
#               (make docker TRAINER=ort-training picks that base)
#   ROLE        the server's default role (VITSERVE_ROLE): all (default), train or predict; every lock serves all three
#   MPI         1: the data-parallel trainer for the Kubeflow MPI Operator (deploy/k8s/mpijob.yaml): adds
#               requirements/mpi.txt (mpi4py, Open MPI and its mpirun in /opt/venv/bin) on top of the TRAINER's lock
#               and an sshd that runs as the image's user on port 2222 (config /home/vitserve/.sshd_config); ROLE must
#               be all or train. make docker-mpi = docker build --build-arg MPI=1 -t vitserve:mpi .  (default 0)
#   MODEL       the model's name: artifacts go to /models/$MODEL (default digits)
#   ARTIFACTS   the exported folder in the build context to bake in (default artifacts/$MODEL)
# The project is installed into /opt/venv as a package (pyproject.toml, without model/: no torch), so the
# entrypoint is its console script vitserve-server and the health check runs vitserve; `python -m server`
# and `python -m client` work too (docker run --entrypoint python IMAGE -m server ...).
# Run time: every server flag is also an environment variable VITSERVE_<FLAG> (vitserve-server --help);
# mount other artifacts read-only over /models/<name> and point VITSERVE_ARTIFACTS at them.
# /data (checkpoints and published model versions) is a volume owned by uid 10001: a host directory
# mounted there must be writable by that uid.

ARG BASE_IMAGE=python:3.13-slim

# ---- builder: a virtual environment with only what serving needs ----------------------------------
FROM ${BASE_IMAGE} AS builder

ARG MODEL=digits
ARG ARTIFACTS=artifacts/${MODEL}
ARG TRAINER=ort
ARG ROLE=all
ARG MPI=0

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore

# python3 is /usr/local/bin/python3 on the python:* images and /usr/bin/python3 on Debian's: the venv
# hides the difference (everything after this line uses /opt/venv/bin/python).
RUN python3 -m venv /opt/venv
COPY requirements/ort.txt requirements/ort-training.txt requirements/mpi.txt /tmp/requirements/
# The TRAINER's lock, plus mpi.txt for MPI=1; the arguments are checked before anything is installed.
RUN case "$TRAINER" in \
        ort) lock=ort.txt ;; \
        ort-training) lock=ort-training.txt; \
           /opt/venv/bin/python -c 'import sys; sys.exit(sys.version_info >= (3, 13))' \
           || { echo "error: TRAINER=ort-training needs a base image with Python <= 3.12 (onnxruntime-training-cpu 1.19.2 has no wheels for $(/opt/venv/bin/python --version)): add --build-arg BASE_IMAGE=python:3.12-slim" >&2; exit 1; } ;; \
        *) echo "error: TRAINER must be ort or ort-training, got '$TRAINER'" >&2; exit 1 ;; \
    esac \
    && case "$ROLE" in \
        all|train|predict) ;; \
        *) echo "error: ROLE must be all, train or predict, got '$ROLE'" >&2; exit 1 ;; \
    esac \
    && case "$MPI" in \
        0) mpi= ;; \
        1) [ "$ROLE" != predict ] || { echo "error: MPI=1 trains: use ROLE=all or train, not $ROLE" >&2; exit 1; }; \
           mpi=/tmp/requirements/mpi.txt ;; \
        *) echo "error: MPI must be 0 or 1, got '$MPI'" >&2; exit 1 ;; \
    esac \
    && /opt/venv/bin/python -m pip install -r "/tmp/requirements/$lock" ${mpi:+-r "$mpi"} \
    && /opt/venv/bin/python -c "import onnxruntime, grpc, numpy, PIL, onnx, safetensors"

# The code: the project as a package, without dependencies (the layer above installed them, pinned; pip
# check fails the build if pyproject.toml asks for anything else). It brings the console scripts
# vitserve-server and vitserve; pip compiles it ahead (the runtime user cannot write __pycache__). model/
# (torch) is not in the build context (.dockerignore), so the package is built without it.
COPY pyproject.toml README.md /tmp/src/
COPY proto/ /tmp/src/proto/
COPY engine/ /tmp/src/engine/
COPY server/ /tmp/src/server/
COPY client/ /tmp/src/client/
RUN /opt/venv/bin/python -m pip install --no-deps /tmp/src \
    && /opt/venv/bin/python -m pip check \
    && /opt/venv/bin/python -c "import server.__main__, client.__main__" \
    && /opt/venv/bin/python -m pip uninstall -y pip setuptools
COPY ${ARTIFACTS}/ /models/${MODEL}/
RUN chmod -R a+rX,go-w /models

# ---- runtime -----------------------------------------------------------------------------------------
FROM ${BASE_IMAGE}

ARG MODEL=digits
ARG TRAINER=ort
ARG ROLE=all
ARG MPI=0

LABEL org.opencontainers.image.title="vitserve" \
      org.opencontainers.image.description="gRPC server: ViT inference and fine-tuning on ONNX Runtime (CPU); trainer ${TRAINER}, default role ${ROLE}"

RUN groupadd --system --gid 10001 vitserve \
    && useradd --system --uid 10001 --gid vitserve --home-dir /data --no-create-home --shell /usr/sbin/nologin vitserve \
    && mkdir -p /data \
    && chown vitserve:vitserve /data

# MPI=1: the MPI Operator's launcher starts the ranks over ssh, so workers run an sshd as the image's user (port
# 2222, host key and config in its home; the operator mounts the keys into /home/vitserve/.ssh). ssh passes no
# environment: the sshd's SetEnv gives the ranks /opt/venv/bin (Open MPI's prted and mpirun live there).
# hadolint ignore=DL3008
RUN if [ "$MPI" = 1 ]; then \
        apt-get update && apt-get install -y --no-install-recommends openssh-server openssh-client \
        && rm -rf /var/lib/apt/lists/* \
        && mkdir -p /home/vitserve/.ssh \
        && ssh-keygen -q -t ed25519 -N "" -f /home/vitserve/ssh_host_ed25519_key \
        && printf '%s\n' 'Port 2222' 'HostKey /home/vitserve/ssh_host_ed25519_key' 'PidFile /home/vitserve/sshd.pid' \
            'AuthorizedKeysFile /home/vitserve/.ssh/authorized_keys' 'PasswordAuthentication no' 'UsePAM no' \
            'StrictModes no' 'SetEnv PATH=/opt/venv/bin:/usr/local/bin:/usr/bin:/bin' > /home/vitserve/.sshd_config \
        && usermod --home /home/vitserve --shell /bin/sh vitserve \
        && chown -R vitserve:vitserve /home/vitserve; \
    fi

COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /models /models

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    VITSERVE_ARTIFACTS=/models/${MODEL} \
    VITSERVE_HOST=0.0.0.0 \
    VITSERVE_PORT=50051 \
    VITSERVE_DEVICE=cpu \
    VITSERVE_TRAINER=${TRAINER} \
    VITSERVE_ROLE=${ROLE} \
    VITSERVE_DATA_DIR=/data

VOLUME ["/data"]
WORKDIR /data
USER 10001:10001
# gRPC (vitserve.v1, KServe v2, health, reflection), HTTP (KServe v2 REST and vitserve.v1 over JSON,
# VITSERVE_HTTP_PORT) and Prometheus /metrics (VITSERVE_METRICS_PORT). The HEALTHCHECK stays on gRPC's
# health service: it covers the process and the model; an HTTP probe can use /v2/health/ready instead.
EXPOSE 50051 8000 8002

# The standard grpc.health.v1 service, asked for "vitserve.v1.VitServe"; through sh so that it follows
# VITSERVE_PORT when the port is changed at run time.
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["/bin/sh", "-c", "exec vitserve --address \"127.0.0.1:${VITSERVE_PORT:-50051}\" --timeout 5 health"]

# Exec form: the console script's interpreter (#!/opt/venv/bin/python) is PID 1 and gets SIGTERM itself
# (graceful drain, then the final checkpoint).
ENTRYPOINT ["/opt/venv/bin/vitserve-server"]
CMD []
