"""The prediction service: a defended model behind FastAPI.

    served = load_served_model("artifacts/mnist-conv3")
    app = create_app(served, defense=build_defense("mad", {"epsilon": "0.5"}, victim=served.model),
                     store="service.db")
    uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints (the OpenAPI schema is at /openapi.json, the docs at /docs):
    POST /v1/predict   images -> the key's answers (probs, top-k or label), counted and logged
    GET  /v1/info      input shape, classes, output mode, the calling key's budget and limits
    GET  /healthz      the server and its database answer

A predict request goes: key (401/403) -> body size (413) -> JSON and images (400/413/415/422)
-> one atomic charge against the key's budget and rate limit (429, nothing counted) -> the
micro-batcher, which runs the model and the defense in its own thread -> the key's output
format. If the model fails, the charge is refunded. The defense and the model stay private:
nothing the service shows names them.
"""

from __future__ import annotations

import json
import logging
import math
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

from stealguard import __version__
from stealguard.defended import DefendedPredictor
from stealguard.defenses.base import Defense, NoDefense
from stealguard.detect.monitor import Monitor
from stealguard.detect.policy import DetectionRefusal
from stealguard.errors import ConfigError, InputError, QueryBudgetExceeded
from stealguard.service.batching import MicroBatcher
from stealguard.service.codec import decode_request, image_hashes, parse_request, request_schema
from stealguard.service.errors import BadRequest, ServiceError
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


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": what} for code, what in (
        (400, "Malformed JSON, bad base64, or bytes that are not an image"),
        (401, "Missing or unknown API key"), (403, "Revoked API key, or a key locked by the detection policy"),
        (413, "Body over the size limit, or more images than the per-request limit"),
        (415, "An image format other than PNG or JPEG"),
        (422, "Wrong image size, channels, value range, NaN/inf, or fields"),
        (429, "Budget exhausted or rate limit exceeded; nothing was counted"),
    )
}
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
    batcher: MicroBatcher = field(init=False)

    def __post_init__(self) -> None:
        # the answer is computed as LocalBlackBox computes it; each key's output mode after
        self.predictor = DefendedPredictor(self.served.model, self.defense, device=self.device,
                                           batch_size=self.limits.max_batch)
        self.batcher = MicroBatcher(self.answer, max_batch=self.limits.max_batch,
                                    max_wait_s=self.limits.max_wait_s)

    def answer(self, x: torch.Tensor) -> torch.Tensor:
        """(R, C, H, W) float in [0, 1] -> (R, K) defended probabilities. Batcher thread."""
        return self.predictor.defended(x)

    def prepare(self, key: ApiKey, raw: bytes) -> tuple[torch.Tensor, Charge]:
        """Parse, check and charge a request: (B, C, H, W) images and their charge."""
        req = parse_request(raw)
        x = decode_request(req, self.served.input_shape, max_images=self.limits.max_images)
        if self.monitor is not None:  # the detection policy (403 / 429, nothing counted)
            self.monitor.admit(key.id, int(x.shape[0]))
        return x, self.store.charge(key, image_hashes(x))


def create_app(
    model: Any, *, defense: Defense | None = None, store: KeyStore | str | Path | None = None,
    limits: Limits | None = None, classes: list[str] | None = None,
    device: str | torch.device = "cpu", monitor: Monitor | None = None,
) -> FastAPI:
    """A FastAPI app serving `model` (a ServedModel, or any object with input_shape,
    num_classes and predict_proba or forward) behind `defense`, with keys in `store`
    (a KeyStore, a SQLite path, or a SQLAlchemy URL; default: the user data folder).
    monitor: stealing detectors (stealguard.detect) that see every answered batch after
    its response is sent, and whose policy may refuse a flagged key."""
    served = ServedModel.wrap(model, classes=classes)
    limits = limits or Limits()
    own_store = not isinstance(store, KeyStore)
    key_store = store if isinstance(store, KeyStore) else KeyStore(store)
    svc = Service(served, defense or NoDefense(), key_store, limits, torch.device(device),
                  monitor)

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
        raw = await _read_body(request, limits.max_body_bytes)
        x, charge = await run_in_threadpool(svc.prepare, key, raw)
        try:
            out = svc.predictor.format(await svc.batcher(x), key.output, key.k)  # (B, K)
            body = json.dumps({"outputs": out.tolist(), "output": key.output,
                               "used": charge.used, "remaining": charge.remaining,
                               "request_id": charge.request_id})
        except Exception:  # not answered: give the images back (a cancelled request stays
            await run_in_threadpool(key_store.refund, charge)  # counted: it may be answered)
            raise
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

    return app


def _authenticate(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    api_key: Annotated[str | None, Depends(_api_key)],
) -> ApiKey:
    """The calling key (a sync dependency: FastAPI runs it in its thread pool)."""
    secret = api_key or (bearer.credentials if bearer is not None else None)
    return request.app.state.service.store.authenticate(secret)


Key = Annotated[ApiKey, Depends(_authenticate)]


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BadRequest(f"request body is {int(declared)} bytes; the limit is {limit}",
                         status=413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(f"request body is over the limit of {limit} bytes", status=413)
        chunks.append(chunk)
    return b"".join(chunks)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service(_: Request, e: ServiceError) -> JSONResponse:
        headers = {}
        if "retry_after" in e.extra:
            headers["Retry-After"] = str(max(1, math.ceil(e.extra["retry_after"])))
        return JSONResponse({"detail": str(e), **e.extra}, e.status, headers=headers)

    @app.exception_handler(QueryBudgetExceeded)
    async def _budget(_: Request, e: QueryBudgetExceeded) -> JSONResponse:
        return JSONResponse({"detail": str(e), "requested": e.requested, "used": e.used,
                             "budget": e.budget}, 429)

    @app.exception_handler(DetectionRefusal)
    async def _detected(_: Request, e: DetectionRefusal) -> JSONResponse:
        headers = ({"Retry-After": str(max(1, math.ceil(e.retry_after)))}
                   if e.retry_after is not None else {})
        return JSONResponse({"detail": str(e)}, e.status, headers=headers)

    @app.exception_handler(InputError)
    async def _input(_: Request, e: InputError) -> JSONResponse:
        return JSONResponse({"detail": str(e)}, 422)

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception) -> JSONResponse:
        log.exception("internal error while answering a request")
        return JSONResponse({"detail": f"internal error ({type(e).__name__}); nothing of this "
                                       f"request was counted"}, 500)
