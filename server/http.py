"""The HTTP door: KServe v2 / Open Inference Protocol over REST, and vitserve.v1 over HTTP/JSON (FastAPI + uvicorn).

Same data plane, decoding, dynamic batcher, bearer-token roles and TLS certificate as the gRPC port, and
no logic of its own: a v2 route builds the v2 gRPC message and calls server/kserve.py's servicer, a /v1
route parses its body with protobuf's JSON mapping into the vitserve.v1 request and calls
VitServeServicer. Both answer through `Door`, which turns their aborts into an HTTP status and
`{"error": "..."}` with the gRPC message. v2 infer takes JSON tensors and Triton's binary tensor data
extension (`Inference-Header-Content-Length`) both ways.

    create_http_server(settings, plane, security) -> HttpServer (its .port; .stop())
"""
from __future__ import annotations

import base64
import json
import logging
import socket
import ssl
import threading
from dataclasses import dataclass

import grpc
import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from google.protobuf import json_format
from google.protobuf.message import Message
from starlette.concurrency import run_in_threadpool

from engine.errors import ConfigError
from proto import open_inference_pb2 as v2
from proto import vitserve_pb2 as pb
from server import kserve
from server.auth import SERVICE_PREFIX, V2_PREFIX, Security, TokenAuth
from server.config import Settings
from server.dataplane import DataPlane
from server.servicer import VitServeServicer

log = logging.getLogger(__name__)
HEADER_LENGTH = "Inference-Header-Content-Length"  # Triton's binary tensor data extension
# gRPC status -> HTTP status, as google.rpc maps them (https://cloud.google.com/apis/design/errors).
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.FAILED_PRECONDITION: 400, grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401, grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409, grpc.StatusCode.ABORTED: 409, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499, grpc.StatusCode.UNIMPLEMENTED: 501, grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
V1_ROUTES = [  # (HTTP methods, path, VitServe method, request message): GET routes read their fields from the query
    (("POST",), "/v1/predict", "Predict", pb.PredictRequest),
    (("POST",), "/v1/train-step", "TrainStep", pb.TrainStepRequest),
    (("POST",), "/v1/eval-step", "EvalStep", pb.EvalStepRequest),
    (("GET",), "/v1/model-info", "GetModelInfo", pb.GetModelInfoRequest),
    (("GET",), "/v1/optimizer", "GetOptimizer", pb.GetOptimizerRequest),
    (("POST",), "/v1/optimizer", "SetOptimizer", pb.SetOptimizerRequest),
    (("GET",), "/v1/checkpoints", "ListCheckpoints", pb.ListCheckpointsRequest),
    (("POST",), "/v1/checkpoints", "SaveCheckpoint", pb.SaveCheckpointRequest),
    (("POST",), "/v1/checkpoints/restore", "RestoreCheckpoint", pb.RestoreCheckpointRequest),
    (("POST",), "/v1/publish", "Publish", pb.PublishRequest),
    (("GET", "POST"), "/v1/explain", "ExplainGradients", pb.ExplainGradientsRequest),
    (("POST",), "/v1/head-importance", "HeadImportance", pb.HeadImportanceRequest),
    (("GET", "POST"), "/v1/gradient-history", "GetGradientHistory", pb.GradientHistoryRequest),
    (("POST",), "/v1/attribute", "Attribute", pb.AttributeRequest),
]


class Aborted(Exception):
    """A servicer's context.abort(code, message), raised so the route can answer with the HTTP status."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class Context:
    """The part of grpc.ServicerContext the servicers use, for a call that came in over HTTP."""

    def abort(self, code: grpc.StatusCode, message: str):
        raise Aborted(code, message)

    def time_remaining(self):  # HTTP carries no deadline
        return None


def error(code: grpc.StatusCode, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=HTTP_STATUS.get(code, 500))


def to_json(message: Message) -> dict:
    """protobuf's JSON mapping (the /v1 routes): field names as in the proto, int64 as strings, bytes as base64."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


def v2_json(message: Message) -> dict:
    """A v2 answer as the REST protocol writes it: every field, enums by name, 64-bit integers as JSON numbers
    (protobuf's JSON mapping would write them as strings)."""
    def value(field, v):
        if field.message_type is not None:
            return v2_json(v)
        if field.enum_type is not None:
            return field.enum_type.values_by_number[v].name
        if field.type == field.TYPE_BYTES:
            return base64.b64encode(v).decode()
        return v

    out = {}
    for field in message.DESCRIPTOR.fields:
        v = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            item = field.message_type.fields_by_name["value"]
            out[field.name] = {k: value(item, x) for k, x in v.items()}
        elif field.is_repeated:
            out[field.name] = [value(field, x) for x in v]
        elif field.message_type is None or message.HasField(field.name):
            out[field.name] = value(field, v)
    return out


