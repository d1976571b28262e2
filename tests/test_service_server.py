"""The HTTP layer under the service (issue #15), on real sockets bound to 127.0.0.1: header
limits, the read timeout for slow and truncated bodies, the keep-alive timeout, a client
leaving mid-body logged once without a traceback, and SIGTERM under load answering every
charged request."""

from __future__ import annotations

import json
import logging
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings

import httpx
import pytest
import torch
import uvicorn

from stealguard.artifacts import save_classifier
from stealguard.models import build_model
from stealguard.service import KeyStore, create_app
from stealguard.service.server import ServerLimits, uvicorn_options
from synthetic import quadrant_images

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
X, _ = quadrant_images(2, seed=3)
BODY = json.dumps({"pixels": X.tolist(), "dtype": "uint8"}).encode()


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    return build_model("conv3", in_channels=1, image_size=8, num_classes=4).eval()


class Live:
    """The app under uvicorn with `uvicorn_options(limits)`, in a thread, on a free
    loopback port; log_config=None so that its records reach caplog."""

    def __init__(self, app, limits: ServerLimits) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(app, log_config=None, access_log=False, **uvicorn_options(limits))
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    def __enter__(self) -> Live:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()

    def connect(self) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        return s


def head(secret: str, length: int, extra: str = "") -> bytes:
    return (f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {secret}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {length}\r\n{extra}\r\n").encode()


def read_all(s: socket.socket, limit_s: float = 10.0) -> bytes:
    """What the server sends until it closes (or `limit_s` passes)."""
    s.settimeout(0.2)
    out, deadline = b"", time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            chunk = s.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            break
        if not chunk:
            break
        out += chunk
    return out


def wait_for(predicate, limit_s: float = 10.0) -> bool:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def service_records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith(("stealguard", "uvicorn"))
            and r.levelno >= logging.WARNING]


@pytest.mark.parametrize("how", ["trickled", "truncated"])
def test_a_slow_or_short_body_is_dropped_after_the_read_timeout(model, tmp_path, caplog, how):
    store = KeyStore(tmp_path / "s.db")
    key, secret = store.create_key()
    caplog.set_level(logging.WARNING)
    with Live(create_app(model, store=store), ServerLimits(read_timeout_s=1.0)) as srv:
        s = srv.connect()
        s.sendall(head(secret, len(BODY)) + BODY[:50])
        t0 = time.monotonic()
        answer = b""
        for i in range(30):  # 1 byte every 0.1 s, for at most 3 s
            if how == "trickled":
                try:
                    s.sendall(BODY[50 + i:51 + i])
                except OSError:  # the server has closed
                    break
            s.settimeout(0.1)
            try:
                answer += s.recv(65536)
            except TimeoutError:
                continue
            if answer:
                break
        answer += read_all(s, 3)
        waited = time.monotonic() - t0
        s.close()
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b'"code": "read_timeout"' in answer and waited < 2.9
        assert wait_for(lambda: store.refusals(reason="read_timeout"))
    row = store.refusals(reason="read_timeout")[0]
    assert row["key_id"] == key.id and row["client"].startswith("127.0.0.1:")
    got = re.search(rf"body not complete after 1 s \((\d+) of {len(BODY)} body bytes",
                    row["detail"])
    assert got and 50 <= int(got.group(1)) < len(BODY), row["detail"]
    records = service_records(caplog)
    assert len(records) == 1 and "dropped a request from 127.0.0.1" in records[0].getMessage()
    assert records[0].exc_info is None and store.get(key.id).used == 0


def test_a_client_leaving_mid_body_is_logged_once_without_a_traceback(model, tmp_path, caplog):
    store = KeyStore(tmp_path / "s.db")
    key, secret = store.create_key()
    caplog.set_level(logging.WARNING)
    with Live(create_app(model, store=store), ServerLimits()) as srv:
        s = srv.connect()
        s.sendall(head(secret, len(BODY)) + BODY[:100])
        time.sleep(0.3)
        s.close()
        assert wait_for(lambda: store.refusals(reason="client_disconnected"))
        time.sleep(0.3)  # anything else it would log
        assert httpx.post(f"http://127.0.0.1:{srv.port}/v1/predict", content=BODY, timeout=10,
                          headers={"Authorization": f"Bearer {secret}",
                                   "Content-Type": "application/json"}).status_code == 200
    records = service_records(caplog)
    assert len(records) == 1, [r.getMessage() for r in records]
    assert f"the client closed the connection after 100 of {len(BODY)} body bytes" in \
        records[0].getMessage()
    assert records[0].exc_info is None
    assert store.refusals()[0]["key_id"] == key.id and store.get(key.id).used == 2


