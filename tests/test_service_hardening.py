"""The service under attack (issue #15), through the ASGI test client: bounded parsing and
decompression bombs, strict types and headers, distinct refusals, the tamper-evident audit
log with refusals on record, and /metrics."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import sqlite3
import stat
import struct
import tracemalloc
import warnings
import zlib

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from stealguard.models import build_model
from stealguard.service import KeyStore, Limits, create_app
from stealguard.service.cli import standalone_app
from stealguard.service.codec import encode_png, request_schema
from synthetic import quadrant_images

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
X, _ = quadrant_images(4, seed=3)  # (4, 1, 8, 8) uint8


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("conv3", in_channels=1, image_size=8, num_classes=4).eval()


@pytest.fixture
def store(tmp_path):
    s = KeyStore(tmp_path / "service.db")
    yield s
    s.close()


def headers(secret: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}", "Content-Type": "application/json", **extra}


def post(client, secret, body, **extra):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post("/v1/predict", content=content, headers=headers(secret, **extra))


# decompression bombs and bounded parsing -------------------------------------------------

def _png_claiming(width: int, height: int) -> bytes:
    """A well-formed PNG header (valid CRCs) claiming width x height, with a tiny IDAT."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def _jpeg_claiming(width: int, height: int) -> bytes:
    """A real 8x8 JPEG whose SOF0 frame header is patched to claim width x height."""
    buf = io.BytesIO()
    Image.fromarray(X[0, 0].numpy()).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@pytest.mark.parametrize("bomb,claim", [(_png_claiming(30000, 30000), "30000x30000"),
                                        (_jpeg_claiming(65000, 65000), "65000x65000")],
                         ids=["png", "jpeg"])
def test_decompression_bombs_are_refused_from_their_header(model, store, bomb, claim):
    _, secret = store.create_key()
    client = TestClient(create_app(model, store=store), raise_server_exceptions=False)
    r = post(client, secret, {"images": [base64.b64encode(bomb).decode()]})
    assert (r.status_code, r.json()["code"]) == (422, "invalid_image"), r.text
    assert f"images[0] is {claim} pixels; the model takes 8x8" in r.json()["detail"]
    assert store.refusals(reason="invalid_image")[0]["client"].startswith("testclient")


def test_a_15_mb_pixel_list_costs_memory_bounded_by_the_largest_valid_request(store):
    """The issue's body: 8.3 M zeros in one innermost list. Today's parser built the whole
    list (about +600 MB) before checking the shape; now the refusal comes at the 29th value
    and the request's peak allocation stays within a small multiple of the largest valid
    request's (256 float images of 1x28x28)."""
    torch.manual_seed(0)
    mnist = build_model("conv3", in_channels=1, image_size=28, num_classes=10).eval()
    _, secret = store.create_key()
    client = TestClient(create_app(mnist, store=store, limits=Limits(max_images=256)))
    bomb = b'{"dtype":"uint8","pixels":[[[[' + b"0, " * 5_200_000 + b"0]]]]}"
    valid = json.dumps({"pixels": torch.rand(256, 1, 28, 28).tolist()}).encode()
    assert len(bomb) > 15 * 10**6 and len(valid) < 5 * 10**6

    def peak(body: bytes) -> tuple[int, int]:
        tracemalloc.start()
        try:
            r = post(client, secret, body)
            return r.status_code, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    status, valid_peak = peak(valid)
    assert status == 200
    status, bomb_peak = peak(bomb)
    assert status == 422
    # the body itself is held about twice (the client's and the server's copies)
    assert bomb_peak < 3 * len(bomb), (bomb_peak, len(bomb))
    assert bomb_peak < 6 * valid_peak, (bomb_peak, valid_peak)
    r = post(client, secret, bomb)
    assert "pixels[0][0][0] has more than 28 values" in r.json()["detail"]


