"""The prediction service through the ASGI test client: answers, keys, budgets, rate limits,
the audit log, every bad input, and the pieces (store, batcher, served-model loaders)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from stealguard.artifacts import save_classifier
from stealguard.blackbox import LocalBlackBox
from stealguard.defenses import build_defense
from stealguard.errors import ArtifactError, ConfigError, QueryBudgetExceeded, UnknownNameError
from stealguard.models import build_model
from stealguard.service import (
    SERVED_FORMATS,
    AuthError,
    HttpBlackBox,
    KeyStore,
    Limits,
    MicroBatcher,
    RateLimited,
    ServedModel,
    ServiceError,
    create_app,
    load_served_model,
)
from stealguard.service.codec import encode_png
from synthetic import quadrant_images

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny models: one intra-op thread is faster than two on a shared 2-core machine."""
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


def make(model, store, **kw):
    return TestClient(create_app(model, store=store, **kw))


def auth(secret):
    return {"Authorization": f"Bearer {secret}"}


def json_auth(secret):
    return {**auth(secret), "Content-Type": "application/json"}


def png_b64(arr, fmt="PNG", mode=None):
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


X, _ = quadrant_images(6, seed=3)  # (6, 1, 8, 8) uint8


# answers ----------------------------------------------------------------------------------

def test_every_encoding_answers_as_the_local_black_box(model, store):
    _, secret = store.create_key()
    client = make(model, store)
    want = LocalBlackBox(model).query(X)  # (6, 4)
    bodies = {
        "uint8 pixels": {"pixels": X.tolist(), "dtype": "uint8"},
        "float pixels": {"pixels": (X.float() / 255).tolist()},
        "png": {"images": encode_png(X)},
    }
    for name, body in bodies.items():
        r = client.post("/v1/predict", json=body, headers=auth(secret))
        assert r.status_code == 200, (name, r.text)
        got = torch.tensor(r.json()["outputs"])
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=name)
    jpeg = client.post("/v1/predict", headers={"X-API-Key": secret},
                       json={"images": [png_b64(X[0, 0].numpy(), "JPEG")]})
    assert jpeg.status_code == 200 and len(jpeg.json()["outputs"]) == 1
    assert store.list_keys()[0].used == 3 * 6 + 1


def test_defense_and_output_modes_per_key(model, store):
    defense = build_defense("rounding", {"decimals": 1})
    client = make(model, store, defense=defense)
    for output, k in (("probs", 1), ("topk", 2), ("label", 1)):
        _, secret = store.create_key(output=output, k=k)
        r = client.post("/v1/predict", json={"pixels": X.tolist(), "dtype": "uint8"},
                        headers=auth(secret)).json()
        want = LocalBlackBox(model, defense=defense, output=output, k=k).query(X)
        assert r["output"] == output
        torch.testing.assert_close(torch.tensor(r["outputs"]), want, rtol=0, atol=1e-6)


def test_info_health_and_schema_say_nothing_of_the_defense(model, store):
    _, secret = store.create_key(budget=50, rate_limit=10, rate_window=5, output="topk", k=2)
    client = make(model, store, defense=build_defense("reverse_sigmoid", {}),
                  classes=["tl", "tr", "bl", "br"])
    info = client.get("/v1/info", headers=auth(secret)).json()
    assert info["input_shape"] == [1, 8, 8] and info["classes"] == ["tl", "tr", "bl", "br"]
    assert (info["output"], info["k"], info["budget"], info["remaining"]) == ("topk", 2, 50, 50)
    assert (info["rate_limit"], info["rate_window_s"]) == (10, 5.0)
    text = json.dumps(info).lower() + client.get("/openapi.json").text.lower()
    assert not any(w in text for w in ("reverse", "sigmoid", "edm", "hash", "conv3"))
    assert client.get("/healthz").json() == {"status": "ok"}
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/v1/predict"]["post"]["requestBody"]["content"]["application/json"]
    assert len(body["schema"]["oneOf"]) == 3
    assert {"429", "413", "401"} <= set(schema["paths"]["/v1/predict"]["post"]["responses"])


# keys, budgets, rate limits ---------------------------------------------------------------

