"""The wire format of `POST /v1/predict`: JSON in, a checked image batch out.

A request carries either encoded images or raw pixels, never both:

    {"images": ["iVBORw0KGgo...", ...]}                  base64 PNG or JPEG, one per image
    {"pixels": [[[[0.0, 0.5, ...]]]], "dtype": "float"}  (B, C, H, W) values in [0, 1]
    {"pixels": [[[[0, 128, ...]]]], "dtype": "uint8"}    (B, C, H, W) integers in 0..255

`decode_request` returns float32 (B, C, H, W) in [0, 1], the same tensor `LocalBlackBox`
would build from the same images, or raises BadRequest with the HTTP status and a message
that names the problem and the image: 400 (not JSON, not base64, not an image), 413 (too
many images), 422 (wrong size, channels, range, NaN/inf, schema).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from stealguard.service.errors import BadRequest

IMAGE_FORMATS = ("PNG", "JPEG")
MODES = {1: ("L",), 3: ("RGB",)}  # the PIL modes accepted for C channels ("1" is read as L)


class PredictRequest(BaseModel):
    """A batch of images: `images` (base64 PNG/JPEG) or `pixels` (B, C, H, W)."""

    model_config = ConfigDict(extra="forbid")

    images: list[str] | None = Field(
        None, description="Images as base64-encoded PNG or JPEG files, one string per image.")
    pixels: list[list[list[list[float]]]] | None = Field(
        None, description="Images as a nested array (B, C, H, W) of pixel values.")
    dtype: Literal["float", "uint8"] = Field(
        "float", description="How to read `pixels`: float in [0, 1], or uint8 integers 0..255.")

    @model_validator(mode="after")
    def _one_kind(self) -> PredictRequest:
        if (self.images is None) == (self.pixels is None):
            raise ValueError("give exactly one of `images` (base64 PNG/JPEG) or `pixels` "
                             "(nested array B, C, H, W)")
        if self.images is not None and "dtype" in self.model_fields_set:
            raise ValueError("`dtype` applies to `pixels` only; encoded images carry their own")
        return self


def request_schema(input_shape: tuple[int, int, int], max_images: int) -> dict[str, Any]:
    """The JSON schema of a request for this model (the OpenAPI request body): the three
    forms, with the model's (C, H, W) and the per-request image limit spelled out."""
    c, h, w = input_shape

    def batch(value: dict[str, Any]) -> dict[str, Any]:  # (B, C, H, W) nested arrays
        for n in (w, h, c):
            value = {"type": "array", "items": value, "minItems": n, "maxItems": n}
        return {"type": "array", "items": value, "minItems": 1, "maxItems": max_images,
                "description": f"(B, {c}, {h}, {w}) pixel values, B <= {max_images}"}

    images = {"type": "array", "minItems": 1, "maxItems": max_images,
              "items": {"type": "string", "contentEncoding": "base64",
                        "description": f"a {w}x{h} {'grayscale' if c == 1 else 'RGB'} PNG or "
                                       f"JPEG file, base64-encoded"}}
    return {"title": "PredictRequest", "description": PredictRequest.__doc__, "oneOf": [
        {"type": "object", "title": "Encoded images", "additionalProperties": False,
         "required": ["images"], "properties": {"images": images}},
        {"type": "object", "title": "Float pixels", "additionalProperties": False,
         "required": ["pixels"], "properties": {
             "pixels": batch({"type": "number", "minimum": 0, "maximum": 1}),
             "dtype": {"type": "string", "const": "float"}}},
        {"type": "object", "title": "uint8 pixels", "additionalProperties": False,
         "required": ["pixels", "dtype"], "properties": {
             "pixels": batch({"type": "integer", "minimum": 0, "maximum": 255}),
             "dtype": {"type": "string", "const": "uint8"}}},
    ]}


def parse_request(raw: bytes) -> PredictRequest:
    """JSON bytes -> PredictRequest; BadRequest 400 (not JSON) or 422 (wrong fields)."""
    try:
        return PredictRequest.model_validate_json(raw)
    except ValidationError as e:
        errors = e.errors(include_url=False, include_context=False, include_input=False)
        if any(err["type"] == "json_invalid" for err in errors):
            msg = next(err["msg"] for err in errors if err["type"] == "json_invalid")
            raise BadRequest(f"malformed JSON: {msg}", status=400) from None
        if any(err["type"] == "model_type" and not err["loc"] for err in errors):
            raise BadRequest("the body must be a JSON object with `images` or `pixels`",
                             status=422) from None
        shown = "; ".join(f"{_loc(err['loc'])}: {err['msg']}" for err in errors[:3])
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        raise BadRequest(f"invalid request: {shown}{more}", status=422) from None


