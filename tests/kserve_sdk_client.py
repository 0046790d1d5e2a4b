"""The kserve SDK's v2 clients (REST and gRPC) against a vitserve server, in a process of their own.

kserve registers its own `inference.*` protobuf messages, as tritonclient does, so the two cannot be
imported in one process: tests/test_http.py runs this script with the server's addresses and compares
what it prints (one JSON document) with the gRPC Predict logits.

    python tests/kserve_sdk_client.py HTTP_ADDRESS GRPC_ADDRESS MODEL IMAGES.npy
"""
from __future__ import annotations

import asyncio
import json
import sys

import numpy as np
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig


async def main(http: str, grpc_address: str, model: str, images: np.ndarray) -> dict:
    def request() -> InferRequest:
        tensor = InferInput("images", list(images.shape), "FP32")
        tensor.set_data_from_numpy(images, binary_data=False)
        return InferRequest(model_name=model, infer_inputs=[tensor])

    rest = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60))
    base = f"http://{http}"
    try:
        rest_answer = await rest.infer(base, request(), model_name=model)
        out = {"rest": {"live": await rest.is_server_live(base), "ready": await rest.is_server_ready(base),
                        "model_ready": await rest.is_model_ready(base, model),
                        "logits": rest_answer.outputs[0].as_numpy().tolist()}}
    finally:
        await rest.close()
    grpc_client = InferenceGRPCClient(grpc_address, timeout=60)
    try:
        grpc_answer = await grpc_client.infer(request())
        out["grpc"] = {"live": await grpc_client.is_server_live(), "ready": await grpc_client.is_server_ready(),
                       "model_ready": await grpc_client.is_model_ready(model),
                       "logits": grpc_answer.outputs[0].as_numpy().tolist()}
    finally:
        await grpc_client.close()
    return out


if __name__ == "__main__":
    http_address, grpc_address, model_name, path = sys.argv[1:5]
    print(json.dumps(asyncio.run(main(http_address, grpc_address, model_name, np.load(path)))))
