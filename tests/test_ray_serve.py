"""The service on Ray Serve (issue #9): the same answers as the single-process service for the
same images and key, exact accounting under concurrent load, the same errors, and a clear
error where Ray is missing.

One small local Ray (2 CPUs) and one Serve application for the whole file: an EDM bundle
deployed through `serve --engine ray` (2 members, a router, 2 ingress replicas sharing one
SQLite store, random_noise with a key file). Tests that need Ray are marked `ray` and skipped
where it is not installed; the router's code (EDM, and a classifier as one member with MAD)
is also checked in this process with stand-in handles, without Ray."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
from typer.testing import CliRunner

from stealguard.artifacts import save_classifier
from stealguard.blackbox import LocalBlackBox
from stealguard.defenses import build_defense
from stealguard.errors import ArtifactError, ConfigError, QueryBudgetExceeded
from stealguard.models import build_model
from stealguard.service import HttpBlackBox, KeyStore, create_app, load_served_model, ray_serve
from stealguard.service.cli import standalone_app
from synthetic import quadrant_images

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
NOISE = {"epsilon": "0.5"}  # random_noise on the EDM app (keyed: the key file must travel)
MAD = {"epsilon": "0.5"}  # MAD on a classifier (its surrogate is built like the victim)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny models: one thread each; and a replica built in this process (MemberModel,
    Router: they set torch's thread count) must not change it for the tests after these."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclass
class Deployed:
    url: str  # the EDM app
    bundle: Path
    classifier: Path
    key: bytes
    store: KeyStore


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _edm_bundle(out: Path) -> Path:
    from stealguard.ensemble import DNNHash, EDMPredictor, save_edm

    torch.manual_seed(0)
    members = [build_model("conv3", in_channels=1, image_size=8, num_classes=4)
               for _ in range(2)]
    hash_net = build_model("conv3", in_channels=1, image_size=8, num_classes=6)
    with torch.no_grad():
        hash_net.classifier.weight.mul_(50.0)  # confident: the images spread over members
    edm = EDMPredictor(members, hash_fn=DNNHash(hash_net, subclasses=3))
    return save_edm(out, edm, dataset="quadrants", classes=list("abcd"), lambda_d=0.5,
                    ood="noise", hash_task="secret-glyphs")


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory):
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.serve")
    from ray import serve

    tmp = tmp_path_factory.mktemp("ray-serve")
    bundle = _edm_bundle(tmp / "edm")
    torch.manual_seed(1)
    clf = save_classifier(tmp / "clf", build_model("conv3", in_channels=1, image_size=8,
                                                   num_classes=4), dataset="quadrants",
                          classes=list("abcd"))
    key = b"k" * 32
    (tmp / "defense.key").write_bytes(key)
    store, port = tmp / "keys.db", _free_port()
    keys = KeyStore(store)  # the tables exist before two deployments open the store at once
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with pytest.MonkeyPatch.context() as mp:  # deploy, print, and return instead of waiting
            mp.setattr(ray_serve, "block_until_interrupted", lambda app_name: None)
            r = CliRunner().invoke(standalone_app(), [
                "serve", str(bundle), "--engine", "ray", "--port", str(port), "--store",
                str(store), "--defense", "random_noise", "-p", "epsilon=0.5",
                "--defense-key-file", str(tmp / "defense.key"), "--ingress-replicas", "2",
                "--num-cpus-per-replica", "0.25", "--max-images", "16"])
        assert r.exit_code == 0, r.output
        assert f"on Ray Serve at http://127.0.0.1:{port}: 2 member deployment(s)" in r.output
        yield Deployed(f"http://127.0.0.1:{port}", bundle, clf, key, keys)
    finally:
        serve.shutdown()
        ray.shutdown()


def _local_service(artifact: Path, defense: str, params: dict, key: bytes | None,
                   store: KeyStore) -> TestClient:
    """The single-process service, as `serve --engine local` builds it."""
    served = load_served_model(artifact)
    dfn = build_defense(defense, params, victim=served.model, key=key)
    return TestClient(create_app(served, defense=dfn, store=store))


# answers -----------------------------------------------------------------------------------

@pytest.mark.ray
def test_edm_answers_equal_the_single_process_service(deployed, tmp_path):
    edm = load_served_model(deployed.bundle).model
    x, _ = quadrant_images(32, seed=3)
    idx = edm.member_index(x.float() / 255)
    assert set(idx.tolist()) == {0, 1}  # both members answer, so the rows must be reassembled
    local_store = KeyStore(tmp_path / "local.db")
    _, local_secret = local_store.create_key()
    local = _local_service(deployed.bundle, "random_noise", NOISE, deployed.key, local_store)
    key, secret = deployed.store.create_key()
    with HttpBlackBox(deployed.url, secret) as bb, \
            HttpBlackBox("http://testserver", local_secret, client=local) as lbb:
        remote, expected = bb.query(x), lbb.query(x)
        one_by_one = torch.cat([bb.query(x[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(remote, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(one_by_one, expected[:4], rtol=0, atol=1e-6)
    plain = LocalBlackBox(edm).query(x)  # the routed members without the defense
    assert (remote - plain).abs().max() > 1e-3  # the keyed noise was applied, with our key
    assert bb.queries_used == 36 == deployed.store.get(key.id).used
    assert deployed.store.audit_summary(key.id)["images"] == 36


class LocalHandle:
    """A member deployment's handle, in this process: `remote(x)` is awaitable."""

    def __init__(self, member: ray_serve.MemberModel) -> None:
        self.member, self.calls = member, list[int]()

    def remote(self, x: torch.Tensor):
        self.calls.append(x.shape[0])

        async def answer() -> torch.Tensor:
            return self.member(x)
        return answer()


