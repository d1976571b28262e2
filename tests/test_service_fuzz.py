"""Fuzz the predict endpoint: whatever arrives, the answer is a 200 or a 4xx with a message,
never a server error, and the key is charged for exactly the images answered. Small sizes:
hypothesis on raw and near-valid bodies, and schemathesis against the OpenAPI schema."""

from __future__ import annotations

import base64
import io
import json
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from stealguard.models import build_model
from stealguard.service import KeyStore, Limits, create_app

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


class Served:
    def __init__(self, tmp_path) -> None:
        torch.manual_seed(0)
        self.model = build_model("conv3", in_channels=1, image_size=8, num_classes=4)
        self.store = KeyStore(tmp_path / "fuzz.db")
        self.key, self.secret = self.store.create_key()
        self.app = create_app(self.model, store=self.store,
                              limits=Limits(max_images=4, max_body_bytes=64 * 1024))
        self.client = TestClient(self.app)  # raises on any server error: hypothesis shrinks it
        self.answered = 0

    def post(self, content: bytes):
        r = self.client.post("/v1/predict", content=content,
                             headers={"Authorization": f"Bearer {self.secret}",
                                      "Content-Type": "application/json"})
        assert r.status_code in (200, 400, 413, 415, 422), (r.status_code, r.text)
        body = r.json()
        if r.status_code == 200:
            rows = torch.tensor(body["outputs"])
            assert rows.shape[1] == 4 and torch.allclose(rows.sum(1), torch.ones(len(rows)))
            self.answered += len(rows)
        else:
            assert isinstance(body["detail"], str) and body["detail"]
        return r

    def check_accounting(self) -> None:
        assert self.client.get("/healthz").status_code == 200
        assert self.store.get(self.key.id).used == self.answered


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    torch.set_num_threads(1)
    return Served(tmp_path_factory.mktemp("fuzz"))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-300, 300) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["images", "pixels", "dtype", "x"]), inner, max_size=3),
    max_leaves=20)


@FUZZ
@given(body=st.one_of(st.binary(max_size=64), json_values.map(lambda v: json.dumps(v).encode())))
def test_arbitrary_bodies_get_a_4xx_or_an_answer(served, body):
    served.post(body)


def _png(size: int, mode: str) -> bytes:
    arr = torch.randint(0, 256, (size, size, 3) if mode == "RGB" else (size, size),
                        dtype=torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


valid_png = st.just(8).map(lambda n: base64.b64encode(_png(n, "L")).decode())
image_strings = st.one_of(
    valid_png, valid_png,  # about half the images are valid: answers get fuzzed too
    st.text(max_size=12),
    st.binary(max_size=40).map(lambda b: base64.b64encode(b).decode()),
    st.tuples(st.sampled_from([7, 8, 9]), st.sampled_from(["L", "RGB"]), st.integers(0, 120))
      .map(lambda t: base64.b64encode(_png(t[0], t[1])[: t[2] or None]).decode()),
)
pixel_values = st.one_of(st.sampled_from([0.0, 0.25, 1.0, 0, 1, 255]),
                         st.floats(allow_nan=True, allow_infinity=True, width=32),
                         st.integers(-2, 300))


@st.composite
def pixel_batches(draw):
    b = draw(st.sampled_from([1, 2, 3, 0, 5]))
    c, h = draw(st.sampled_from([1, 1, 1, 3])), draw(st.sampled_from([8, 8, 8, 7]))
    fill = draw(pixel_values)
    arr = [[[[fill] * h for _ in range(h)] for _ in range(c)] for _ in range(b)]
    if b and draw(st.booleans()):
        arr[-1][0][-1][0] = draw(pixel_values)
    return arr


@FUZZ
@given(kind=st.sampled_from(["images", "pixels"]),
       images=st.lists(image_strings, min_size=1, max_size=5),
       pixels=pixel_batches(), dtype=st.sampled_from([None, None, "float", "uint8", "int"]))
def test_near_valid_requests_get_a_4xx_or_an_answer(served, kind, images, pixels, dtype):
    body: dict = {"images": images} if kind == "images" else {"pixels": pixels}
    if dtype is not None:
        body["dtype"] = dtype
    served.post(json.dumps(body).encode())


def test_accounting_after_the_fuzzing_is_exact(served):
    served.post(json.dumps({"pixels": torch.zeros(2, 1, 8, 8).tolist()}).encode())
    served.check_accounting()
    assert served.answered >= 2


def test_the_openapi_schema_holds(served):
    """schemathesis cases from the app's own schema (positive and negative), driven by
    hypothesis directly: its pytest plugin does not run under pytest 9."""
    schemathesis = pytest.importorskip("schemathesis")
    from schemathesis.checks import (
        content_type_conformance,
        not_a_server_error,
        response_schema_conformance,
        status_code_conformance,
    )
    from schemathesis.generation import GenerationMode

    schema = schemathesis.openapi.from_asgi("/openapi.json", served.app)
    checks = [not_a_server_error, status_code_conformance, content_type_conformance,
              response_schema_conformance]
    headers = {"Authorization": f"Bearer {served.secret}"}
    operations = [op.ok() for op in schema.get_all_operations()]
    assert {op.label for op in operations} == {"POST /v1/predict", "GET /v1/info",
                                               "GET /healthz"}
    for op in operations:
        modes = [GenerationMode.POSITIVE] + [GenerationMode.NEGATIVE] * (op.method == "post")
        for mode in modes:  # a GET without parameters has no invalid form
            @settings(max_examples=10, deadline=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case):
                case.call_and_validate(headers=headers, checks=checks)

            run()
