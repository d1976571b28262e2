"""The wire format of `POST /v1/predict`: JSON in, a checked image batch out.

A request carries either encoded images or raw pixels, never both:

    {"images": ["iVBORw0KGgo...", ...]}                  base64 PNG or JPEG, one per image
    {"pixels": [[[[0.0, 0.5, ...]]]], "dtype": "float"}  (B, C, H, W) values in [0, 1]
    {"pixels": [[[[0, 128, ...]]]], "dtype": "uint8"}    (B, C, H, W) integers in 0..255

`parse_request(raw, input_shape, max_images=)` reads the body with a strict parser bounded by
the model's input: no general JSON parser builds the whole document first. Every level of
`pixels` is length-checked as it is read (an image is matched by one regular expression of
exactly C x H x W numbers, then converted at once), `images` stops at `max_images` strings,
unknown and duplicate fields, booleans, strings and numeric strings as pixels are refused,
and whatever follows the object must be whitespace. So a request costs memory in proportion
to the largest valid request whatever its body holds (the body itself is bounded by the
app's byte limit).

`decode_request` returns float32 (B, C, H, W) in [0, 1], the same tensor `LocalBlackBox`
would build from the same images. Image headers are read before any decoder runs: a PNG or
JPEG whose header names another size (a decompression bomb claiming 30000x30000) is refused
from its first bytes, and only PNG and JPEG reach Pillow.

Every refusal is a BadRequest with the HTTP status and a code from REFUSALS: 400 (not JSON,
not base64, not an image), 413 (too many images), 415 (not PNG/JPEG), 422 (fields, types,
size, channels, range, NaN/inf), with a message that names the problem and the image.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import io
import json
import re
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from stealguard.service.errors import BadRequest

IMAGE_FORMATS = ("PNG", "JPEG")
MODES = {1: ("L",), 3: ("RGB",)}  # the PIL modes accepted for C channels ("1" is read as L)
DTYPES = ("float", "uint8")


@dataclass(frozen=True)
class PredictRequest:
    """A batch of images: `images` (base64 PNG/JPEG) or `pixels` (B, C, H, W)."""

    images: list[str] | None = None
    pixels: np.ndarray | None = None  # (B, C, H, W) float64, the values as sent
    dtype: str = "float"

    @property
    def count(self) -> int:
        if self.images is not None:
            return len(self.images)
        return 0 if self.pixels is None else int(self.pixels.shape[0])


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
              "items": {"type": "string", "contentEncoding": "base64", "minLength": 1,
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


# -- the bounded parser ---------------------------------------------------------------------

_WS = re.compile(rb"[ \t\n\r]*")
# Each pattern matches in one way only (no nested quantifiers over the same characters), so a
# failed match backtracks in linear time; no possessive forms, which need Python 3.11.
# Numbers have at most 40 digits before and after the point: a failed match backtracks over
# a bounded run, never over megabytes of digits.
_NUM = (rb"(?:-?(?:0|[1-9][0-9]{0,39})(?:\.[0-9]{1,40})?(?:[eE][-+]?[0-9]{1,4})?"
        rb"|NaN|-?Infinity)")
_NUM_RX = re.compile(_NUM)
_STR_PLAIN = re.compile(rb'"([^"\\\x00-\x1f]*)"')  # no escapes: base64 and field names
_LITERAL = re.compile(rb"true|false|null")
_LEVELS = ("channels", "rows", "values")  # what the items of pixels[i], [i][c], [i][c][y] are


@functools.lru_cache(maxsize=16)
def _image_regex(shape: tuple[int, int, int]) -> re.Pattern[bytes]:
    """One image, (C, H, W) numbers in nested arrays of exactly those lengths."""
    ws = rb"[ \t\n\r]*"

    def array(item: bytes, n: int) -> bytes:
        more = rb"(?:" + ws + rb"," + ws + item + rb"){%d}" % (n - 1) if n > 1 else b""
        return rb"\[" + ws + item + more + ws + rb"\]"

    c, h, w = shape
    return re.compile(array(array(array(_NUM, w), h), c))


class _Reader:
    """A cursor over the body bytes."""

    def __init__(self, data: bytes | bytearray) -> None:
        self.data, self.pos = data, 0

    def peek(self) -> bytes | bytearray:
        self.pos = _WS.match(self.data, self.pos).end()  # type: ignore[union-attr]
        return self.data[self.pos:self.pos + 1]

    def step(self) -> None:
        self.pos += 1

    def malformed(self, what: str) -> BadRequest:
        return BadRequest(f"malformed JSON at byte {self.pos}: {what}", code="malformed_json")

    def separator(self, close: bytes, where: str) -> bool:
        """After an item: True on `,`, False on the closing bracket."""
        nxt = self.peek()
        if nxt == b",":
            self.step()
            return True
        if nxt == close:
            self.step()
            return False
        raise self.malformed(f"expected ',' or '{close.decode()}' in {where}")

    def string(self) -> str | None:
        """The JSON string here, or None (and the cursor unmoved) if there is none."""
        if self.peek() != b'"':
            return None
        m = _STR_PLAIN.match(self.data, self.pos)  # the common case: no escapes
        end = m.end() if m is not None else self._string_end()
        token, self.pos = bytes(self.data[self.pos:end]), end
        try:
            return token[1:-1].decode("utf-8") if m is not None else str(json.loads(token))
        except ValueError as e:  # bad UTF-8, a bad escape, a control character
            raise self.malformed(f"a bad string ({e})") from None

    def _string_end(self, max_escaped_quotes: int = 64) -> int:
        """Just past the closing quote of the string here, found with bytes.find; no field
        of a request needs escaped quotes, so a string with many is refused, not scanned."""
        q = self.pos
        for _ in range(max_escaped_quotes + 1):
            q = self.data.find(b'"', q + 1)
            if q < 0:
                raise self.malformed("a string with no closing quote")
            i = q - 1
            while self.data[i] == 0x5C:  # backslashes before the quote: odd = escaped
                i -= 1
            if (q - 1 - i) % 2 == 0:
                return q + 1
        raise BadRequest(f"invalid request: a string with more than {max_escaped_quotes} "
                         f"escaped quotes (at byte {self.pos})", code="invalid_request")

    def what(self) -> str:
        """What the value here is, for a message; malformed JSON if it is not a value."""
        nxt = self.peek()
        if nxt == b'"':
            return "a string"
        if nxt in (b"[", b"{"):
            return "an array" if nxt == b"[" else "an object"
        m = _LITERAL.match(self.data, self.pos)
        if m is not None:
            return m.group().decode()
        if _NUM_RX.match(self.data, self.pos):
            return "a number"
        raise self.malformed("expected a JSON value")


def parse_request(raw: bytes | bytearray, input_shape: tuple[int, int, int], *,
                  max_images: int) -> PredictRequest:
    """JSON bytes -> PredictRequest, read with bounds from the model's (C, H, W) and the
    image limit; BadRequest 400 (not JSON), 413 (too many images) or 422 (fields, types)."""
    r = _Reader(raw)
    first = r.peek()
    if first != b"{":
        if not first:
            raise BadRequest("malformed JSON: the body is empty", code="malformed_json")
        r.what()  # malformed JSON, or a JSON value that is not an object:
        raise BadRequest("the body must be a JSON object with `images` or `pixels`",
                         code="invalid_request")
    r.step()
    fields: dict[str, Any] = {}
    if r.peek() == b"}":
        r.step()
    else:
        while True:
            name = r.string()
            if name is None:
                raise r.malformed("expected a field name (a string)")
            if name in fields:
                raise BadRequest(f"invalid request: field `{name}` appears twice",
                                 code="invalid_request")
            if r.peek() != b":":
                raise r.malformed("expected ':' after a field name")
            r.step()
            read = _FIELDS.get(name)
            if read is None:
                raise BadRequest(f"invalid request: unknown field `{name[:40]}`; a request has "
                                 "`images`, or `pixels` and `dtype`", code="invalid_request")
            fields[name] = read(r, input_shape, max_images)
            if not r.separator(b"}", "the request object"):
                break
    if r.peek():
        raise r.malformed("extra data after the request object")
    return _request(fields)


def _request(fields: dict[str, Any]) -> PredictRequest:
    images, pixels = fields.get("images"), fields.get("pixels")
    if (images is None) == (pixels is None):
        raise BadRequest("invalid request: give exactly one of `images` (base64 PNG/JPEG) or "
                         "`pixels` (nested array B, C, H, W)", code="invalid_request")
    if images is not None and "dtype" in fields:
        raise BadRequest("invalid request: `dtype` applies to `pixels` only; encoded images "
                         "carry their own", code="invalid_request")
    return PredictRequest(images=images, pixels=pixels, dtype=fields.get("dtype", "float"))


def _too_many(max_images: int) -> BadRequest:
    return BadRequest(f"the request has more than {max_images} images; at most {max_images} "
                      f"per request", code="too_many_images")


def _read_images(r: _Reader, _shape: tuple[int, int, int], max_images: int) -> list[str]:
    if r.peek() != b"[":
        raise BadRequest(f"invalid request: `images` must be an array of base64 strings, got "
                         f"{r.what()}", code="invalid_request")
    r.step()
    out: list[str] = []
    if r.peek() == b"]":
        r.step()
        return out
    while True:
        if len(out) == max_images:
            raise _too_many(max_images)
        s = r.string()
        if s is None:
            raise BadRequest(f"invalid request: images[{len(out)}] must be a base64 string, got "
                             f"{r.what()}", code="invalid_request")
        out.append(s)
        if not r.separator(b"]", "`images`"):
            return out


def _read_dtype(r: _Reader, _shape: tuple[int, int, int], _max: int) -> str:
    s = r.string()
    if s not in DTYPES:
        got = repr(s[:20]) if s is not None else r.what()
        raise BadRequest(f"invalid request: `dtype` must be \"float\" or \"uint8\", got {got}",
                         code="invalid_request")
    return s


def _read_pixels(r: _Reader, shape: tuple[int, int, int], max_images: int) -> np.ndarray:
    """`pixels` -> (B, C, H, W) float64. Each image is one regular-expression match of
    exactly C x H x W numbers; a mismatch is explained by walking that image token by token."""
    c, h, w = shape
    if r.peek() != b"[":
        raise BadRequest(f"invalid request: `pixels` must be an array (B, {c}, {h}, {w}), got "
                         f"{r.what()}", code="invalid_request")
    r.step()
    image, spans = _image_regex(shape), list[tuple[int, int]]()
    if r.peek() == b"]":
        r.step()
    else:
        while True:
            if len(spans) == max_images:
                raise _too_many(max_images)
            r.peek()
            m = image.match(r.data, r.pos)
            if m is None:
                raise _explain(r, len(spans), shape)
            spans.append(m.span())
            r.pos = m.end()
            if not r.separator(b"]", "`pixels`"):
                break
    out = np.empty((len(spans), c * h * w))
    view = memoryview(r.data)
    for i, (start, end) in enumerate(spans):  # one image's text at a time: bounded memory
        text = bytes(view[start:end]).translate(None, b"[] \t\n\r").decode("ascii")
        out[i] = np.fromstring(text, sep=",")  # checked by the regex: exactly C*H*W numbers
    return out.reshape(len(spans), c, h, w)


def _explain(r: _Reader, i: int, shape: tuple[int, int, int]) -> BadRequest:
    """Why pixels[i] is not a (C, H, W) array of numbers: the first wrong level or item."""
    c, h, w = shape
    want = f"; the model takes (B, {c}, {h}, {w})"

    def walk(loc: str, dims: tuple[int, ...]) -> None:
        level = _LEVELS[3 - len(dims)]
        if r.peek() != b"[":
            raise BadRequest(f"pixels{loc} must be an array of {dims[0]} {level}, got "
                             f"{r.what()}{want}", code="invalid_pixels")
        r.step()
        n = 0
        if r.peek() == b"]":
            r.step()
        else:
            while True:
                if n == dims[0]:
                    raise BadRequest(f"pixels{loc} has more than {dims[0]} {level}{want}",
                                     code="invalid_pixels")
                if len(dims) == 1:
                    r.peek()
                    m = _NUM_RX.match(r.data, r.pos)
                    if m is None:
                        raise BadRequest(f"pixels{loc}[{n}] is not a valid number (got "
                                         f"{r.what()})", code="invalid_pixels")
                    r.pos = m.end()
                else:
                    walk(f"{loc}[{n}]", dims[1:])
                n += 1
                if not r.separator(b"]", f"pixels{loc}"):
                    break
        if n != dims[0]:
            raise BadRequest(f"pixels{loc} has {n} {level}{want}", code="invalid_pixels")

    walk(f"[{i}]", shape)
    return BadRequest(f"pixels[{i}] is not a ({c}, {h}, {w}) array of numbers",
                      code="invalid_pixels")


_FIELDS = {"images": _read_images, "pixels": _read_pixels, "dtype": _read_dtype}


# -- decoding -------------------------------------------------------------------------------

def decode_request(req: PredictRequest, input_shape: tuple[int, int, int]) -> torch.Tensor:
    """PredictRequest -> float32 (B, C, H, W) in [0, 1]; BadRequest on anything else."""
    if req.count == 0:
        raise BadRequest("the request has no images", code="invalid_request")
    if req.images is not None:
        return decode_images(req.images, input_shape)
    assert req.pixels is not None
    return decode_pixels(req.pixels, req.dtype)


def decode_images(images: list[str], input_shape: tuple[int, int, int]) -> torch.Tensor:
    """base64 PNG/JPEG strings -> float32 (B, C, H, W) in [0, 1]."""
    arrays = [_decode_one(i, s, input_shape) for i, s in enumerate(images)]  # (C, H, W) uint8
    return torch.from_numpy(np.stack(arrays)).float().div_(255.0)


def _png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the IHDR chunk, which must come first."""
    if len(data) < 24 or data[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", data[16:24])


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(data: bytes, max_segments: int = 256) -> tuple[int, int] | None:
    """(width, height) from the first SOFn frame header, walking at most `max_segments`
    marker segments; None when there is no frame header before the scan or the end."""
    i = 2
    for _ in range(max_segments):
        if i + 4 > len(data) or data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # a fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # no length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no frame header before
            return None
        (length,) = struct.unpack(">H", data[i + 2:i + 4])
        if marker in _SOF:
            if i + 9 > len(data):
                return None
            h, w = struct.unpack(">HH", data[i + 5:i + 9])
            return w, h
        i += 2 + length
    return None


# format name -> (magic bytes, header reader or None: sniffed only to name it in a 415)
_SIGNATURES: dict[str, tuple[bytes, Any]] = {
    "PNG": (b"\x89PNG\r\n\x1a\n", _png_size), "JPEG": (b"\xff\xd8", _jpeg_size),
    "GIF": (b"GIF8", None), "BMP": (b"BM", None), "TIFF": (b"II*\x00", None),
    "TIFF (big-endian)": (b"MM\x00*", None), "WEBP": (b"RIFF", None), "ICO": (b"\x00\x00\x01\x00", None),
    "JPEG 2000": (b"\x00\x00\x00\x0cjP  ", None), "PSD": (b"8BPS", None),
}


def _decode_one(i: int, b64: str, input_shape: tuple[int, int, int]) -> np.ndarray:
    c, h, w = input_shape
    if not b64:
        raise BadRequest(f"images[{i}] is empty; send a base64 PNG or JPEG file",
                         code="invalid_request")
    try:
        data = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError) as e:
        raise BadRequest(f"images[{i}] is not valid base64: {e}", code="bad_image") from None
    fmt = next((name for name, (magic, _) in _SIGNATURES.items() if data.startswith(magic)),
               None)
    if fmt is None:
        raise BadRequest(f"images[{i}] is not a PNG or JPEG image ({len(data)} bytes that no "
                         f"image decoder recognises)", code="bad_image")
    if fmt not in IMAGE_FORMATS:
        raise BadRequest(f"images[{i}] is {fmt}; send PNG or JPEG", code="image_format")
    size = _SIGNATURES[fmt][1](data)  # from the header, before any decoder runs
    if size is None:
        raise BadRequest(f"images[{i}]: corrupt or truncated {fmt} data (no image header with "
                         f"a size)", code="bad_image")
    if size != (w, h):
        raise BadRequest(f"images[{i}] is {size[0]}x{size[1]} pixels; the model takes {w}x{h}",
                         code="invalid_image")
    try:
        img = Image.open(io.BytesIO(data), formats=[fmt])
    except Image.DecompressionBombError as e:  # unreachable after the size check; still a 422
        raise BadRequest(f"images[{i}]: {e}", code="invalid_image") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, struct.error):
        raise BadRequest(f"images[{i}]: corrupt or truncated {fmt} data", code="bad_image") from None
    if img.size != (w, h):
        raise BadRequest(f"images[{i}] is {img.size[0]}x{img.size[1]} pixels; the model takes "
                         f"{w}x{h}", code="invalid_image")
    mode = "L" if img.mode == "1" else img.mode
    if mode not in MODES.get(c, ()):
        got = len(img.getbands())
        raise BadRequest(f"images[{i}] has mode {img.mode} ({got} channel{'s' * (got != 1)}); "
                         f"the model takes {c}-channel {'/'.join(MODES.get(c, ('?',)))} "
                         f"images", code="invalid_image")
    try:
        arr = np.asarray(img.convert(mode), dtype=np.uint8)  # (H, W) or (H, W, 3)
    except (OSError, ValueError, SyntaxError, struct.error) as e:
        raise BadRequest(f"images[{i}]: corrupt or truncated {fmt} data ({e})",
                         code="bad_image") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def decode_pixels(arr: np.ndarray, dtype: str) -> torch.Tensor:
    """(B, C, H, W) float64 values as sent -> float32 (B, C, H, W) in [0, 1]."""
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).reshape(arr.shape[0], -1).any(1).argmax())
        raise BadRequest(f"pixels contain NaN or infinite values (first in image {bad})",
                         code="invalid_pixels")
    if dtype == "uint8":
        if (arr < 0).any() or (arr > 255).any() or (arr != np.round(arr)).any():
            raise BadRequest("pixels with dtype uint8 must be integers in 0..255, got values "
                             f"in [{arr.min():.4g}, {arr.max():.4g}]", code="invalid_pixels")
        return torch.from_numpy(arr.astype(np.uint8)).float().div_(255.0)
    if arr.size and (arr.min() < 0 or arr.max() > 1):
        raise BadRequest(f"pixels with dtype float must lie in [0, 1], got values in "
                         f"[{arr.min():.4g}, {arr.max():.4g}] (send dtype \"uint8\" for 0..255)",
                         code="invalid_pixels")
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