def test_pixels_are_strict_numbers_and_keys_unique(model, store):
    _, secret = store.create_key()
    client = make(model, store)
    row = [0] * 8

    def pixels(value):
        return {"pixels": [[[[value] + row[1:]] + [row] * 7]], "dtype": "uint8"}

    assert post(client, secret, pixels(0)).status_code == 200
    for bad, got in (("0", "a string"), (True, "true"), (False, "false"), (None, "null"),
                     ([0], "an array"), ({"v": 0}, "an object")):
        r = post(client, secret, pixels(bad))
        assert (r.status_code, r.json()["code"]) == (422, "invalid_pixels"), (bad, r.text)
        assert f"pixels[0][0][0][0] is not a valid number (got {got})" in r.json()["detail"]
    dup = b'{"pixels": [], "pixels": ' + json.dumps(pixels(0)["pixels"]).encode() + b"}"
    r = post(client, secret, dup)
    assert r.status_code == 422 and "field `pixels` appears twice" in r.json()["detail"]
    r = post(client, secret, b'{"images": ["a"], "images": ["b"]}')
    assert r.status_code == 422 and "appears twice" in r.json()["detail"]
    r = post(client, secret, {"pixels": pixels(0)["pixels"], "dtype": True})
    assert r.status_code == 422 and '`dtype` must be "float" or "uint8"' in r.json()["detail"]
    r = post(client, secret, json.dumps(pixels(0)).encode() + b" {}")
    assert r.status_code == 400 and "extra data after the request object" in r.json()["detail"]


def test_an_empty_image_string_is_refused_as_the_schema_says(model, store):
    jsonschema = pytest.importorskip("jsonschema")
    _, secret = store.create_key()
    client = make(model, store)
    schema = request_schema((1, 8, 8), 256)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"images": [""]}, schema)
    jsonschema.validate({"images": encode_png(X[:1])}, schema)
    r = post(client, secret, {"images": [""]})
    assert (r.status_code, r.json()["code"]) == (422, "invalid_request")
    assert "images[0] is empty" in r.json()["detail"]


def make(model, store, **kw):
    return TestClient(create_app(model, store=store, **kw))


# headers: Content-Type and credentials ---------------------------------------------------

def test_content_type_must_be_json(model, store):
    _, secret = store.create_key()
    client = make(model, store)
    body = json.dumps({"pixels": X[:1].tolist(), "dtype": "uint8"}).encode()
    auth = {"Authorization": f"Bearer {secret}"}
    for ctype in ("text/plain", "multipart/form-data; boundary=x", "application/json; charset=latin-1",
                  None):
        h = auth if ctype is None else {**auth, "Content-Type": ctype}
        r = client.post("/v1/predict", content=body, headers=h)
        assert (r.status_code, r.json()["code"]) == (415, "unsupported_media_type"), ctype
        assert "Content-Type must be application/json" in r.json()["detail"]
    ok = client.post("/v1/predict", content=body,
                     headers={**auth, "Content-Type": "Application/JSON; charset=UTF-8"})
    assert ok.status_code == 200 and ok.json()["used"] == 1


def test_conflicting_credentials_are_refused(model, store):
    key, secret = store.create_key()
    _, other = store.create_key()
    client = make(model, store)
    body = {"pixels": X[:1].tolist(), "dtype": "uint8"}
    r = post(client, secret, body, **{"X-API-Key": "sg_invalid"})
    assert (r.status_code, r.json()["code"]) == (401, "conflicting_credentials")
    r = post(client, secret, body, **{"X-API-Key": other})
    assert (r.status_code, r.json()["code"]) == (401, "conflicting_credentials")
    r = client.post("/v1/predict", json=body,
                    headers={"X-API-Key": secret, "Authorization": "Basic Zm9vOmJhcg=="})
    assert r.status_code == 401 and "must be `Bearer <API key>`" in r.json()["detail"]
    assert post(client, secret, body, **{"X-API-Key": secret}).status_code == 200  # same key
    assert store.get(key.id).used == 1
    refused = store.refusals(reason="conflicting_credentials")
    assert len(refused) == 3 and all(r["key_id"] is None for r in refused)


