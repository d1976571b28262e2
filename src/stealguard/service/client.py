"""A prediction service as a black box: attacks run over HTTP with the same code.

    bb = HttpBlackBox("http://127.0.0.1:8000", api_key="sg_...")
    y = bb.query(x)          # (B, C, H, W) in [0, 1] or uint8 -> (B, K), as LocalBlackBox
    bb.queries_used          # the server's count for this key
    KnockoffNets(surrogate)(bb, budget=1000)

It checks images locally (the same `validate_images` as the local black box), sends them as
a nested pixel array (exact: uint8 as integers, floats as their float32 values) or as PNG
(8 bits: floats are rounded), and splits a batch larger than the server's per-request limit
into several requests. `queries_used` and `budget` are the server's figures for the key, read
at connection and updated from every answer. The server's refusals, by status and code:

    403 budget_exhausted        QueryBudgetExceeded (nothing answered or counted), as locally
    413 batch_over_rate_limit   ServiceError at once: the batch can never fit the rate window
    429 rate_limited            retried after Retry-After, up to `max_rate_wait_s` in all,
                                then RateLimited
    401, 403 (other codes)      AuthError
    anything else               ServiceError with the server's status and message

A batch split into several requests is checked against the budget before the first is sent;
another client spending the same key at the same moment can still make a later part fail.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any, Literal

import httpx
import torch

from stealguard.blackbox import BlackBox, validate_images
from stealguard.errors import ConfigError, QueryBudgetExceeded
from stealguard.service.codec import encode_png
from stealguard.service.errors import AuthError, RateLimited, ServiceError

if TYPE_CHECKING:
    from typing_extensions import Self


class HttpBlackBox(BlackBox):
    """The black box behind a stealguard prediction service.

    Args:
        url: the service, e.g. "http://127.0.0.1:8000".
        api_key: the key's secret (sent as `Authorization: Bearer`).
        encoding: "pixels" (exact) or "png" (8-bit; smaller requests).
        timeout: seconds per HTTP request.
        max_rate_wait_s: how long to keep retrying rate-limited requests (0: never retry).
        client: an httpx.Client to use instead of a new one (e.g. FastAPI's TestClient).
    """

    def __init__(self, url: str, api_key: str, *, encoding: Literal["pixels", "png"] = "pixels",
                 timeout: float = 60.0, max_rate_wait_s: float = 60.0,
                 client: httpx.Client | None = None) -> None:
        super().__init__(budget=None)
        if encoding not in ("pixels", "png"):
            raise ConfigError(f"unknown encoding {encoding!r}; valid: pixels, png")
        self.url, self.encoding, self.max_rate_wait_s = url.rstrip("/"), encoding, max_rate_wait_s
        self._own_client = client is None
        self._http = client if client is not None else httpx.Client(timeout=timeout)
        self._headers = {"Authorization": f"Bearer {api_key}"}
        info = self.info()
        self.input_shape = tuple(info["input_shape"])  # type: ignore[assignment]
        self.num_classes = int(info["num_classes"])
        self.classes: list[str] = list(info["classes"])
        self.output, self.k = str(info["output"]), int(info["k"])
        self.max_images = int(info["max_images_per_request"])
        self.max_body_bytes = int(info["max_body_bytes"])
        self.budget, self.queries_used = info["budget"], int(info["used"])
        self.rate_limit: int | None = info.get("rate_limit")  # images per rate window

    def info(self) -> dict[str, Any]:
        """The service's GET /v1/info for this key."""
        return self._json(self._send("GET", "/v1/info"))

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images in [0, 1] (or uint8) -> (B, K) answers, counted by the server."""
        xf = validate_images(x, self.input_shape)  # the local black box's checks and messages
        send = x if x.dtype == torch.uint8 else xf  # uint8 travels as integers, exactly
        n = int(xf.shape[0])
        if n == 0:
            return torch.zeros(0, self.num_classes)
        with self._lock:
            if self.budget is not None and self.queries_used + n > self.budget:
                raise QueryBudgetExceeded(n, self.queries_used, self.budget)
        return torch.cat([self._predict(part) for part in send.split(self._chunk(send))])

    def _chunk(self, x: torch.Tensor) -> int:
        """Images per request: the server's count limit, the key's rate limit (a larger
        request could never pass it; smaller ones wait out the window on 429), and the body
        limit with a margin (JSON ~22 bytes per float pixel, 4 per uint8 one, PNG ~1.4)."""
        pixels = x[0].numel()
        per_image = (pixels * 1.4 + 200 if self.encoding == "png"
                     else pixels * (4 if x.dtype == torch.uint8 else 22) + 64)
        limit = min(self.max_images, self.rate_limit or self.max_images)
        return max(1, min(limit, int(0.9 * self.max_body_bytes / per_image)))

    def _answer(self, x: torch.Tensor) -> torch.Tensor:
        return self._predict(x)

    def _predict(self, x: torch.Tensor) -> torch.Tensor:
        """One POST /v1/predict for (b, C, H, W) -> (b, K)."""
        if self.encoding == "png":
            payload: dict[str, Any] = {"images": encode_png(x)}
        else:
            payload = {"pixels": x.tolist(), "dtype": "uint8" if x.dtype == torch.uint8 else "float"}
        body = json.dumps(payload).encode()
        waited = 0.0
        while True:
            resp = self._send("POST", "/v1/predict", content=body)
            if resp.status_code != 429 or "retry_after" not in _safe_json(resp):
                break
            pause = float(resp.headers.get("Retry-After", "1"))
            if waited + pause > self.max_rate_wait_s:
                break
            time.sleep(pause)
            waited += pause
        out = self._json(resp)
        self._seen(int(out["used"]), out.get("remaining"))
        return torch.tensor(out["outputs"], dtype=torch.float32).reshape(x.shape[0], -1)

    def _seen(self, used: int, remaining: int | None) -> None:
        with self._lock:  # answers can arrive out of order from several threads
            self.queries_used = max(self.queries_used, used)
            if remaining is not None:
                self.budget = used + remaining

    def _send(self, method: str, path: str, **kw: Any) -> httpx.Response:
        headers = {**self._headers, "Content-Type": "application/json"}
        try:
            return self._http.request(method, self.url + path, headers=headers, **kw)
        except httpx.TransportError as e:
            raise ServiceError(f"cannot reach the prediction service at {self.url}: {e}",
                               status=503) from None

    def _json(self, resp: httpx.Response) -> dict[str, Any]:
        body = _safe_json(resp)
        if resp.status_code == 200:
            return body
        detail = body.get("detail") or resp.text[:200]
        code = body.get("code")
        if code == "budget_exhausted" or (resp.status_code == 429 and "budget" in body):
            self._seen(int(body["used"]), None)  # (429 + budget: servers before codes)
            raise QueryBudgetExceeded(int(body["requested"]), int(body["used"]),
                                      int(body["budget"]))
        if resp.status_code == 429:
            raise RateLimited(str(detail), retry_after=float(body.get("retry_after", 0)))
        if resp.status_code in (401, 403):
            raise AuthError(str(detail), status=resp.status_code)
        raise ServiceError(f"the prediction service answered {resp.status_code}: {detail}",
                           status=resp.status_code)

    def close(self) -> None:
        if self._own_client:
            self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _safe_json(resp: httpx.Response) -> dict[str, Any]:
    try:
        body = resp.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}