def decode_request(req: PredictRequest, input_shape: tuple[int, int, int], *,
                   max_images: int) -> torch.Tensor:
    """PredictRequest -> float32 (B, C, H, W) in [0, 1]; BadRequest on anything else."""
    n = len(req.images) if req.images is not None else len(req.pixels or [])
    if n == 0:
        raise BadRequest("the request has no images", status=422)
    if n > max_images:
        raise BadRequest(f"the request has {n} images; at most {max_images} per request",
                         status=413)
    if req.images is not None:
        return decode_images(req.images, input_shape)
    return decode_pixels(req.pixels or [], req.dtype, input_shape)


def decode_images(images: list[str], input_shape: tuple[int, int, int]) -> torch.Tensor:
    """base64 PNG/JPEG strings -> float32 (B, C, H, W) in [0, 1]."""
    arrays = [_decode_one(i, s, input_shape) for i, s in enumerate(images)]  # (C, H, W) uint8
    return torch.from_numpy(np.stack(arrays)).float().div_(255.0)


def _decode_one(i: int, b64: str, input_shape: tuple[int, int, int]) -> np.ndarray:
    c, h, w = input_shape
    try:
        data = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError) as e:
        raise BadRequest(f"images[{i}] is not valid base64: {e}", status=400) from None
    try:
        img = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, ValueError):
        raise BadRequest(f"images[{i}] is not a PNG or JPEG image ({len(data)} bytes that no "
                         f"image decoder recognises)", status=400) from None
    if img.format not in IMAGE_FORMATS:
        raise BadRequest(f"images[{i}] is {img.format}; send PNG or JPEG", status=415)
    if img.size != (w, h):  # checked from the header, before any pixel is decoded
        raise BadRequest(f"images[{i}] is {img.size[0]}x{img.size[1]} pixels; the model takes "
                         f"{w}x{h}", status=422)
    mode = "L" if img.mode == "1" else img.mode
    if mode not in MODES.get(c, ()):
        got = len(img.getbands())
        raise BadRequest(f"images[{i}] has mode {img.mode} ({got} channel{'s' * (got != 1)}); "
                         f"the model takes {c}-channel {'/'.join(MODES.get(c, ('?',)))} "
                         f"images", status=422)
    try:
        arr = np.asarray(img.convert(mode), dtype=np.uint8)  # (H, W) or (H, W, 3)
    except (OSError, ValueError, SyntaxError) as e:
        raise BadRequest(f"images[{i}]: corrupt or truncated {img.format} data ({e})",
                         status=400) from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def decode_pixels(pixels: list[list[list[list[float]]]], dtype: str,
                  input_shape: tuple[int, int, int]) -> torch.Tensor:
    """Nested (B, C, H, W) values -> float32 (B, C, H, W) in [0, 1]."""
    c, h, w = input_shape
    try:
        arr = np.asarray(pixels, dtype=np.float64)
    except ValueError:
        raise BadRequest(f"pixels is ragged: every image must be ({c}, {h}, {w})",
                         status=422) from None
    if arr.shape[1:] != (c, h, w):
        raise BadRequest(f"pixels has shape {arr.shape}; the model takes (B, {c}, {h}, {w})"
                         + _which(arr.shape, input_shape), status=422)
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).reshape(arr.shape[0], -1).any(1).argmax())
        raise BadRequest(f"pixels contain NaN or infinite values (first in image {bad})",
                         status=422)
    if dtype == "uint8":
        if (arr < 0).any() or (arr > 255).any() or (arr != np.round(arr)).any():
            raise BadRequest("pixels with dtype uint8 must be integers in 0..255, got values "
                             f"in [{arr.min():.4g}, {arr.max():.4g}]", status=422)
        return torch.from_numpy(arr.astype(np.uint8)).float().div_(255.0)
    if arr.size and (arr.min() < 0 or arr.max() > 1):
        raise BadRequest(f"pixels with dtype float must lie in [0, 1], got values in "
                         f"[{arr.min():.4g}, {arr.max():.4g}] (send dtype \"uint8\" for 0..255)",
                         status=422)
    return torch.from_numpy(arr.astype(np.float32))


def image_hashes(x: torch.Tensor) -> list[str]:
    """sha256 of each image's float32 (C, H, W) bytes: what the audit log records."""
    flat = x.detach().cpu().contiguous().numpy()
    return [hashlib.sha256(flat[i].tobytes()).hexdigest() for i in range(flat.shape[0])]


def encode_png(x: torch.Tensor) -> list[str]:
    """(B, C, H, W) uint8, or float in [0, 1] (rounded to 8 bits) -> base64 PNG strings."""
    if x.dtype != torch.uint8:
        x = (x.float().clamp(0, 1) * 255).round().to(torch.uint8)
    out = []
    for img in x.cpu().numpy():  # (C, H, W)
        pil = Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0))
        buf = io.BytesIO()
        pil.save(buf, format="PNG", compress_level=1)
        out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return out


def _which(got: tuple[int, ...], want: tuple[int, int, int]) -> str:
    if len(got) != 4:
        return ""
    if got[1] != want[0]:
        return f": {got[1]} channels, the model takes {want[0]}"
    return f": images are {got[3]}x{got[2]}, the model takes {want[2]}x{want[1]}"


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"