# distinct refusals -----------------------------------------------------------------------

def test_budget_rate_window_and_rate_limit_get_distinct_answers(model, store):
    _, secret = store.create_key(budget=5, rate_limit=3, rate_window=3600)
    client = make(model, store)
    x = {"pixels": X[:1].tolist(), "dtype": "uint8"}
    r = post(client, secret, {"pixels": X.tolist(), "dtype": "uint8"})  # 4 > 3: never fits
    assert (r.status_code, r.json()["code"]) == (413, "batch_over_rate_limit")
    assert "retry-after" not in r.headers
    for _ in range(3):
        assert post(client, secret, x).status_code == 200
    r = post(client, secret, x)  # fits later
    assert (r.status_code, r.json()["code"]) == (429, "rate_limited")
    assert 1 <= int(r.headers["Retry-After"]) <= 3600
    budget, _ = store.create_key(budget=1)
    _, tight = store.create_key(budget=1)
    assert post(client, tight, x).status_code == 200
    r = post(client, tight, x)
    assert (r.status_code, r.json()["code"], r.json()["remaining"]) == (403, "budget_exhausted", 0)
    assert "retry-after" not in r.headers


# the audit log ---------------------------------------------------------------------------

def _chain(tmp_path, model, n=5):
    store = KeyStore(tmp_path / "audit.db")
    key, secret = store.create_key(name="alice")
    client = make(model, store)
    for i in range(n):
        assert post(client, secret, {"pixels": X[i % 4:i % 4 + 1].tolist(),
                                     "dtype": "uint8"}).status_code == 200
    post(client, "sg_nope", {"pixels": X[:1].tolist()})  # refused: on record too
    assert store.verify_audit().ok and store.verify_audit().rows == n + 1
    return store, key


def _sql(store, *statements):
    db = sqlite3.connect(store.engine.url.database)
    for st in statements:
        db.execute(*st) if isinstance(st, tuple) else db.execute(st)
    db.commit()
    db.close()


def test_audit_chain_names_an_altered_row(model, tmp_path):
    store, key = _chain(tmp_path, model)
    _sql(store, "UPDATE audit_events SET count = 0 WHERE seq = 3")
    check = store.verify_audit()
    assert not check.ok and check.bad_seq == 3 and "row 3 was altered" in check.problem


def test_audit_chain_names_deleted_rows(model, tmp_path):
    store, key = _chain(tmp_path, model)
    _sql(store, "DELETE FROM audit_events WHERE seq IN (2, 3)")
    check = store.verify_audit()
    assert check.bad_seq == 4 and "2 row(s) deleted before row 4 (after row 1)" in check.problem
    store2, _ = _chain(tmp_path / "b", model)
    head = store2.verify_audit().head
    _sql(store2, "DELETE FROM audit_events WHERE seq = 6")  # the last row
    assert "rows were deleted at the end" in store2.verify_audit().problem
    _sql(store2, "UPDATE audit_head SET seq = 5, row_sha256 = (SELECT row_sha256 FROM "
                 "audit_events WHERE seq = 5)")  # and the head edited to match
    assert store2.verify_audit().ok  # undetectable from inside the store...
    assert "not the one given" in store2.verify_audit(head=head).problem  # ...not from outside


def test_audit_chain_names_an_inserted_row(model, tmp_path):
    store, key = _chain(tmp_path, model)
    _sql(store, "UPDATE audit_events SET seq = seq + 10 WHERE seq >= 3",
         "UPDATE audit_events SET seq = seq - 9 WHERE seq >= 13",  # 3..6 -> 4..7
         ("INSERT INTO audit_events (seq, request_id, time, kind, key_id, count, image_sha256, "
          "reason, detail, client, prev_sha256, row_sha256) VALUES (3, 'forged', 0, 'refund', "
          "?, 5, '', '', '', '', (SELECT row_sha256 FROM audit_events WHERE seq = 2), ?)",
          (key.id, "f" * 64)))
    check = store.verify_audit()
    assert check.bad_seq == 3 and "row 3 was inserted" in check.problem


