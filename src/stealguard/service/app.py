"""The prediction service: a defended model behind FastAPI.

    served = load_served_model("artifacts/mnist-conv3")
    app = create_app(served, defense=build_defense("mad", {"epsilon": "0.5"}, victim=served.model),
                     store="service.db")
    uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints (the OpenAPI schema is at /openapi.json, the docs at /docs):
    POST /v1/predict   images -> the key's answers (probs, top-k or label), counted and logged
    GET  /v1/info      input shape, classes, output mode, the calling key's budget and limits
    GET  /healthz      the server and its database answer

    GET  /metrics      Prometheus metrics, when create_app(..., metrics=True)

A predict request goes: key (401/403) -> Content-Type (415) -> body size (413) -> the bounded
parser and the image headers (400/413/415/422) -> a batch larger than the key's rate window
(413) -> one atomic charge against the key's budget (403 budget_exhausted) and rate limit
(429 with Retry-After), nothing counted on refusal -> the micro-batcher, which runs the model
and the defense in its own thread -> the key's output format. If the model fails, the charge
is refunded by a compensating audit row. Every refusal is answered `{"detail", "code"}` (codes:
service.errors.REFUSALS), recorded in the audit log with the key id when known and the
client's address, and counted in /metrics. A client that goes away mid-body (or is dropped
by the server's read timeout) is logged once, without a traceback. The defense and the model
stay private: nothing the service shows names them.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect

from stealguard import __version__
from stealguard.defended import DefendedPredictor
from stealguard.defenses.base import Defense, NoDefense
from stealguard.detect.monitor import Monitor
from stealguard.detect.policy import DetectionRefusal
from stealguard.errors import ConfigError, InputError, QueryBudgetExceeded
from stealguard.service.batching import MicroBatcher
from stealguard.service.codec import decode_request, image_hashes, parse_request, request_schema
from stealguard.service.errors import REFUSALS, AuthError, BadRequest, ClientGone, ServiceError
from stealguard.service.metrics import NO_METRICS, ServiceMetrics
from stealguard.service.served import ServedModel
from stealguard.service.store import ApiKey, Charge, KeyStore

log = logging.getLogger("stealguard.service")


@dataclass(frozen=True)
class Limits:
    """Per-request limits and the batcher's settings."""

    max_images: int = 256  # images per request (413 above)
    max_body_bytes: int = 16 * 2**20  # request body (413 above)
    max_batch: int = 512  # rows per model call
    max_wait_s: float = 0.002  # how long a batch waits for more requests

    def __post_init__(self) -> None:
        for name in ("max_images", "max_body_bytes", "max_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (0 <= self.max_wait_s < 10):
            raise ConfigError(f"max_wait_s must be in [0, 10), got {self.max_wait_s}")


class PredictResponse(BaseModel):
    outputs: list[list[float]] = Field(description="(B, K): one row per image, in order.")
    output: str = Field(description="probs, topk or label (one-hot), as set for the key.")
    used: int = Field(description="Images counted against the key so far, this request included.")
    remaining: int | None = Field(description="Images left in the key's budget (null: no budget).")
    request_id: str = Field(description="The audit log entry of this request.")


class InfoResponse(BaseModel):
    input_shape: list[int] = Field(description="(C, H, W) of one image.")
    num_classes: int
    classes: list[str]
    output: str
    k: int
    budget: int | None
    used: int
    remaining: int | None
    rate_limit: int | None = Field(description="Images per rate window (null: no limit).")
    rate_window_s: float
    max_images_per_request: int
    max_body_bytes: int
    encodings: list[str]


class ErrorResponse(BaseModel):
    detail: str
    code: str = Field(description="Why, as a code: " + ", ".join(REFUSALS))


def _documented_errors() -> dict[int | str, dict[str, Any]]:
    """The OpenAPI responses: each status with the refusal codes it carries."""
    by_status: dict[int, list[str]] = {}
    for code, (status, what) in REFUSALS.items():
        if status < 500 and status not in (408, 431, 499):  # the server's, not the app's
            by_status.setdefault(status, []).append(f"{code} ({what})")
    return {status: {"model": ErrorResponse, "description": "; ".join(codes)}
            for status, codes in sorted(by_status.items())}


_ERRORS = _documented_errors()
_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")
_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="The API key")