def test_missing_unknown_and_revoked_keys(model, store):
    key, secret = store.create_key(name="alice")
    client = make(model, store)
    body = {"pixels": X[:1].tolist(), "dtype": "uint8"}
    r = client.post("/v1/predict", json=body)
    assert r.status_code == 401 and "missing API key" in r.json()["detail"]
    r = client.post("/v1/predict", json=body, headers=auth("sg_nope"))
    assert r.status_code == 401 and "unknown API key" in r.json()["detail"]
    assert client.post("/v1/predict", json=body, headers=auth(secret)).status_code == 200
    store.revoke("alice")
    r = client.post("/v1/predict", json=body, headers=auth(secret))
    assert r.status_code == 403 and f"API key {key.id} was revoked" in r.json()["detail"]
    assert client.get("/v1/info", headers=auth(secret)).status_code == 403
    assert store.get(key.id).used == 1


def test_budget_refuses_a_crossing_batch_whole(model, store):
    key, secret = store.create_key(budget=10)
    client = make(model, store)

    def send(n):
        return client.post("/v1/predict", json={"pixels": X[:1].repeat(n, 1, 1, 1).tolist(),
                                                "dtype": "uint8"}, headers=auth(secret))

    assert send(8).json()["remaining"] == 2
    r = send(4)  # never retry as is: 403 budget_exhausted, no Retry-After
    assert (r.status_code, r.json()["code"]) == (403, "budget_exhausted")
    assert "retry-after" not in r.headers
    assert r.json()["detail"].startswith("query budget exceeded: batch of 4 would bring the "
                                         "count to 12 > budget 10 (2 left)")
    assert (r.json()["used"], r.json()["budget"], r.json()["remaining"]) == (8, 10, 2)
    assert store.get(key.id).used == 8 and store.audit_summary(key.id)["images"] == 8
    assert send(2).json()["remaining"] == 0
    assert send(1).status_code == 403


def test_rate_limit_refuses_with_retry_after_and_counts_nothing(model, store):
    key, secret = store.create_key(rate_limit=5, rate_window=3600)
    client = make(model, store)
    body = {"pixels": X[:3].tolist(), "dtype": "uint8"}
    assert client.post("/v1/predict", json=body, headers=auth(secret)).status_code == 200
    r = client.post("/v1/predict", json=body, headers=auth(secret))
    assert r.status_code == 429 and "rate limit: 3 of 5 images used" in r.json()["detail"]
    assert 1 <= int(r.headers["Retry-After"]) <= 3600
    r = client.post("/v1/predict", json={"pixels": X.tolist(), "dtype": "uint8"},
                    headers=auth(secret))  # 6 > 5: can never fit the window: 413 at once
    assert (r.status_code, r.json()["code"]) == (413, "batch_over_rate_limit")
    assert "send batches of at most 5" in r.json()["detail"] and "retry-after" not in r.headers
    assert store.get(key.id).used == 3


