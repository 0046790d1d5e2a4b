# vitserve CPU serving image: the gRPC server on ONNX Runtime (CPU), no torch.
#
#   make export                                    # artifacts/digits (the context must hold the model)
#   docker build -t vitserve:cpu .                 # or: make docker
#   docker run -d --name vitserve -p 50051:50051 -v vitserve-data:/data vitserve:cpu
#   python -m client --address 127.0.0.1:50051 info
#   docker stop vitserve                           # SIGTERM: drain, final checkpoint in /data, exit 0
#
# Build arguments:
#   BASE_IMAGE  any Debian-like image with python3 >= 3.10 and its venv module
#               (default python:3.11-slim-bookworm; tests/docker/run.sh uses a local debootstrapped bookworm)
#   MODEL       the model's name: artifacts go to /models/$MODEL (default digits)
#   ARTIFACTS   the exported folder in the build context to bake in (default artifacts/$MODEL)
# Run time: every server flag is also an environment variable VITSERVE_<FLAG> (python -m server --help);
# mount other artifacts read-only over /models/<name> and point VITSERVE_ARTIFACTS at them.
# /data (checkpoints and published model versions) is a volume owned by uid 10001: a host directory
# mounted there must be writable by that uid.

ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---- builder: a virtual environment with only what serving needs ----------------------------------
FROM ${BASE_IMAGE} AS builder

ARG MODEL=digits
ARG ARTIFACTS=artifacts/${MODEL}

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore

# python3 is /usr/local/bin/python3 on the python:* images and /usr/bin/python3 on Debian's: the venv
# hides the difference (everything after this line uses /opt/venv/bin/python).
RUN python3 -m venv /opt/venv
COPY requirements/serve.txt /tmp/serve.txt
RUN /opt/venv/bin/python -m pip install -r /tmp/serve.txt \
    && /opt/venv/bin/python -c "import onnxruntime, grpc, numpy, PIL, onnx" \
    && /opt/venv/bin/python -m pip uninstall -y pip setuptools

# The code: three packages on PYTHONPATH, compiled ahead (the runtime user cannot write __pycache__).
COPY proto/ /opt/vitserve/proto/
COPY server/ /opt/vitserve/server/
COPY client/ /opt/vitserve/client/
COPY ${ARTIFACTS}/ /models/${MODEL}/
RUN /opt/venv/bin/python -m compileall -q /opt/vitserve \
    && chmod -R a+rX,go-w /opt/vitserve /models

# ---- runtime -----------------------------------------------------------------------------------------
FROM ${BASE_IMAGE}

ARG MODEL=digits

LABEL org.opencontainers.image.title="vitserve" \
      org.opencontainers.image.description="gRPC server: ViT inference and fine-tuning on ONNX Runtime (CPU)"

RUN groupadd --system --gid 10001 vitserve \
    && useradd --system --uid 10001 --gid vitserve --home-dir /data --no-create-home --shell /usr/sbin/nologin vitserve \
    && mkdir -p /data \
    && chown vitserve:vitserve /data

COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/vitserve /opt/vitserve
COPY --from=builder /models /models

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/opt/vitserve \
    PYTHONUNBUFFERED=1 \
    VITSERVE_ARTIFACTS=/models/${MODEL} \
    VITSERVE_HOST=0.0.0.0 \
    VITSERVE_PORT=50051 \
    VITSERVE_DEVICE=cpu \
    VITSERVE_DATA_DIR=/data

VOLUME ["/data"]
WORKDIR /data
USER 10001:10001
EXPOSE 50051

# The standard grpc.health.v1 service, asked for "vitserve.v1.VitServe"; through sh so that it follows
# VITSERVE_PORT when the port is changed at run time.
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["/bin/sh", "-c", "exec python -m client --address \"127.0.0.1:${VITSERVE_PORT:-50051}\" --timeout 5 health"]

# Exec form: python is PID 1 and gets SIGTERM itself (graceful drain, then the final checkpoint).
ENTRYPOINT ["/opt/venv/bin/python", "-m", "server"]
CMD []
