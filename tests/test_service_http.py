"""The service on a real uvicorn server (a thread, a free 127.0.0.1 port): an attack over
HTTP gets the local black box's answers and counts, concurrent clients are counted exactly,
and the counts survive a restart on the same SQLite file."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import torch
import uvicorn

from stealguard.attacks import KnockoffNets
from stealguard.blackbox import LocalBlackBox
from stealguard.errors import QueryBudgetExceeded
from stealguard.metrics import clone_metrics
from stealguard.models import build_model
from stealguard.service import HttpBlackBox, KeyStore, create_app
from stealguard.training import TrainConfig, train
from synthetic import quadrant_dataset, quadrant_images

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny models: one intra-op thread is faster than two on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class LiveServer:
    """uvicorn serving `app` in a thread on a socket bound to a free loopback port."""

    def __init__(self, app) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    def __enter__(self):
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


@pytest.fixture(scope="module")
def victim():
    x, y = quadrant_images(256, seed=1)
    torch.manual_seed(0)
    model = build_model("conv3", in_channels=1, image_size=8, num_classes=4)
    train(model, x, y, config=TrainConfig(epochs=2, batch_size=32, lr=0.05), progress=False)
    return model.eval()


def test_knockoff_over_http_gets_the_local_answers_and_counts(victim, tmp_path):
    store = KeyStore(tmp_path / "service.db")
    key, secret = store.create_key(budget=300)
    surrogate = quadrant_dataset(400, seed=5)

    def attack():
        return KnockoffNets(surrogate, labels="soft", arch="conv3", query_batch=100,
                            clone=TrainConfig(epochs=1, batch_size=32, lr=0.05))

    local = attack()(LocalBlackBox(victim, budget=300), 300)
    with LiveServer(create_app(victim, store=store)) as srv, HttpBlackBox(srv.url, secret) as bb:
        remote = attack()(bb, 300)
    assert remote.queries == local.queries == 300 == bb.queries_used == store.get(key.id).used
    assert store.audit_summary(key.id)["images"] == 300
    assert torch.equal(remote.transfer_x, local.transfer_x)
    torch.testing.assert_close(remote.transfer_y, local.transfer_y, rtol=0, atol=1e-6)
    xt, yt = quadrant_images(256, seed=2)
    acc = [clone_metrics(r.clone, victim, xt, yt)["clone_accuracy"] for r in (local, remote)]
    assert acc[0] == pytest.approx(acc[1], abs=1e-9)


def test_concurrent_clients_are_counted_exactly_and_never_overspend(victim, tmp_path):
    store = KeyStore(tmp_path / "service.db")
    free, free_secret = store.create_key()
    capped, capped_secret = store.create_key(budget=100)
    x, _ = quadrant_images(7, seed=4)
    answered, refused = [], []

    def client(secret: str) -> None:
        with HttpBlackBox(srv.url, secret) as bb:
            bb.budget = None  # leave the budget to the server, as racing replicas would
            for _ in range(5):
                try:
                    answered.append((secret, bb.query(x).shape[0]))
                except QueryBudgetExceeded:
                    refused.append(secret)

    with LiveServer(create_app(victim, store=store)) as srv:
        threads = [threading.Thread(target=client, args=(s,))
                   for s in [free_secret] * 6 + [capped_secret] * 6]
        [t.start() for t in threads]
        [t.join(60) for t in threads]
    assert sum(n for s, n in answered if s == free_secret) == 6 * 5 * 7 == store.get(free.id).used
    capped_answered = sum(n for s, n in answered if s == capped_secret)
    assert capped_answered == 98 == store.get(capped.id).used  # 14 batches of 7 fit in 100
    assert len(refused) == 30 - 14
    assert store.audit_summary(capped.id)["images"] == 98


def test_counts_survive_a_server_restart(victim, tmp_path):
    path = tmp_path / "service.db"
    key, secret = KeyStore(path).create_key(budget=20)
    x, _ = quadrant_images(6, seed=6)
    with LiveServer(create_app(victim, store=path)) as srv, HttpBlackBox(srv.url, secret) as bb:
        first = bb.query(x)
    with LiveServer(create_app(victim, store=str(path))) as srv, HttpBlackBox(srv.url, secret) as bb:
        assert (bb.queries_used, bb.remaining) == (6, 14)
        torch.testing.assert_close(bb.query(x), first, rtol=0, atol=0)
        assert bb.queries_used == 12
    assert KeyStore(path).audit_summary(key.id)["requests"] == 2


def test_cli_attack_steals_over_http(tmp_path):
    """`stealguard attack knockoff --target URL --api-key K`: the same attack code over HTTP,
    counted by the server exactly as the attack reports."""
    import json

    from typer.testing import CliRunner

    from stealguard.artifacts import save_classifier
    from stealguard.cli import app

    torch.manual_seed(0)
    model = build_model("conv3", in_channels=1, image_size=28, num_classes=10).eval()
    art = save_classifier(tmp_path / "victim", model, dataset="mnist",
                          classes=[str(i) for i in range(10)])
    store = KeyStore(tmp_path / "service.db")
    key, secret = store.create_key(budget=1000)
    with LiveServer(create_app(model, store=store)) as srv:
        r = CliRunner().invoke(app, [
            "attack", "knockoff", "--victim", str(art), "--target", srv.url, "--api-key", secret,
            "--surrogate", "fashionmnist", "--budget", "200", "--epochs", "1", "--device", "cpu",
            "--json"])
    assert r.exit_code == 0, r.output
    figures = json.loads(r.output.strip().splitlines()[-1])
    assert figures["queries"] == figures["blackbox_count"] == 200 == store.get(key.id).used
