"""gRPC server reflection, v1 and v1alpha, with the full descriptors of every service on the port.

grpcio-reflection ships only `grpc.reflection.v1alpha`; v1 (what grpcurl and newer clients ask
first) has the same messages with the same field numbers, so the same servicer serves both: under
its own name, and under `grpc.reflection.v1.ServerReflection` with v1alpha's (identical on the
wire) messages.

The servicer answers from a descriptor pool of its own, never the process-wide default one. The
KServe v2 service is registered by hand as `inference.GRPCInferenceService` (server/kserve.py)
while its messages live in package `vitserve.oip` (proto/open_inference.proto says why), so no
generated file declares the service. This module builds that file (`inference/grpc_service.proto`:
package `inference`, `service GRPCInferenceService` with the methods server/kserve.py serves,
their types the vitserve.oip messages) and adds it to the private pool with everything it needs.
The default pool never sees an `inference.*` name, so tritonclient still imports beside the server.
The pool also holds a v1 copy of the reflection proto, so that service can be described too.
"""
from __future__ import annotations

from typing import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor, ServiceDescriptor
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from proto import open_inference_pb2
from server import kserve

V1ALPHA_SERVICE_NAME = reflection.SERVICE_NAME  # "grpc.reflection.v1alpha.ServerReflection"
V1_PACKAGE = "grpc.reflection.v1"
V1_SERVICE_NAME = f"{V1_PACKAGE}.ServerReflection"
V1_FILE = "grpc/reflection/v1/reflection.proto"  # the name of the file in grpc's own repository
INFERENCE_FILE = "inference/grpc_service.proto"  # built here: no such file exists on disk


def _file_proto(descriptor: FileDescriptor) -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto()
    descriptor.CopyToProto(proto)
    return proto


def inference_service_file() -> descriptor_pb2.FileDescriptorProto:
    """`service GRPCInferenceService` in package `inference`, one rpc per method served (kserve.METHODS), its
    request and response types the vitserve.oip messages of proto/open_inference.proto."""
    package, _, service_name = kserve.SERVICE_NAME.rpartition(".")
    file = descriptor_pb2.FileDescriptorProto(name=INFERENCE_FILE, package=package, syntax="proto3",
                                              dependency=[open_inference_pb2.DESCRIPTOR.name])
    service = file.service.add(name=service_name)
    for name, (request, response) in kserve.METHODS.items():
        service.method.add(name=name, input_type=f".{request.DESCRIPTOR.full_name}",
                           output_type=f".{response.DESCRIPTOR.full_name}")
    return file


def v1_reflection_file() -> descriptor_pb2.FileDescriptorProto:
    """grpc.reflection.v1's proto: v1alpha's messages and service under the v1 package (same fields, numbers)."""
    file = _file_proto(reflection_pb2.DESCRIPTOR)
    old, new = f".{reflection_pb2.DESCRIPTOR.package}.", f".{V1_PACKAGE}."
    file.name, file.package = V1_FILE, V1_PACKAGE
    file.ClearField("options")  # v1alpha's language options (packages of generated code) are not v1's

    def rename(messages) -> None:
        for message in messages:
            for field in message.field:
                if field.type_name.startswith(old):
                    field.type_name = new + field.type_name[len(old):]
            rename(message.nested_type)

    rename(file.message_type)
    for service in file.service:
        for method in service.method:
            method.input_type = new + method.input_type[len(old):]
            method.output_type = new + method.output_type[len(old):]
    return file


class MethodAwarePool:
    """A descriptor pool whose FindFileContainingSymbol also finds a method's file ("pkg.Service.Method"):
    protobuf's upb pool knows no methods as symbols, and grpcurl asks for them (`describe pkg.Service.Method`).
    Everything else is the pool's."""

    def __init__(self, pool: descriptor_pool.DescriptorPool) -> None:
        self._pool = pool

    def __getattr__(self, name: str):
        return getattr(self._pool, name)

    def FindFileContainingSymbol(self, symbol: str) -> FileDescriptor:  # noqa: N802 - the pool's method name
        try:
            return self._pool.FindFileContainingSymbol(symbol)
        except KeyError:
            service, _, method = symbol.rpartition(".")
            try:
                found = self._pool.FindServiceByName(service)
            except KeyError:
                raise KeyError(symbol) from None
            if method not in found.methods_by_name:
                raise KeyError(symbol) from None
            return found.file


def reflection_pool(services: Iterable[ServiceDescriptor]) -> descriptor_pool.DescriptorPool:
    """A pool of its own with the files of `services` and of the v2 service and both reflection versions,
    each after the files it imports."""
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file: descriptor_pb2.FileDescriptorProto, dependencies: Iterable[FileDescriptor] = ()) -> None:
        for dependency in dependencies:
            if dependency.name not in added:
                add(_file_proto(dependency), dependency.dependencies)
        if file.name not in added:
            pool.AddSerializedFile(file.SerializeToString())
            added.add(file.name)

    for service in services:
        add(_file_proto(service.file), service.file.dependencies)
    add(_file_proto(reflection_pb2.DESCRIPTOR), reflection_pb2.DESCRIPTOR.dependencies)
    add(v1_reflection_file())
    add(inference_service_file(), [open_inference_pb2.DESCRIPTOR])
    return pool


def enable(server: grpc.Server, services: Iterable[ServiceDescriptor]) -> tuple[str, ...]:
    """Serve reflection v1 and v1alpha on `server`, describing `services`, the v2 service and reflection
    itself; returns the service names it lists."""
    services = list(services)
    names = tuple(sorted({*(s.full_name for s in services), kserve.SERVICE_NAME, V1ALPHA_SERVICE_NAME,
                          V1_SERVICE_NAME}))
    servicer = reflection.ReflectionServicer(names, pool=MethodAwarePool(reflection_pool(services)))
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1 = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo, request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(V1_SERVICE_NAME,
                                                                          {"ServerReflectionInfo": v1}),))
    return names