@dataclass
class Service:
    """What the endpoints share: the defended model, the key store, the batcher."""

    served: ServedModel
    defense: Defense
    store: KeyStore
    limits: Limits
    device: torch.device
    monitor: Monitor | None = None
    predictor: DefendedPredictor = field(init=False)
    metrics: ServiceMetrics | Any = NO_METRICS
    batcher: MicroBatcher = field(init=False)

    def __post_init__(self) -> None:
        # the answer is computed as LocalBlackBox computes it; each key's output mode after
        self.predictor = DefendedPredictor(self.served.model, self.defense, device=self.device,
                                           batch_size=self.limits.max_batch)
        self.batcher = MicroBatcher(self.answer, max_batch=self.limits.max_batch,
                                    max_wait_s=self.limits.max_wait_s,
                                    on_batch=self.metrics.model_batch)

    def answer(self, x: torch.Tensor) -> torch.Tensor:
        """(R, C, H, W) float in [0, 1] -> (R, K) defended probabilities. Batcher thread."""
        return self.predictor.defended(x)

    def parse(self, raw: bytes | bytearray) -> torch.Tensor:
        """Body bytes -> checked (B, C, H, W) images (BadRequest otherwise)."""
        shape = self.served.input_shape
        return decode_request(parse_request(raw, shape, max_images=self.limits.max_images),
                              shape)

    def charge(self, key: ApiKey, x: torch.Tensor, client: str) -> Charge:
        """Count the batch against the key, or refuse it whole."""
        n = int(x.shape[0])
        if key.rate_limit is not None and n > key.rate_limit:
            raise BadRequest(f"a batch of {n} images can never fit this key's rate limit of "
                             f"{key.rate_limit} images per {key.rate_window:g} s; send batches "
                             f"of at most {key.rate_limit}", code="batch_over_rate_limit",
                             rate_limit=key.rate_limit, rate_window_s=key.rate_window)
        if self.monitor is not None:  # the detection policy (403 / 429, nothing counted)
            self.monitor.admit(key.id, n)
        return self.store.charge(key, image_hashes(x), client=client)

    async def refused(self, request: Request, code: str, detail: str) -> None:
        """Record and count a refusal; a dropped client is also logged (once, no traceback)."""
        client, key_id = _client(request), getattr(request.state, "key_id", None)
        images = getattr(request.state, "images", 0)
        if code in ("client_disconnected", "read_timeout"):
            log.warning("dropped a request from %s (key %s): %s", client, key_id or "-", detail)
        self.metrics.refused(code, images)
        try:
            await run_in_threadpool(self.store.record_refusal, code, detail=detail,
                                    key_id=key_id, client=client, count=images,
                                    path=request.url.path)
        except Exception as e:  # the refusal is answered even when the log is down
            log.error("could not record a refusal (%s) in the audit log: %s: %s", code,
                      type(e).__name__, e)


