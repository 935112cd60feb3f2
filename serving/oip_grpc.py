"""The Open Inference Protocol v2 over gRPC (`inference.GRPCInferenceService`), on the same engine as HTTP.

ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata and ModelInfer, with the messages of the
protocol's service definition as NVIDIA's `tritonclient` ships it compiled (package `inference`, a superset of
KServe's `grpc_predict_v2.proto`; the `grpc` extra installs it). The server runs on the HTTP server's event loop,
so its requests join the same batches. Errors map onto gRPC status codes (404 NOT_FOUND, 400 / 422
INVALID_ARGUMENT, 429 RESOURCE_EXHAUSTED, 503 UNAVAILABLE, 504 DEADLINE_EXCEEDED, others INTERNAL).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from . import oip
from .engine import Engine
from .errors import BadRequest, ServingError

log = logging.getLogger("multitask_peft.serving")
SERVICE = "inference.GRPCInferenceService"


def _modules() -> tuple[Any, Any]:
    try:
        import grpc
        from tritonclient.grpc import service_pb2
    except ImportError as e:
        raise ImportError(f"the gRPC endpoint needs the `grpc` extra: pip install 'multitask-peft[grpc]' ({e})") from e
    return grpc, service_pb2


def _status(grpc: Any, error: ServingError) -> Any:
    codes = {
        404: grpc.StatusCode.NOT_FOUND,
        400: grpc.StatusCode.INVALID_ARGUMENT,
        413: grpc.StatusCode.INVALID_ARGUMENT,
        422: grpc.StatusCode.INVALID_ARGUMENT,
        429: grpc.StatusCode.RESOURCE_EXHAUSTED,
        503: grpc.StatusCode.UNAVAILABLE,
        504: grpc.StatusCode.DEADLINE_EXCEEDED,
    }
    return codes.get(error.status, grpc.StatusCode.INTERNAL)


def _parameter(value: Any) -> Any:
    choice = value.WhichOneof("parameter_choice")
    return getattr(value, choice) if choice else None


def parse_grpc(request: Any) -> oip.InferRequest:
    """An `InferRequest` from a `ModelInferRequest` (raw contents or typed contents)."""
    if len(request.inputs) != 1:
        raise BadRequest(f"exactly one input tensor ({oip.IMAGE!r} or {oip.IMAGE_BYTES!r}), got {len(request.inputs)}")
    tensor = request.inputs[0]
    if "shared_memory_region" in tensor.parameters:
        raise BadRequest("shared memory inputs are not supported: send the data in the request")
    if request.raw_input_contents:
        raw = request.raw_input_contents[0]
        if tensor.datatype == "BYTES":
            values: Any = oip.decode_bytes_elements(raw, tensor.name)
        else:
            values = np.frombuffer(raw, dtype=np.uint8)
    elif tensor.datatype == "BYTES":
        values = list(tensor.contents.bytes_contents)
    else:
        contents = tensor.contents.uint_contents
        if any(v > 255 for v in contents):
            raise BadRequest(f"input {tensor.name!r}: UINT8 values must be in [0, 255]")
        values = np.asarray(contents, dtype=np.uint8)
    images = oip.images_from_tensor(tensor.name, tensor.datatype, list(tensor.shape), values)
    parameters = {k: _parameter(v) for k, v in request.parameters.items()}
    outputs = [o.name for o in request.outputs] or None
    return oip.InferRequest(images, outputs, parameters, request.id or None)


def _serialize(message: Any) -> bytes:
    return message.SerializeToString()


class _Service:
    def __init__(self, engine: Engine, pb: Any, grpc: Any) -> None:
        self.engine, self.pb, self.grpc = engine, pb, grpc

    def _ready(self) -> bool:
        return self.engine.ready and not self.engine.closing

    async def server_live(self, request: Any, context: Any) -> Any:
        return self.pb.ServerLiveResponse(live=True)

    async def server_ready(self, request: Any, context: Any) -> Any:
        return self.pb.ServerReadyResponse(ready=self._ready())

    async def model_ready(self, request: Any, context: Any) -> Any:
        oip.check_model(self.engine, request.name, request.version or None)
        return self.pb.ModelReadyResponse(ready=self._ready())

    async def server_metadata(self, request: Any, context: Any) -> Any:
        return self.pb.ServerMetadataResponse(**oip.server_metadata())

    async def model_metadata(self, request: Any, context: Any) -> Any:
        meta = oip.model_metadata(self.engine, request.name, request.version or None)
        tensor = self.pb.ModelMetadataResponse.TensorMetadata
        return self.pb.ModelMetadataResponse(
            name=meta["name"],
            versions=meta["versions"],
            platform=meta["platform"],
            inputs=[tensor(**t) for t in meta["inputs"]],
            outputs=[tensor(**t) for t in meta["outputs"]],
        )

    async def model_infer(self, request: Any, context: Any) -> Any:
        self.engine.check_capacity()
        version = request.model_version or None
        oip.check_model(self.engine, request.model_name, version)
        response = await oip.infer(self.engine, request.model_name, version, parse_grpc(request))
        out = self.pb.ModelInferResponse(model_name=response.model_name, model_version=response.model_version)
        if response.id is not None:
            out.id = response.id
        for name, datatype, array in response.outputs:
            out.outputs.add(name=name, datatype=datatype, shape=list(array.shape))
            out.raw_output_contents.append(np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes())
        return out

    def handler(self) -> Any:
        grpc, pb = self.grpc, self.pb
        methods = {
            "ServerLive": (self.server_live, pb.ServerLiveRequest),
            "ServerReady": (self.server_ready, pb.ServerReadyRequest),
            "ModelReady": (self.model_ready, pb.ModelReadyRequest),
            "ServerMetadata": (self.server_metadata, pb.ServerMetadataRequest),
            "ModelMetadata": (self.model_metadata, pb.ModelMetadataRequest),
            "ModelInfer": (self.model_infer, pb.ModelInferRequest),
        }
        handlers = {
            name: grpc.unary_unary_rpc_method_handler(
                self._guard(fn), request_deserializer=message.FromString, response_serializer=_serialize
            )
            for name, (fn, message) in methods.items()
        }
        return grpc.method_handlers_generic_handler(SERVICE, handlers)

    def _guard(self, fn: Callable[[Any, Any], Awaitable[Any]]) -> Callable[[Any, Any], Awaitable[Any]]:
        async def call(request: Any, context: Any) -> Any:
            try:
                return await fn(request, context)
            except ServingError as e:
                await context.abort(_status(self.grpc, e), e.message)
            except self.grpc.aio.AbortError:
                raise
            except Exception as e:  # never a bare crash: the client gets a status with a message
                log.exception("gRPC %s failed", fn.__name__)
                await context.abort(self.grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}")

        return call


def grpc_server(engine: Engine, host: str = "127.0.0.1", port: int = 8001, max_message_bytes: int = 64 * 2**20) -> Any:
    """A `grpc.aio` server for `engine` on host:port (not started: `await server.start()` on the engine's loop).
    Port 0 picks a free port: `server.bound_port` says which."""
    grpc, pb = _modules()
    options = [("grpc.max_receive_message_length", max_message_bytes)]
    options.append(("grpc.max_send_message_length", max_message_bytes))
    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers((_Service(engine, pb, grpc).handler(),))
    server.bound_port = server.add_insecure_port(f"{host}:{port}")
    return server