def test_oversized_and_too_many_headers_are_refused_with_431(model, tmp_path, caplog):
    store = KeyStore(tmp_path / "s.db")
    _, secret = store.create_key()
    caplog.set_level(logging.WARNING)
    limits = ServerLimits(max_header_bytes=8192, max_headers=50)
    with Live(create_app(model, store=store), limits) as srv:
        for extra in (f"X-Pad: {'a' * 64 * 1024}\r\n",
                      "".join(f"X-H{i}: {i}\r\n" for i in range(60))):
            s = srv.connect()
            try:
                s.sendall(head(secret, len(BODY), extra) + BODY)
            except OSError:  # closed while we were still sending: the answer is there
                pass
            answer = read_all(s, 5)
            s.close()
            assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
            assert b'"code": "header_too_large"' in answer
        s = srv.connect()  # a normal request on the same server still works
        s.sendall(head(secret, len(BODY), "".join(f"X-H{i}: {i}\r\n" for i in range(40)))
                  + BODY)
        assert read_all(s, 3).startswith(b"HTTP/1.1 200")
    refused = [r.getMessage() for r in service_records(caplog)]
    assert len(refused) == 2 and "64 request headers; the limit is 50" in refused[1]
    assert "bytes of request line and headers" in refused[0]
    assert all(r.exc_info is None for r in service_records(caplog))


def test_idle_connections_are_closed_by_the_keep_alive_and_read_timeouts(model, tmp_path):
    store = KeyStore(tmp_path / "s.db")
    _, secret = store.create_key()
    with Live(create_app(model, store=store),
              ServerLimits(keep_alive_s=0.5, read_timeout_s=1.0)) as srv:
        s = srv.connect()
        s.sendall(head(secret, len(BODY)) + BODY)
        s.settimeout(5)
        first = s.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        t0 = time.monotonic()
        rest = read_all(s, 4)  # idle after the answer: closed after ~0.5 s
        assert time.monotonic() - t0 < 3 and b"HTTP/1.1" not in rest
        s.close()
        s = srv.connect()  # opened, nothing sent: closed after the read timeout, silently
        t0 = time.monotonic()
        assert read_all(s, 4) == b"" and time.monotonic() - t0 < 3.5
        s.close()


def test_serve_passes_its_limits_to_uvicorn(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from stealguard.service.cli import standalone_app
    from stealguard.service.server import GuardedH11Protocol

    torch.manual_seed(0)
    art = save_classifier(tmp_path / "m", build_model("conv3", in_channels=1, image_size=8,
                                                      num_classes=4), dataset="q",
                          classes=list("abcd"))
    started: dict = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.update(app=app, **kw))
    r = CliRunner().invoke(standalone_app(), [
        "serve", str(art), "--store", str(tmp_path / "k.db"), "--max-header-bytes", "4096",
        "--max-headers", "20", "--read-timeout", "7", "--keep-alive", "2",
        "--graceful-timeout", "9", "--limit-concurrency", "50", "--metrics"])
    assert r.exit_code == 0, r.output
    assert issubclass(started["http"], GuardedH11Protocol)
    assert started["http"].limits == ServerLimits(4096, 20, 7.0, 2.0, 9.0, 50)
    assert (started["h11_max_incomplete_event_size"], started["timeout_keep_alive"],
            started["timeout_graceful_shutdown"], started["limit_concurrency"]) == (4096, 2, 9, 50)
    assert any(getattr(rt, "path", "") == "/metrics" for rt in started["app"].routes)
    defaults = uvicorn_options(ServerLimits())
    assert defaults["h11_max_incomplete_event_size"] == 16 * 1024
    assert (defaults["timeout_keep_alive"], defaults["timeout_graceful_shutdown"]) == (5, 30)


@pytest.mark.slow  # a real `serve` process: about 12 s on a busy 2-core machine
def test_sigterm_under_load_answers_every_charged_request(tmp_path):
    """A real `serve` process, 12 clients posting back to back, SIGTERM mid-load: the server
    stops accepting, answers what it has charged, exits 0; every image it counted was
    answered and the audit chain is intact."""
    torch.manual_seed(0)
    art = save_classifier(tmp_path / "m", build_model("conv3", in_channels=1, image_size=8,
                                                      num_classes=4), dataset="q",
                          classes=list("abcd"))
    db = tmp_path / "k.db"
    store = KeyStore(db)
    key, secret = store.create_key()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "stealguard.service", "serve", str(art),
                             "--store", str(db), "--port", str(port), "--threads", "1",
                             "--max-wait-ms", "100", "--graceful-timeout", "20"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_for(lambda: _healthy(url), 60), (tmp_path / "server.log").read_text()
        answered, stop = [], threading.Event()

        def client() -> None:
            with httpx.Client(timeout=30) as http:
                for _ in range(500):  # bounded; ends when the server is gone
                    try:
                        r = http.post(f"{url}/v1/predict", content=BODY, headers={
                            "Authorization": f"Bearer {secret}",
                            "Content-Type": "application/json"})
                    except httpx.TransportError:
                        if stop.is_set():
                            return
                        continue
                    if r.status_code == 200:
                        answered.append(len(r.json()["outputs"]))

        threads = [threading.Thread(target=client) for _ in range(12)]
        [t.start() for t in threads]
        assert wait_for(lambda: len(answered) >= 24, 30)
        stop.set()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, (tmp_path / "server.log").read_text()
        [t.join(30) for t in threads]
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    used = store.get(key.id).used
    assert used == sum(answered) and used > 0  # 0 counted but unanswered
    assert store.verify_audit().ok and store.audit_summary(key.id)["images"] == used
    assert "Traceback" not in (tmp_path / "server.log").read_text()


def _healthy(url: str) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return httpx.get(url + "/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False