def test_rate_window_resets_and_budget_is_atomic_under_threads(store):
    key, _ = store.create_key(rate_limit=4, rate_window=10)
    h = ["0" * 64] * 3
    store.charge(key, h, now=100.0)
    with pytest.raises(RateLimited, match="retry in 10.00 s") as e:
        store.charge(key, h, now=100.0)
    assert e.value.retry_after == pytest.approx(10.0)
    assert store.charge(key, h, now=110.0).used == 6  # a new window
    # 8 threads x 10 charges of 3 images against a budget of 100: exactly 33 succeed
    key, _ = store.create_key(budget=100)
    ok, refused = [], []

    def spend():
        for _ in range(10):
            try:
                ok.append(store.charge(key, ["1" * 64] * 3).count)
            except QueryBudgetExceeded:
                refused.append(3)

    threads = [threading.Thread(target=spend) for _ in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sum(ok) == 99 and len(refused) == 80 - 33
    assert store.get(key.id).used == 99 and store.audit_summary(key.id)["images"] == 99


def test_counts_survive_a_restart(model, tmp_path):
    path = tmp_path / "keys.db"
    first = KeyStore(path)
    key, secret = first.create_key(budget=20)
    client = make(model, first)
    client.post("/v1/predict", json={"pixels": X.tolist(), "dtype": "uint8"}, headers=auth(secret))
    first.close()
    again = KeyStore(str(path))  # a new process would open the same file
    client = make(model, again)
    assert client.get("/v1/info", headers=auth(secret)).json()["used"] == 6
    r = client.post("/v1/predict", json={"pixels": X.tolist(), "dtype": "uint8"},
                    headers=auth(secret))
    assert r.json()["used"] == 12 and again.audit_summary(key.id)["requests"] == 2
    assert again.engine.connect().exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    again.close()


def test_keys_are_stored_hashed(store):
    key, secret = store.create_key(name="bob")
    db = Path(store.engine.url.database)
    raw = b"".join(p.read_bytes() for p in (db, Path(f"{db}-wal")) if p.exists())
    assert secret.encode() not in raw
    assert hashlib.sha256(secret.encode()).hexdigest().encode() in raw
    assert store.authenticate(secret).id == key.id
    with pytest.raises(AuthError, match="unknown API key"):
        store.authenticate(secret + "x")
    with pytest.raises(ConfigError, match="unknown output mode 'soft'"):
        store.create_key(output="soft")
    with pytest.raises(ConfigError, match="no key is called 'carol'"):
        store.resolve("carol")


def test_audit_log_records_each_image_hash(model, store):
    key, secret = store.create_key()
    client = make(model, store)
    for xb in (X[:2], X[2:], X[:2]):
        client.post("/v1/predict", json={"images": encode_png(xb)}, headers=auth(secret))
    summary = store.audit_summary(key.id)
    assert (summary["requests"], summary["images"], summary["distinct_images"]) == (3, 8, 6)
    rows = store.audit_rows(key.id)
    first = (X[0].float() / 255).numpy().tobytes()
    assert rows[-1]["image_sha256"][0] == hashlib.sha256(first).hexdigest()


# bad input: each a 4xx naming the problem; the server stays up; nothing counted -----------

def _img(size=8, mode="L"):
    return torch.randint(0, 256, (size, size) if mode == "L" else (size, size, 4),
                         dtype=torch.uint8).numpy()


BAD = [
    ("malformed JSON", b'{"pixels": [', 400, "malformed JSON"),
    ("not an object", b'[1, 2]', 422, "JSON object with `images` or `pixels`"),
    ("both kinds", json.dumps({"images": [], "pixels": []}), 422, "exactly one of"),
    ("unknown field", json.dumps({"pixels": [], "colour": 1}), 422, "colour"),
    ("no images", json.dumps({"images": []}), 422, "no images"),
    ("bad base64", json.dumps({"images": ["@@@"]}), 400, r"images\[0\] is not valid base64"),
    ("not an image", json.dumps({"images": [base64.b64encode(b"hello").decode()]}), 400,
     r"images\[0\] is not a PNG or JPEG image"),
    ("gif", json.dumps({"images": [png_b64(_img(), "GIF")]}), 415, "is GIF; send PNG or JPEG"),
    ("wrong size", json.dumps({"images": [png_b64(_img(28))]}), 422,
     "is 28x28 pixels; the model takes 8x8"),
    ("wrong channels", json.dumps({"images": [png_b64(_img(mode="RGBA"), mode="RGBA")]}), 422,
     r"has mode RGBA \(4 channels\); the model takes 1-channel"),
    ("truncated png", json.dumps({"images": [base64.b64encode(base64.b64decode(
        png_b64(_img()))[:60]).decode()]}), 400, "corrupt or truncated|not a PNG"),
    ("pixel shape", json.dumps({"pixels": torch.zeros(1, 3, 8, 8).tolist()}), 422,
     r"pixels\[0\] has more than 1 channels; the model takes \(B, 1, 8, 8\)"),
    ("ragged", json.dumps({"pixels": [[[[0.0] * 8] * 8], [[[0.0] * 7] * 8]]}), 422,
     r"pixels\[1\]\[0\]\[0\] has 7 values"),
    ("NaN", b'{"pixels": [[[' + b",".join([b"[" + b",".join([b"NaN"] * 8) + b"]"] * 8)
     + b"]]]}", 422, "NaN or infinite"),
    ("inf", b'{"pixels": [[[' + b",".join([b"[" + b",".join([b"1e999"] * 8) + b"]"] * 8)
     + b"]]]}", 422, "NaN or infinite"),
    ("out of range", json.dumps({"pixels": (torch.ones(1, 1, 8, 8) * 2).tolist()}), 422,
     r"must lie in \[0, 1\]"),
    ("uint8 fraction", json.dumps({"pixels": (torch.ones(1, 1, 8, 8) * .5).tolist(),
                                   "dtype": "uint8"}), 422, "integers in 0..255"),
    ("strings", json.dumps({"pixels": [[[["a"] * 8] * 8]]}), 422, "valid number"),
    ("too many images", json.dumps({"pixels": torch.zeros(5, 1, 8, 8).tolist()}), 413,
     "has more than 4 images; at most 4 per request"),
    ("body too large", json.dumps({"pixels": torch.zeros(4, 1, 8, 8).tolist(),
                                   "pad": "x" * 5000}), 413,
     r"request body is \d+ bytes; the limit is 5000"),
]


@pytest.mark.parametrize("name,body,status,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_refused_with_a_message(model, store, name, body, status, match):
    _, secret = store.create_key()
    client = make(model, store, limits=Limits(max_images=4, max_body_bytes=5000))
    r = client.post("/v1/predict", content=body, headers=json_auth(secret))
    assert r.status_code == status, r.text
    assert re.search(match, r.json()["detail"]), r.json()["detail"]
    ok = client.post("/v1/predict", json={"pixels": X[:1].tolist(), "dtype": "uint8"},
                     headers=auth(secret))
    assert ok.status_code == 200 and ok.json()["used"] == 1  # up, and nothing was counted


def test_streamed_body_over_the_limit_is_refused(model, store):
    _, secret = store.create_key()
    client = make(model, store, limits=Limits(max_body_bytes=1000))
    chunks = (b'{"pixels": [' + b" " * 600 for _ in range(3))  # chunked: no Content-Length
    r = client.post("/v1/predict", content=chunks, headers=json_auth(secret))
    assert r.status_code == 413 and "over the limit of 1000 bytes" in r.json()["detail"]


def test_a_failing_model_is_refunded(store):
    class Broken(torch.nn.Module):
        input_shape, num_classes = (1, 8, 8), 4

        def forward(self, x):
            raise RuntimeError("out of memory")

    key, secret = store.create_key(budget=5)
    client = TestClient(create_app(Broken(), store=store), raise_server_exceptions=False)
    r = client.post("/v1/predict", json={"pixels": X[:2].tolist(), "dtype": "uint8"},
                    headers=auth(secret))
    assert r.status_code == 500 and "nothing of this request was counted" in r.json()["detail"]
    assert store.get(key.id).used == 0 and store.audit_summary(key.id)["requests"] == 0


# the HTTP black box over the test client --------------------------------------------------

def test_http_black_box_splits_counts_and_refuses_like_the_local_one(model, store):
    key, secret = store.create_key(budget=10)
    client = make(model, store, limits=Limits(max_images=4))
    bb = HttpBlackBox("http://testserver", secret, client=client, encoding="png")
    assert (bb.input_shape, bb.num_classes, bb.budget, bb.queries_used) == ((1, 8, 8), 4, 10, 0)
    y = bb.query(X)  # 6 images: two requests of 4 and 2
    torch.testing.assert_close(y, LocalBlackBox(model).query(X), rtol=0, atol=1e-6)
    assert bb.queries_used == store.get(key.id).used == 6 and bb.remaining == 4
    with pytest.raises(QueryBudgetExceeded, match="batch of 6 would bring the count to 12"):
        bb.query(X)
    other = HttpBlackBox("http://testserver", secret, client=client)
    other.query(X[:3])
    bb.budget = None  # no local pre-check: the server refuses
    with pytest.raises(QueryBudgetExceeded, match="(1 left)"):
        bb.query(X[:2])
    assert bb.queries_used == 9  # learnt from the refusal
    _, limited = store.create_key(rate_limit=2, rate_window=3600)
    slow = HttpBlackBox("http://testserver", limited, client=client, max_rate_wait_s=0)
    slow.rate_limit = None  # as a client that does not split by the rate limit
    with pytest.raises(ServiceError, match="answered 413: a batch of 3 images can never fit") as e:
        slow.query(X[:3])  # never fits the window: at once, no retry
    assert e.value.status == 413 and not isinstance(e.value, RateLimited)
    slow.query(X[:2])
    with pytest.raises(RateLimited, match="rate limit: 2 of 2 images used") as e:
        slow.query(X[:1])  # fits later: 429, retried until max_rate_wait_s (0 here)
    assert e.value.retry_after > 0
    with pytest.raises(AuthError, match="unknown API key"):
        HttpBlackBox("http://testserver", "sg_wrong", client=client)


# the parts --------------------------------------------------------------------------------

def test_batcher_gathers_concurrent_requests_into_one_batch():
    seen = []

    def fn(x):
        seen.append(x.shape[0])
        time.sleep(0.05)
        return x.flatten(1).sum(1, keepdim=True)

    b = MicroBatcher(fn, max_batch=64, max_wait_s=0.2)
    futures = [b.submit(torch.full((n, 1, 2, 2), float(n))) for n in (1, 2, 3, 4)]
    outs = [f.result(5) for f in futures]
    assert seen == [10] and b.stats.batches == 1
    assert [o.flatten().tolist() for o in outs] == [[4.0], [8.0] * 2, [12.0] * 3, [16.0] * 4]
    big = b.submit(torch.zeros(100, 1, 2, 2)).result(5)  # larger than max_batch: alone
    assert big.shape == (100, 1) and seen[-1] == 100
    b.close()


def test_batcher_hands_a_failure_to_every_request_of_the_batch():
    def fn(x):
        time.sleep(0.02)
        raise ValueError("model broke")

    b = MicroBatcher(fn, max_batch=8, max_wait_s=0.1)
    futures = [b.submit(torch.zeros(2, 1, 2, 2)) for _ in range(3)]
    for f in futures:
        with pytest.raises(ValueError, match="model broke"):
            f.result(5)
    b.close()
    with pytest.raises(RuntimeError, match="closed"):
        b.submit(torch.zeros(1, 1, 2, 2))


def test_served_model_loaders_dispatch_on_the_manifest_format(model, tmp_path):
    path = save_classifier(tmp_path / "clf", model, dataset="quadrants", classes=list("abcd"))
    served = load_served_model(path)
    assert (served.format, served.input_shape, served.classes) == (
        "stealguard.classifier", (1, 8, 8), list("abcd"))
    torch.testing.assert_close(served.predict_proba(X.float() / 255),
                               LocalBlackBox(model).query(X))
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, "format": "acme.model"}))
    with pytest.raises(ArtifactError, match="format 'acme.model' cannot be served; servable "
                                            "formats: stealguard.classifier, stealguard.edm"):
        load_served_model(path)
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        load_served_model(tmp_path / "nothing")
    with pytest.raises(UnknownNameError):
        SERVED_FORMATS.get("acme.model")
    with pytest.raises(ConfigError, match="needs `input_shape`"):
        ServedModel.wrap(object())


