"""The HTTP API (FastAPI): predict, task admin, health (incl. the Open Inference Protocol v2), Prometheus metrics.

    POST   /v1/predict              multipart (field `image` + `tasks` + options) or JSON (base64 `image`)
    GET    /v1/tasks                served tasks
    POST   /v1/tasks                load or replace a task from a folder inside the adapter directory (admin)
    DELETE /v1/tasks/{name}         unload a task (admin)
    GET    /health/live, /health/ready
    GET    /v2, /v2/health/live, /v2/health/ready, /v2/models/{name}[/versions/{v}][/ready]   (OIP v2)
    POST   /v2/models/{name}[/versions/{v}]/infer   (OIP v2: the tasks, and ALL; see `oip`)
    GET    /metrics                 Prometheus text format

Admin routes need `Authorization: Bearer <token>` (401 without it, 403 with a wrong one, 403 when the server has
no admin token); a backend whose tasks are fixed (ONNX) answers them 409. Client mistakes are 4xx with
`{"error": {"code", "message"}}` (on `/v2` paths the protocol's `{"error": "<message>"}`); only server faults are
5xx.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from multitask_peft import __version__

from . import oip
from . import openapi as api
from .engine import Engine
from .errors import (
    BadRequest,
    Forbidden,
    PayloadTooLarge,
    ServingError,
    ShuttingDown,
    Unauthorized,
    Unprocessable,
    UnsupportedMediaType,
)
from .images import PredictOptions, decode_base64, parse_tasks

log = logging.getLogger("multitask_peft.serving")

#: Largest request body accepted, in bytes (413 past it).
MAX_BODY_BYTES = 20 * 2**20
OPTION_FIELDS = ("score_threshold", "max_detections", "mask_format", "logits", "timeout_s", "alpha", "wise_reference")
ROUTES = {"/v1/predict", "/v1/tasks", "/health/live", "/health/ready", "/metrics", "/v2", "/v2/health/live",
          "/v2/health/ready"}  # fmt: skip


class _Guard:
    """ASGI middleware: refuses bodies over `max_body` (413, by Content-Length or while streaming) and counts
    responses by route and status code."""

    def __init__(self, app: Any, engine: Engine, max_body: int) -> None:
        self.app = app
        self.engine = engine
        self.max_body = max_body

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        route = path if path in ROUTES else "/v1/tasks/{name}" if path.startswith("/v1/tasks/") else "other"
        if path.startswith("/v2/models/"):
            route = "/v2/models/{name}/infer" if path.endswith("/infer") else "/v2/models/{name}"
        status = {"code": 500}
        metrics = self.engine.metrics

        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        try:
            too_big = length is not None and int(length) > self.max_body
        except ValueError:
            too_big = False  # the server rejects a bad Content-Length itself
        try:
            if too_big:
                await _send_error(counting_send, PayloadTooLarge(f"request body over {self.max_body} bytes"), path)
                return
            received = 0

            async def limited_receive() -> dict:
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > self.max_body:
                        raise PayloadTooLarge(f"request body over {self.max_body} bytes")
                return message

            try:
                await self.app(scope, limited_receive, counting_send)
            except PayloadTooLarge as e:  # raised while the app read the body (a streamed body)
                await _send_error(counting_send, e, path)
        finally:  # also when the app re-raised after answering 500
            code = status["code"]
            metrics.requests.labels(route, str(code)).inc()
            if code >= 400:
                metrics.errors.labels(str(code)).inc()


def _error_body(error: ServingError, path: str) -> dict[str, Any]:
    """The error envelope: the Open Inference Protocol's `{"error": "<message>"}` on `/v2` paths (what its
    clients parse), `{"error": {"code", "message"}}` elsewhere."""
    if path == "/v2" or path.startswith("/v2/"):
        return {"error": error.message}
    return {"error": {"code": error.status, "message": error.message}}


async def _send_error(send: Any, error: ServingError, path: str) -> None:
    body = json.dumps(_error_body(error, path)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _error_response(error: ServingError, request: Request) -> JSONResponse:
    body = _error_body(error, request.url.path)
    return JSONResponse(body, status_code=error.status, headers=error.headers)


def create_app(
    engine: Engine,
    admin_token: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    grpc_port: int | None = None,
    grpc_host: str = "127.0.0.1",
) -> Any:
    """The ASGI app serving `engine` (started and stopped with the app's lifespan); with `grpc_port`, the OIP v2
    gRPC endpoint too (`oip_grpc`, on the same event loop and engine; port 0: a free one, in
    `app.state.grpc_port` once started)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        grpc = None
        try:
            if grpc_port is not None:
                from .oip_grpc import grpc_server

                grpc = grpc_server(engine, grpc_host, grpc_port, max_body_bytes)
                await grpc.start()
                app.state.grpc_port = grpc.bound_port
                log.info("OIP v2 gRPC on %s:%d", grpc_host, grpc.bound_port)
            yield
        finally:
            if grpc is not None:
                await grpc.stop(grace=engine.config.drain_timeout_s)
            await engine.stop()

    app = FastAPI(
        title="multitask-peft",
        version=__version__,
        description="Many vision tasks on one frozen backbone: several tasks per image, batched across requests.",
        lifespan=lifespan,
    )
    app.state.engine = engine

    @app.exception_handler(ServingError)
    async def serving_error(request: Request, exc: ServingError) -> JSONResponse:
        if exc.status >= 500 and not isinstance(exc, ShuttingDown):
            log.error("%s %s: %s", request.method, request.url.path, exc.message)
        return _error_response(exc, request)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(Unprocessable(f"invalid request: {exc.errors()}"), request)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = ServingError(str(exc.detail), dict(exc.headers or {}))
        error.status = exc.status_code
        if exc.status_code == 405:  # every method of the path (its routes are separate: Starlette names one's)
            path = request.url.path
            methods = {m for r in app.routes if isinstance(r, APIRoute) and r.path_regex.match(path) for m in r.methods}
            error.headers["Allow"] = ", ".join(sorted(methods))
        return _error_response(error, request)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error in %s %s", request.method, request.url.path)
        return _error_response(ServingError(f"internal error: {type(exc).__name__}"), request)

    def check_admin(request: Request) -> None:
        if admin_token is None:
            raise Forbidden("the admin API is disabled: start the server with an admin token (--admin-token)")
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if not header or scheme.lower() != "bearer" or not token:
            raise Unauthorized("admin route: send 'Authorization: Bearer <token>'")
        if not hmac.compare_digest(token.strip().encode(), admin_token.encode()):
            raise Forbidden("wrong admin token")

    # --- predict -------------------------------------------------------------------------------------------
    @app.post(
        "/v1/predict",
        openapi_extra={"requestBody": api.PREDICT_BODY},
        responses=api.responses(400, 404, 413, 415, 422, 429, 503, 504),
        summary="Run tasks on one image",
    )
    async def predict(request: Request) -> dict[str, Any]:
        engine.check_capacity()  # 503 / 429 before reading and decoding the body
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "multipart/form-data":
            data, raw_tasks, fields = await _read_form(request)
        elif kind == "application/json":
            data, raw_tasks, fields = await _read_json(request)
        else:
            raise UnsupportedMediaType(
                f"content type {kind or '(none)'!r} is not accepted: send multipart/form-data or application/json"
            )
        tasks = parse_tasks(raw_tasks)
        options = PredictOptions.parse(fields)
        results, versions, original = await engine.predict(data, tasks, options)
        return {"results": results, "image_size": list(original), "versions": versions}

    # --- tasks ---------------------------------------------------------------------------------------------
    @app.get("/v1/tasks", summary="Served tasks", responses=api.responses())
    async def list_tasks() -> dict[str, Any]:
        return {"tasks": list(engine.backend.served_tasks().values()), **engine.backend.describe()}

    @app.post(
        "/v1/tasks",
        openapi_extra={"requestBody": api.LOAD_BODY},
        responses=api.responses(400, 401, 403, 404, 409, 413, 415, 422),
        summary="Load or replace a task (admin)",
    )
    async def load_task(request: Request) -> dict[str, Any]:
        check_admin(request)
        engine.backend.check_changeable()  # 409 before the body is read
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            raise UnsupportedMediaType('send the task to load as application/json: {"path": ..., "name": ...}')
        body = await _json_body(request)
        name = body.get("name")
        if name is not None and not isinstance(name, str):
            raise Unprocessable(f"'name' must be a string, got {name!r}")
        return {"task": await engine.backend.load(name, body.get("path"))}

    @app.delete("/v1/tasks/{name}", responses=api.responses(401, 403, 404, 409, 422), summary="Unload a task (admin)")
    async def unload_task(name: str, request: Request) -> dict[str, Any]:
        check_admin(request)
        engine.backend.check_changeable()
        await engine.backend.unload(name)
        return {"unloaded": name}

    # --- health --------------------------------------------------------------------------------------------
    @app.get("/health/live", summary="The process answers", responses=api.responses())
    async def live() -> dict[str, str]:
        return {"status": "live"}

    @app.get("/health/ready", summary="The server takes requests", responses=api.responses(503))
    async def ready() -> Response:
        if not engine.ready or engine.closing:
            return JSONResponse({"status": "not ready"}, status_code=503)
        return JSONResponse({"status": "ready"})

    # --- Open Inference Protocol v2 (`oip`: the models are the tasks, and ALL) -----------------------------
    v2_errors = partial(api.responses, v2=True)

    @app.get("/v2", summary="OIP v2 server metadata", responses=v2_errors())
    async def v2_server() -> dict[str, Any]:
        return oip.server_metadata()

    @app.get("/v2/health/live", summary="OIP v2 server live", responses=v2_errors())
    async def v2_live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready", summary="OIP v2 server ready", responses=v2_errors(503))
    async def v2_ready() -> Response:
        ok = engine.ready and not engine.closing
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @app.get("/v2/models/{name}", summary="OIP v2 model metadata", responses=v2_errors(404, 422))
    async def v2_model(name: str) -> dict[str, Any]:
        return oip.model_metadata(engine, name)

    @app.get("/v2/models/{name}/versions/{version}", summary="OIP v2 model metadata", responses=v2_errors(404, 422))
    async def v2_model_version(name: str, version: str) -> dict[str, Any]:
        return oip.model_metadata(engine, name, version)

    def model_ready(name: str, version: str | None) -> Response:
        oip.check_model(engine, name, version)
        ok = engine.ready and not engine.closing
        return JSONResponse({"name": name, "ready": ok}, status_code=200 if ok else 503)

    @app.get("/v2/models/{name}/ready", summary="OIP v2 model ready", responses=v2_errors(404, 422, 503))
    async def v2_model_ready(name: str) -> Response:
        return model_ready(name, None)

    @app.get(
        "/v2/models/{name}/versions/{version}/ready", summary="OIP v2 model ready", responses=v2_errors(404, 422, 503)
    )
    async def v2_model_version_ready(name: str, version: str) -> Response:
        return model_ready(name, version)

    async def infer(name: str, version: str | None, request: Request) -> Response:
        engine.check_capacity()
        oip.check_model(engine, name, version)  # 404 before the body is read
        body, binary = await _read_infer(request, max_body_bytes)
        parsed = oip.parse_rest(body, binary)
        response = await oip.infer(engine, name, version, parsed)
        payload, header_length = oip.encode_rest(response, parsed.binary)
        if header_length is None:
            return Response(payload, media_type="application/json")
        headers = {"Inference-Header-Content-Length": str(header_length)}
        return Response(payload, media_type="application/octet-stream", headers=headers)

    infer_errors = {**api.INFER_OK, **v2_errors(400, 404, 413, 415, 422, 429, 503, 504)}

    @app.post(
        "/v2/models/{name}/infer",
        openapi_extra={"requestBody": api.INFER_BODY},
        responses=infer_errors,
        response_class=Response,
        summary="OIP v2 infer",
    )
    async def v2_infer(name: str, request: Request) -> Response:
        return await infer(name, None, request)

    @app.post(
        "/v2/models/{name}/versions/{version}/infer",
        openapi_extra={"requestBody": api.INFER_BODY},
        responses=infer_errors,
        response_class=Response,
        summary="OIP v2 infer (a version)",
    )
    async def v2_infer_version(name: str, version: str, request: Request) -> Response:
        return await infer(name, version, request)

    metrics_doc = {**api.METRICS_OK, **api.responses()}

    @app.get("/metrics", summary="Prometheus metrics", responses=metrics_doc, response_class=Response)
    async def metrics() -> Response:
        return Response(engine.metrics.render(), media_type=engine.metrics.content_type)

    return _Guard(app, engine, max_body_bytes)


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, over-long integers, deep nesting
        raise BadRequest(f"the body is not valid JSON ({type(e).__name__}: {str(e)[:200]})") from e
    if not isinstance(body, dict):
        raise Unprocessable(f"the JSON body must be an object, got {type(body).__name__}")
    return body


async def _read_infer(request: Request, limit: int) -> tuple[dict[str, Any], bytes]:
    """An OIP infer body: (the JSON header, the binary data after it), decompressed if the client compressed it
    (`Content-Encoding: gzip` / `deflate`, at most `limit` bytes once decompressed)."""
    raw = await request.body()
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding in ("gzip", "deflate"):
        import zlib

        inflater = zlib.decompressobj(wbits=47 if encoding == "gzip" else 15)  # 47: gzip or zlib header
        try:
            raw = inflater.decompress(raw, limit + 1)
        except zlib.error as e:
            raise BadRequest(f"the body is not valid {encoding} data ({e})") from e
        if len(raw) > limit:
            raise PayloadTooLarge(f"the decompressed body is over {limit} bytes")
    elif encoding not in ("", "identity"):
        raise UnsupportedMediaType(f"content encoding {encoding!r} is not accepted (gzip, deflate or none)")
    length = request.headers.get("inference-header-content-length")
    if length is None:
        header, binary = raw, b""
    else:
        try:
            n = int(length)
        except ValueError:
            n = -1
        if not 0 <= n <= len(raw):
            raise BadRequest(f"Inference-Header-Content-Length {length!r} does not fit a body of {len(raw)} bytes")
        header, binary = raw[:n], raw[n:]
    try:
        body = json.loads(header)
    except (ValueError, RecursionError) as e:
        raise BadRequest(f"the infer request header is not valid JSON ({type(e).__name__}: {str(e)[:200]})") from e
    if not isinstance(body, dict):
        raise BadRequest(f"the infer request must be a JSON object, got {type(body).__name__}")
    return body, binary


async def _read_json(request: Request) -> tuple[bytes, Any, dict[str, Any]]:
    body = await _json_body(request)
    if "image" not in body:
        raise Unprocessable("the JSON body needs 'image' (the image file, base64) and 'tasks'")
    if "tasks" not in body:
        raise Unprocessable("the JSON body needs 'tasks' (a list of task names)")
    unknown = sorted(set(body) - {"image", "tasks", *OPTION_FIELDS})
    if unknown:
        raise Unprocessable(f"unknown field(s) {unknown}; accepted: image, tasks, {', '.join(OPTION_FIELDS)}")
    return decode_base64(body["image"]), body["tasks"], {k: body.get(k) for k in OPTION_FIELDS}


async def _read_form(request: Request) -> tuple[bytes, Any, dict[str, Any]]:
    try:
        form = await request.form(max_files=1, max_fields=16)
    except StarletteHTTPException as e:
        raise BadRequest(f"malformed multipart body: {e.detail}") from e
    except PayloadTooLarge:
        raise
    except Exception as e:  # python-multipart's parse errors
        raise BadRequest(f"malformed multipart body: {type(e).__name__}: {e}") from e
    upload = form.get("image")
    if upload is None or isinstance(upload, str):
        raise Unprocessable("the multipart body needs a file field 'image' and a field 'tasks'")
    tasks = form.getlist("tasks")
    if not tasks or not all(isinstance(t, str) for t in tasks):
        raise Unprocessable("the multipart body needs a field 'tasks' (comma-separated task names)")
    data = await upload.read()
    fields = {k: form.get(k) for k in OPTION_FIELDS}
    bad = [k for k, v in fields.items() if v is not None and not isinstance(v, str)]
    if bad:
        raise Unprocessable(f"field(s) {bad} must be plain values, not files")
    return data, tasks, fields