@pytest.mark.parametrize(("kind", "defense", "params", "key"), [
    ("edm", "random_noise", NOISE, b"k" * 32), ("classifier", "mad", MAD, None)])
def test_the_router_answers_as_the_single_process_service(tmp_path, kind, defense, params, key):
    """The router's code without Ray: an EDM bundle, and a classifier as one member behind the
    router with MAD (its surrogate built from the manifest, not from the loaded victim)."""
    torch.manual_seed(1)
    artifact = _edm_bundle(tmp_path / "edm") if kind == "edm" else save_classifier(
        tmp_path / "clf", build_model("conv3", in_channels=1, image_size=8, num_classes=4),
        dataset="quadrants", classes=list("abcd"))
    n = ray_serve.describe_artifact(artifact).members
    handles = [LocalHandle(ray_serve.MemberModel(str(artifact), i, threads=1)) for i in range(n)]
    router = ray_serve.Router(str(artifact), handles,
                              ray_serve.DefenseConfig(name=defense, params=params, key=key), threads=1)
    store = KeyStore(tmp_path / "local.db")
    _, secret = store.create_key()
    x, _ = quadrant_images(32, seed=3)
    with HttpBlackBox("http://testserver", secret, client=_local_service(
            artifact, defense, params, key, store)) as local:
        expected = local.query(x)
    routed = asyncio.run(router(x.float() / 255))
    torch.testing.assert_close(routed, expected, rtol=0, atol=1e-6)
    assert sum(h.calls[0] for h in handles) == 32 and all(len(h.calls) == 1 for h in handles)
    plain = LocalBlackBox(load_served_model(artifact).model).query(x)
    assert (routed - plain).abs().max() > 1e-3  # the defense ran, after routing


# accounting --------------------------------------------------------------------------------

@pytest.mark.ray
def test_concurrent_load_is_counted_exactly_and_never_overspends(deployed):
    store = deployed.store
    free, free_secret = store.create_key()
    capped, capped_secret = store.create_key(budget=100)
    x, _ = quadrant_images(7, seed=4)
    answered, refused, lock = [], [], threading.Lock()

    def client(secret: str) -> None:
        with HttpBlackBox(deployed.url, secret) as bb:
            bb.budget = None  # leave the budget to the server, as racing replicas would
            for _ in range(5):
                try:
                    n = bb.query(x).shape[0]
                    with lock:
                        answered.append((secret, n))
                except QueryBudgetExceeded:
                    with lock:
                        refused.append(secret)

    threads = [threading.Thread(target=client, args=(s,))
               for s in [free_secret] * 4 + [capped_secret] * 4]
    [t.start() for t in threads]
    [t.join(120) for t in threads]
    assert not any(t.is_alive() for t in threads)
    assert sum(n for s, n in answered if s == free_secret) == 4 * 5 * 7 == store.get(free.id).used
    assert sum(n for s, n in answered if s == capped_secret) == 98 == store.get(capped.id).used
    assert len(refused) == 20 - 14 and set(refused) == {capped_secret}
    r = httpx.post(f"{deployed.url}/v1/predict", json={"pixels": x.tolist(), "dtype": "uint8"},
                   headers={"X-API-Key": capped_secret}, timeout=30)
    assert (r.status_code, r.json()["code"], r.json()["budget"]) == (403, "budget_exhausted", 100)
    summary = store.audit_summary(capped.id)
    assert (summary["requests"], summary["images"], store.get(capped.id).used) == (14, 98, 98)