def test_an_edm_bundle_is_served_without_showing_its_hash(model, store, tmp_path):
    from stealguard.ensemble import EDMPredictor, SHA1Hash, save_edm

    torch.manual_seed(1)
    members = [build_model("conv3", in_channels=1, image_size=8, num_classes=4) for _ in range(2)]
    edm = EDMPredictor(members, hash_fn=SHA1Hash())
    path = save_edm(tmp_path / "edm", edm, dataset="quadrants", classes=list("abcd"),
                    lambda_d=0.5, ood="random", hash_task="secret-task")
    served = load_served_model(path)
    assert served.format == "stealguard.edm"
    _, secret = store.create_key()
    client = make(served, store)
    r = client.post("/v1/predict", json={"pixels": X.tolist(), "dtype": "uint8"},
                    headers=auth(secret))
    torch.testing.assert_close(torch.tensor(r.json()["outputs"]), LocalBlackBox(edm).query(X),
                               rtol=0, atol=1e-6)
    info = client.get("/v1/info", headers=auth(secret)).text.lower()
    assert "sha1" not in info and "secret" not in info and "hash" not in info


def test_http_black_box_keeps_requests_under_the_body_limit(model):
    store = KeyStore("sqlite://")  # any SQLAlchemy URL; here an in-memory database
    key, secret = store.create_key()
    client = make(model, store, limits=Limits(max_body_bytes=20_000))
    bb = HttpBlackBox("http://testserver", secret, client=client)
    x = torch.rand(30, 1, 8, 8)
    torch.testing.assert_close(bb.query(x), LocalBlackBox(model).query(x), rtol=0, atol=1e-6)
    summary = store.audit_summary(key.id)
    assert summary["images"] == 30 and summary["requests"] == 3  # 12 float images fit in one