def create_app(
    model: Any, *, defense: Defense | None = None, store: KeyStore | str | Path | None = None,
    limits: Limits | None = None, classes: list[str] | None = None,
    device: str | torch.device = "cpu", monitor: Monitor | None = None, metrics: bool = False,
) -> FastAPI:
    """A FastAPI app serving `model` (a ServedModel, or any object with input_shape,
    num_classes and predict_proba or forward) behind `defense`, with keys in `store`
    (a KeyStore, a SQLite path, or a SQLAlchemy URL; default: the user data folder).
    monitor: stealing detectors (stealguard.detect) that see every answered batch after
    its response is sent, and whose policy may refuse a flagged key..
    `metrics=True` adds GET /metrics (Prometheus text; key ids, never secrets)."""
    served = ServedModel.wrap(model, classes=classes)
    limits = limits or Limits()
    own_store = not isinstance(store, KeyStore)
    key_store = store if isinstance(store, KeyStore) else KeyStore(store)
    svc = Service(served, defense or NoDefense(), key_store, limits, torch.device(device),
                  monitor, metrics=ServiceMetrics(key_store) if metrics else NO_METRICS)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        svc.batcher.close()
        if monitor is not None:
            monitor.close()
        if own_store:
            key_store.close()

    app = FastAPI(title="stealguard prediction service", version=__version__,
                  lifespan=lifespan,
                  description="A defended image classifier. Authenticate with "
                              "`Authorization: Bearer <key>` or `X-API-Key: <key>`.")
    app.state.service = svc
    _add_error_handlers(app)

    @app.post("/v1/predict", response_model=PredictResponse, responses=_ERRORS,
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": request_schema(
                      served.input_shape, limits.max_images)}}}})
    async def predict(request: Request, key: Key) -> Response:
        """Answer a batch of images with the key's output (probs, top-k or label)."""
        t0 = time.perf_counter()
        _require_json(request)
        raw = await _read_body(request, limits.max_body_bytes)
        x = await run_in_threadpool(svc.parse, raw)
        request.state.images = int(x.shape[0])
        charge = await run_in_threadpool(svc.charge, key, x, _client(request))
        try:
            out = svc.predictor.format(await svc.batcher(x), key.output, key.k)  # (B, K)
            body = json.dumps({"outputs": out.tolist(), "output": key.output,
                               "used": charge.used, "remaining": charge.remaining,
                               "request_id": charge.request_id})
        except Exception:  # not answered: give the images back (a cancelled request stays
            await run_in_threadpool(key_store.refund, charge)  # counted: it may be answered)
            svc.metrics.refunded(charge.count)
            raise
        svc.metrics.answered(charge.count, time.perf_counter() - t0)
        # the detectors see the batch after the response is sent; the response is the same
        observe = (BackgroundTask(monitor.observe, key.id, x) if monitor is not None else None)
        return Response(body, media_type="application/json", background=observe)

    @app.get("/v1/info", response_model=InfoResponse, responses=_ERRORS)
    def info(key: Key) -> InfoResponse:
        """What a client needs to query: shapes, classes, output mode, budget and limits."""
        return InfoResponse(
            input_shape=list(served.input_shape), num_classes=served.num_classes,
            classes=served.classes, output=key.output, k=key.k, budget=key.budget,
            used=key.used, remaining=key.remaining, rate_limit=key.rate_limit,
            rate_window_s=key.rate_window, max_images_per_request=limits.max_images,
            max_body_bytes=limits.max_body_bytes, encodings=["png", "jpeg", "pixels"])

    @app.get("/healthz", responses={503: {"description": "The database does not answer"}})
    def healthz() -> JSONResponse:
        """200 when the server and its database answer, 503 otherwise."""
        try:
            key_store.ping()
        except Exception as e:  # any database failure is "unhealthy"
            return JSONResponse({"status": "unhealthy", "detail": type(e).__name__}, 503)
        return JSONResponse({"status": "ok"})

    if metrics:
        @app.get("/metrics", include_in_schema=False)
        def metrics_endpoint() -> Response:
            """Prometheus text format: requests, images, refusals, latency, budgets."""
            body, content_type = svc.metrics.render()
            return Response(body, media_type=content_type)

    return app


def _authenticate(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    api_key: Annotated[str | None, Depends(_api_key)],
) -> ApiKey:
    """The calling key (a sync dependency: FastAPI runs it in its thread pool). The two
    headers (`bearer`, `api_key`: for the OpenAPI schema) are read here in full: every
    credential the request carries must name the same key."""
    secrets = set(request.headers.getlist("x-api-key"))
    for value in request.headers.getlist("authorization"):
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("the Authorization header must be `Bearer <API key>`",
                            code="conflicting_credentials")
        secrets.add(token.strip())
    if len(secrets) > 1:
        raise AuthError("conflicting credentials: the request names more than one API key "
                        "(X-API-Key and Authorization: Bearer differ); send one",
                        code="conflicting_credentials")
    key = request.app.state.service.store.authenticate(next(iter(secrets), None))
    request.state.key_id = key.id
    return key