# the same front ----------------------------------------------------------------------------

@pytest.mark.ray
def test_keys_errors_and_info_are_the_single_process_services(deployed):
    key, secret = deployed.store.create_key(output="topk", k=2)
    url, auth = deployed.url, {"Authorization": f"Bearer {secret}"}
    x, _ = quadrant_images(3, seed=6)
    body = {"pixels": x.tolist(), "dtype": "uint8"}
    assert httpx.post(f"{url}/v1/predict", json=body, timeout=30).status_code == 401
    bad = httpx.post(f"{url}/v1/predict", json={"pixels": [[[[0.5]]]]}, headers=auth, timeout=30)
    assert bad.status_code == 422 and "detail" in bad.json()
    many = httpx.post(f"{url}/v1/predict", json={"pixels": [x[0].tolist()] * 17,
                                                "dtype": "uint8"}, headers=auth, timeout=30)
    assert many.status_code == 413  # --max-images 16 reached the ingress
    ok = httpx.post(f"{url}/v1/predict", json=body, headers=auth, timeout=30).json()
    assert ok["output"] == "topk" and all(sum(v > 0 for v in row) <= 2 for row in ok["outputs"])
    assert deployed.store.get(key.id).used == 3  # the refused requests counted nothing
    info = httpx.get(f"{url}/v1/info", headers=auth, timeout=30)
    assert info.json()["classes"] == list("abcd") and info.json()["max_images_per_request"] == 16
    text = info.text.lower()
    assert "hash" not in text and "secret" not in text and "noise" not in text
    assert httpx.get(f"{url}/healthz", timeout=30).json() == {"status": "ok"}
    deployed.store.revoke(key.id)
    assert httpx.post(f"{url}/v1/predict", json=body, headers=auth, timeout=30).status_code == 403


@pytest.mark.ray
def test_bad_deployments_are_refused_before_ray_runs_them(deployed, tmp_path):
    def deploy(artifact=deployed.bundle, **kw):
        return ray_serve.deploy(artifact, port=_free_port(), **{"store": tmp_path / "k.db", **kw})

    with pytest.raises(ConfigError, match="in-memory key store cannot be shared"):
        deploy(store="sqlite://")
    with pytest.raises(ConfigError, match="epsilon"):
        deploy(defense=ray_serve.DefenseConfig(name="mad", params={"epsilon": "-1"}))
    with pytest.raises(ConfigError, match=r"need 4 CPUs \(1 per replica\) and this Ray has 2"):
        deploy(options=ray_serve.RayOptions(num_cpus=1.0, app_name="too-big"))
    manifest = json.loads((deployed.classifier / "manifest.json").read_text())
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({**manifest, "format": "acme.model"}))
    with pytest.raises(ArtifactError, match="format 'acme.model' cannot be served; servable formats"):
        deploy(other)
    from ray import serve

    assert set(serve.status().applications) == {"stealguard"}  # nothing more was deployed


# without Ray -------------------------------------------------------------------------------

def test_options_are_checked_and_a_missing_ray_is_named(tmp_path):
    with pytest.raises(ConfigError, match="member_replicas must be >= 1"):
        ray_serve.RayOptions(member_replicas=0)
    with pytest.raises(ConfigError, match="num_cpus must be > 0"):
        ray_serve.RayOptions(num_cpus=0)
    app = standalone_app()
    r = CliRunner().invoke(app, ["serve", str(tmp_path), "--engine", "spark"])
    assert isinstance(r.exception, ConfigError) and "unknown engine 'spark'" in str(r.exception)
    r = CliRunner().invoke(app, ["serve", str(tmp_path), "--engine", "ray", "--device", "cuda"])
    assert isinstance(r.exception, ConfigError) and "--num-gpus-per-member" in str(r.exception)
    # a fresh interpreter where `import ray` fails: the modules load, --engine ray says what to do
    code = ("import sys; sys.modules['ray'] = None\n"
            "import stealguard.service.ray_serve\n"
            "from typer.testing import CliRunner\n"
            "from stealguard.service.cli import standalone_app\n"
            "r = CliRunner().invoke(standalone_app(), ['serve', sys.argv[1], '--engine', 'ray'])\n"
            "print(type(r.exception).__name__, r.exception)\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    assert out.startswith("ConfigError") and "pip install stealguard[ray]" in out, out