def test_refunds_are_compensating_rows_and_the_store_is_private(tmp_path):
    class Broken(torch.nn.Module):
        input_shape, num_classes = (1, 8, 8), 4

        def forward(self, x):
            raise RuntimeError("out of memory")

    store = KeyStore(tmp_path / "private.db")
    assert stat.S_IMODE(os.stat(tmp_path / "private.db").st_mode) == 0o600
    key, secret = store.create_key(budget=5)
    client = TestClient(create_app(Broken(), store=store), raise_server_exceptions=False)
    assert post(client, secret, {"pixels": X[:2].tolist(), "dtype": "uint8"}).status_code == 500
    kinds = [k for (k,) in store.engine.connect().exec_driver_sql(
        "SELECT kind FROM audit_events ORDER BY seq")]
    assert kinds == ["charge", "refund"] and store.verify_audit().ok
    summary = store.audit_summary(key.id)
    assert (summary["requests"], summary["images"], summary["refunds"]) == (0, 0, 1)
    assert store.get(key.id).used == 0 and store.schema_version == 2


def test_refused_requests_are_on_record_and_listed(model, tmp_path):
    path = tmp_path / "refused.db"
    store = KeyStore(path)
    key, secret = store.create_key(name="mallory", budget=1)
    client = make(model, store)
    x = {"pixels": X[:1].tolist(), "dtype": "uint8"}
    post(client, "sg_guess", x)
    client.post("/v1/predict", content=b"{}", headers={"Authorization": f"Bearer {secret}"})
    post(client, secret, x)
    post(client, secret, x)  # budget gone
    rows = store.refusals()
    assert [r["reason"] for r in rows] == ["budget_exhausted", "unsupported_media_type",
                                           "unknown_key"]
    assert [r["key_id"] for r in rows] == [key.id, key.id, None]
    assert rows[0]["count"] == 1 and all(r["client"].startswith("testclient:") for r in rows)
    assert "/v1/predict: query budget exceeded" in rows[0]["detail"]
    assert store.audit_summary(key.id)["refused"] == 2
    runner, app = CliRunner(), standalone_app()
    out = runner.invoke(app, ["audit", "refused", "--store", str(path), "--json"])
    assert out.exit_code == 0 and len(json.loads(out.output)["refused"]) == 3
    out = runner.invoke(app, ["audit", "refused", "--key", "mallory", "--reason",
                              "budget_exhausted", "--store", str(path), "--json"])
    assert [r["reason"] for r in json.loads(out.output)["refused"]] == ["budget_exhausted"]
    assert "unknown_key" in runner.invoke(app, ["audit", "refused", "--store", str(path)]).output
    ok = runner.invoke(app, ["audit", "verify", "--store", str(path)])
    assert ok.exit_code == 0 and "audit log intact: 4 rows" in ok.output
    assert runner.invoke(app, ["audit", "mallory", "--store", str(path)]).exit_code == 0
    _sql(store, "UPDATE audit_events SET client = 'elsewhere' WHERE seq = 1")
    bad = runner.invoke(app, ["audit", "verify", "--store", str(path)])
    assert bad.exit_code == 1 and "row 1 was altered" in bad.output