Key = Annotated[ApiKey, Depends(_authenticate)]


def _client(request: Request) -> str:
    return f"{request.client.host}:{request.client.port}" if request.client else ""


def _require_json(request: Request) -> None:
    """415 unless the body is declared `application/json` (UTF-8, the only JSON charset)."""
    declared = request.headers.get("content-type", "")
    media, _, params = declared.partition(";")
    charset = next((v.strip().strip('"').lower() for k, _, v in
                    (p.partition("=") for p in params.split(";")) if k.strip().lower() ==
                    "charset"), "utf-8")
    if media.strip().lower() != "application/json" or charset not in ("utf-8", "utf8"):
        got = repr(declared[:80]) if declared else "none"
        raise BadRequest(f"Content-Type must be application/json, got {got}",
                         code="unsupported_media_type")


async def _read_body(request: Request, limit: int) -> bytearray:
    """The request body, refused with 413 as soon as it is known to exceed `limit` bytes;
    ClientGone if the client leaves (or the server's read timeout drops it) before its end.
    With a Content-Length the buffer is allocated once and filled in place: one copy of the
    body in memory, never the two or three of a growing buffer and a final bytes()."""
    declared = request.headers.get("content-length")
    expected = int(declared) if declared is not None and declared.isdigit() else 0
    if expected > limit:
        raise BadRequest(f"request body is {expected} bytes; the limit is {limit}",
                         code="body_too_large")
    body, n = bytearray(expected), 0
    try:
        async for chunk in request.stream():
            end = n + len(chunk)
            if end > limit:
                raise BadRequest(f"request body is over the limit of {limit} bytes",
                                 code="body_too_large")
            body[n:end] = chunk  # in place while it fits the declared length
            n = end
    except ClientDisconnect:
        of = f" of {declared}" if declared is not None else ""
        dropped = request.scope.get("stealguard.dropped")  # set by service.server on timeout
        if dropped:
            raise ClientGone(f"{dropped} ({n}{of} body bytes received)",
                             code="read_timeout") from None
        raise ClientGone(f"the client closed the connection after {n}{of} body bytes",
                         code="client_disconnected") from None
    del body[n:]
    return body


def _add_error_handlers(app: FastAPI) -> None:
    async def refuse(request: Request, status: int, code: str, detail: str,
                     extra: dict[str, Any]) -> JSONResponse:
        await request.app.state.service.refused(request, code, detail)
        headers = {}
        if "retry_after" in extra:
            headers["Retry-After"] = str(max(1, math.ceil(extra["retry_after"])))
        return JSONResponse({"detail": detail, "code": code, **extra}, status, headers=headers)

    @app.exception_handler(ServiceError)
    async def _service(request: Request, e: ServiceError) -> JSONResponse:
        return await refuse(request, e.status, e.code, str(e), e.extra)

    @app.exception_handler(QueryBudgetExceeded)
    async def _budget(request: Request, e: QueryBudgetExceeded) -> JSONResponse:
        request.state.images = e.requested
        return await refuse(request, 403, "budget_exhausted", str(e), {
            "requested": e.requested, "used": e.used, "budget": e.budget,
            "remaining": max(0, e.budget - e.used)})

    @app.exception_handler(DetectionRefusal)
    async def _detected(request: Request, e: DetectionRefusal) -> JSONResponse:
        code = "detection_locked" if e.status == 403 else "detection_throttled"
        extra = {"retry_after": e.retry_after} if e.retry_after is not None else {}
        return await refuse(request, e.status, code, str(e), extra)

    @app.exception_handler(InputError)
    async def _input(request: Request, e: InputError) -> JSONResponse:
        return await refuse(request, 422, "invalid_pixels", str(e), {})

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception) -> JSONResponse:
        log.exception("internal error while answering a request")
        request.app.state.service.metrics.error()
        return JSONResponse({"detail": f"internal error ({type(e).__name__}); nothing of this "
                                       f"request was counted", "code": "internal_error"}, 500)