@dataclass
class Door:
    """Runs one call: the token check for its gRPC method name, then the servicer method, off the event loop."""
    auth: TokenAuth | None

    async def call(self, request: Request, method: str, handler, message: Message):
        if self.auth is not None:
            refused = self.auth.refusal(method, [("authorization", request.headers.get("authorization", ""))])
            if refused:
                return None, error(*refused)
        try:
            return await run_in_threadpool(handler, message, Context()), None
        except Aborted as e:
            return None, error(e.code, e.message)


# ---------------------------------------------------------------- the v2 infer body

def parse_infer(body: bytes, header_length: str | None, model: str, version: str) -> tuple[v2.ModelInferRequest, bool]:
    """An HTTP v2 infer body (JSON, or JSON then binary tensor data) as the gRPC ModelInferRequest, and whether the
    answer should carry its output as binary data."""
    try:
        split = int(header_length) if header_length is not None else len(body)
        if not 0 <= split <= len(body):
            raise ValueError
    except ValueError:
        raise Aborted(grpc.StatusCode.INVALID_ARGUMENT, f"{HEADER_LENGTH} must be a byte count within the body, "
                                                        f"got {header_length!r}") from None
    try:
        doc = json.loads(body[:split] or b"{}")
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Aborted(grpc.StatusCode.INVALID_ARGUMENT, f"the request body is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs", []), list):
        raise Aborted(grpc.StatusCode.INVALID_ARGUMENT, "the request body must be a JSON object with an 'inputs' list")
    request = v2.ModelInferRequest(model_name=model, model_version=version, id=str(doc.get("id", "")))
    binary, offset = body[split:], 0
    for i, tensor in enumerate(doc.get("inputs", [])):
        if not isinstance(tensor, dict):
            raise Aborted(grpc.StatusCode.INVALID_ARGUMENT, f"inputs[{i}] must be a JSON object")
        shape = tensor.get("shape", [])
        if not isinstance(shape, list) or not all(isinstance(d, int) for d in shape):
            raise Aborted(grpc.StatusCode.INVALID_ARGUMENT, f"inputs[{i}].shape must be a list of integers")
        request.inputs.add(name=str(tensor.get("name", "")), datatype=str(tensor.get("datatype", "")), shape=shape)
        size = (tensor.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise Aborted(grpc.StatusCode.INVALID_ARGUMENT, f"inputs[{i}].parameters.binary_data_size {size!r} "
                                                                f"does not fit the {len(binary)} bytes of binary data")
            request.raw_input_contents.append(binary[offset:offset + size])
            offset += size
        elif "data" in tensor:
            try:
                values = np.asarray(tensor["data"], dtype="<f4").reshape(-1)
            except (TypeError, ValueError):
                raise Aborted(grpc.StatusCode.INVALID_ARGUMENT, f"inputs[{i}].data must be numbers (FP32), "
                                                                "flat or nested") from None
            request.raw_input_contents.append(values.tobytes())
    wanted = doc.get("outputs") or []
    as_binary = bool((doc.get("parameters") or {}).get("binary_data_output")) or any(
        isinstance(o, dict) and (o.get("parameters") or {}).get("binary_data") for o in wanted)
    for o in wanted:
        if isinstance(o, dict):
            request.outputs.add(name=str(o.get("name", "")))
    return request, as_binary


def infer_answer(response: v2.ModelInferResponse, as_binary: bool) -> Response:
    """The HTTP body of a ModelInferResponse: JSON data, or JSON then the raw FP32 bytes."""
    outputs, tail = [], b""
    for tensor, raw in zip(response.outputs, response.raw_output_contents):
        entry = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if as_binary:
            entry["parameters"] = {"binary_data_size": len(raw)}
            tail += raw
        else:
            entry["data"] = np.frombuffer(raw, dtype="<f4").tolist()
        outputs.append(entry)
    doc = {"model_name": response.model_name, "model_version": response.model_version, "outputs": outputs}
    if response.id:
        doc["id"] = response.id
    header = json.dumps(doc).encode()
    if not as_binary:
        return Response(header, media_type="application/json")
    return Response(header + tail, media_type="application/octet-stream", headers={HEADER_LENGTH: str(len(header))})


# ---------------------------------------------------------------- the app

def build_app(plane: DataPlane, security: Security) -> FastAPI:
    app = FastAPI(title="vitserve", docs_url=None, redoc_url=None, openapi_url=None)
    door = Door(TokenAuth(security.read_token, security.write_token) if security.auth else None)
    v2_servicer, v1_servicer = kserve.InferenceServicer(plane), VitServeServicer(plane)

    async def v2_call(request: Request, name: str, message: Message):
        return await door.call(request, V2_PREFIX + name, getattr(v2_servicer, name), message)

    @app.get("/v2/health/live")
    async def live(request: Request):
        answer, refused = await v2_call(request, "ServerLive", v2.ServerLiveRequest())
        return refused or JSONResponse({"live": answer.live}, status_code=200 if answer.live else 503)

    @app.get("/v2/health/ready")
    async def ready(request: Request):
        answer, refused = await v2_call(request, "ServerReady", v2.ServerReadyRequest())
        return refused or JSONResponse({"ready": answer.ready}, status_code=200 if answer.ready else 503)

    @app.get("/v2")
    async def server_metadata(request: Request):
        answer, refused = await v2_call(request, "ServerMetadata", v2.ServerMetadataRequest())
        return refused or v2_json(answer)

    @app.get("/v2/models/stats")
    @app.get("/v2/models/{model}/stats")
    @app.get("/v2/models/{model}/versions/{version}/stats")
    async def statistics(request: Request, model: str = "", version: str = ""):
        answer, refused = await v2_call(request, "ModelStatistics",
                                        v2.ModelStatisticsRequest(name=model, version=version))
        return refused or v2_json(answer)

    @app.get("/v2/models/{model}/config")
    @app.get("/v2/models/{model}/versions/{version}/config")
    async def config(request: Request, model: str, version: str = ""):
        answer, refused = await v2_call(request, "ModelConfig", v2.ModelConfigRequest(name=model, version=version))
        return refused or v2_json(answer.config)

    @app.post("/v2/repository/index")
    async def repository_index(request: Request):
        try:
            ready = bool(json.loads(await request.body() or b"{}").get("ready", False))
        except (ValueError, AttributeError):
            return error(grpc.StatusCode.INVALID_ARGUMENT, "the request body must be a JSON object like "
                                                           '{"ready": true}')
        answer, refused = await v2_call(request, "RepositoryIndex", v2.RepositoryIndexRequest(ready=ready))
        return refused or v2_json(answer)["models"]

    @app.get("/v2/models/{model}")
    @app.get("/v2/models/{model}/versions/{version}")
    async def model_metadata(request: Request, model: str, version: str = ""):
        answer, refused = await v2_call(request, "ModelMetadata", v2.ModelMetadataRequest(name=model, version=version))
        return refused or v2_json(answer)

    @app.get("/v2/models/{model}/ready")
    @app.get("/v2/models/{model}/versions/{version}/ready")
    async def model_ready(request: Request, model: str, version: str = ""):
        answer, refused = await v2_call(request, "ModelReady", v2.ModelReadyRequest(name=model, version=version))
        return refused or JSONResponse({"name": model, "ready": answer.ready},
                                       status_code=200 if answer.ready else 503)

    @app.post("/v2/models/{model}/infer")
    @app.post("/v2/models/{model}/versions/{version}/infer")
    async def infer(request: Request, model: str, version: str = ""):
        try:
            message, as_binary = parse_infer(await request.body(), request.headers.get(HEADER_LENGTH), model, version)
        except Aborted as e:
            return error(e.code, e.message)
        answer, refused = await v2_call(request, "ModelInfer", message)
        return refused or infer_answer(answer, as_binary)

    for methods, path, name, message_type in V1_ROUTES:
        app.add_api_route(path, v1_route(door, SERVICE_PREFIX + name, getattr(v1_servicer, name), message_type),
                          methods=list(methods), name=name)

    @app.exception_handler(404)
    async def not_found(request: Request, exc):
        return JSONResponse({"error": f"no route {request.method} {request.url.path} (see docs/api.md)"},
                            status_code=404)

    return app


def v1_route(door: Door, method: str, handler, message_type: type[Message]):
    async def route(request: Request):
        message = message_type()
        try:
            if request.method == "GET":
                json_format.ParseDict(dict(request.query_params), message)
            else:
                body = await request.body()
                json_format.Parse(body or b"{}", message)
        except json_format.ParseError as e:
            return error(grpc.StatusCode.INVALID_ARGUMENT, f"the request body is not a valid "
                                                           f"{message_type.DESCRIPTOR.name}: {e}")
        answer, refused = await door.call(request, method, handler, message)
        return refused or to_json(answer)

    return route


# ---------------------------------------------------------------- the server

class HttpServer:
    """uvicorn serving the app on its own thread and event loop."""

    def __init__(self, app: FastAPI, sock: socket.socket, tls: dict):
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                                     **tls))
        self._socket = sock
        self.port = sock.getsockname()[1]
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, name="vitserve-http",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """No new connections; in-flight requests finish."""
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._socket.close()


def create_http_server(settings: Settings, plane: DataPlane, security: Security) -> HttpServer | None:
    """The HTTP door on settings.host:settings.http_port (0 picks a port, -1: none); ConfigError when it cannot bind."""
    if settings.http_port < 0:
        return None
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.host, settings.http_port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot serve HTTP on {settings.host}:{settings.http_port}: {e.strerror or e}") from None
    sock.listen(128)
    tls = {}
    if security.tls:
        tls = dict(ssl_certfile=settings.tls_cert, ssl_keyfile=settings.tls_key)
        if settings.tls_client_ca:
            tls.update(ssl_ca_certs=settings.tls_client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
    server = HttpServer(build_app(plane, security), sock, tls)
    log.info("serving KServe v2 and vitserve.v1 over HTTP%s on %s:%d", "S" if security.tls else "", settings.host,
             server.port)
    return server