def test_a_schema_1_store_is_migrated_into_the_chain(tmp_path):
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE api_keys (id VARCHAR(32) PRIMARY KEY, secret_sha256 VARCHAR(64) NOT NULL
          UNIQUE, name VARCHAR(200) NOT NULL, created FLOAT NOT NULL, revoked FLOAT,
          budget BIGINT, used BIGINT NOT NULL, rate_limit BIGINT, rate_window FLOAT NOT NULL,
          window_start BIGINT NOT NULL, window_used BIGINT NOT NULL, output VARCHAR(8) NOT NULL,
          k INTEGER NOT NULL);
        CREATE TABLE audit_log (id INTEGER PRIMARY KEY, request_id VARCHAR(32) NOT NULL UNIQUE,
          time FLOAT NOT NULL, key_id VARCHAR(32) NOT NULL, count INTEGER NOT NULL,
          image_sha256 TEXT NOT NULL);
        INSERT INTO api_keys VALUES ('k1', 'x', 'old', 0, NULL, NULL, 5, NULL, 60, 0, 0,
          'probs', 1);
        INSERT INTO audit_log VALUES (1, 'r1', 10.5, 'k1', 2, 'a b');
        INSERT INTO audit_log VALUES (2, 'r2', 11.5, 'k1', 3, 'c d e');
    """)
    db.commit()
    db.close()
    store = KeyStore(path)
    assert store.schema_version == 2 and store.verify_audit().rows == 2
    assert store.audit_summary("k1")["images"] == 5


# metrics ---------------------------------------------------------------------------------

def test_metrics_parse_as_prometheus_text_and_show_no_secret(model, store):
    from prometheus_client.parser import text_string_to_metric_families

    key, secret = store.create_key(budget=10)
    _, free = store.create_key()
    assert make(model, store).get("/metrics").status_code == 404  # off unless asked for
    client = make(model, store, metrics=True)
    assert post(client, secret, {"pixels": X[:3].tolist(), "dtype": "uint8"}).status_code == 200
    post(client, secret, {"pixels": X.tolist() * 3, "dtype": "uint8"})  # 12 > 7 left: 403
    post(client, "sg_nope", {"pixels": X[:1].tolist(), "dtype": "uint8"})
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert secret not in r.text and free not in r.text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(r.text) for s in fam.samples}
    assert samples[("stealguard_requests_total", (("outcome", "answered"),))] == 1
    assert samples[("stealguard_requests_total", (("outcome", "refused"),))] == 2
    assert samples[("stealguard_images_total", (("outcome", "answered"),))] == 3
    assert samples[("stealguard_images_total", (("outcome", "refused"),))] == 12
    assert samples[("stealguard_refusals_total", (("reason", "budget_exhausted"),))] == 1
    assert samples[("stealguard_refusals_total", (("reason", "unknown_key"),))] == 1
    assert samples[("stealguard_request_seconds_count", ())] == 1
    assert samples[("stealguard_request_images_bucket", (("le", "2.0"),))] == 0
    assert samples[("stealguard_request_images_bucket", (("le", "4.0"),))] == 1
    assert samples[("stealguard_model_batch_images_count", ())] == 1
    assert samples[("stealguard_key_budget_remaining", (("key", key.id),))] == 7
    assert not any(n == "stealguard_key_budget_remaining" and dict(lab).get("key") != key.id
                   for n, lab in samples)  # the unlimited key has no budget series
    schema = client.get("/openapi.json").json()
    assert "/metrics" not in schema["paths"]


@pytest.mark.parametrize("body,status,match", [
    (b'{"images": ["' + b"A" * 200_000, 400, "a string with no closing quote"),
    (b'{"images": ["' + b'\\"' * 1000 + b'"]}', 422, "more than 64 escaped quotes"),
    (b'{"pixels": [[[[' + b"1" * 200_000 + b"]]]]}", 400, r"expected ',' or '\]'"),
    (b'{"pixels": ' + b"[" * 200_000, 422, r"pixels\[0\]\[0\]\[0\]\[0\] is not a valid number "
                                           r"\(got an array\)"),
    (b'{"images": ["\xff"]}', 400, "a bad string"),
    (b'{"pix\\u0065ls": [], "images": ["x"]}', 422, "exactly one of"),  # escapes decoded
], ids=["unterminated", "escaped-quotes", "long-number", "deep", "bad-utf8", "escaped-key"])
def test_the_parser_refuses_pathological_bodies_early(model, store, body, status, match):
    _, secret = store.create_key()
    r = post(make(model, store), secret, body)
    assert r.status_code == status and re.search(match, r.json()["detail"]), r.text
