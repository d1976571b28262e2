"""Stealing detectors (stealguard.detect): PRADA's statistic by hand, synthetic attack and
benign streams, state across a restart, and what a client sees under each policy."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy import stats

from stealguard.blackbox import LocalBlackBox
from stealguard.detect import (
    DetectionRefusal,
    DetectorStore,
    Prada,
    PradaParams,
    build_detector,
    build_monitor,
    ks_statistic,
    parse_detector_args,
    shapiro_w,
)
from stealguard.detect.prada import threshold_update
from stealguard.errors import ConfigError, UnknownNameError
from stealguard.models import build_model
from stealguard.service import KeyStore, create_app
from synthetic import quadrant_images

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
SHIFT = {"window": "50", "test_every": "10", "horizon": "1000", "reference_size": "400",
         "simulations": "100"}


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


def pixels(rows: list[list[int]]) -> torch.Tensor:
    """Integer pixel rows -> (B, 1, 1, D) images in [0, 1] that quantize back exactly."""
    return torch.tensor(rows, dtype=torch.float32)[:, None, None, :] / 255


def one_class(n: int) -> torch.Tensor:
    return torch.zeros(n, 3).index_fill_(1, torch.tensor([0]), 1.0)  # (n, 3) logits, class 0


# PRADA ------------------------------------------------------------------------------------

def test_prada_growing_set_and_distances_by_hand():
    """Five queries of class 0 (pixel units):
    q1 (0,0): G = {q1}, D_G = {0}, T = 0
    q2 (3,0): d = 3 > 0 -> added; D_G = {0, 3}: mean 1.5 - std 1.5 = 0, T = 0
    q3 (3,4): d = min(5, 4) = 4 -> added; D_G = {0, 3, 4}: 7/3 - sqrt(26/9) = 0.6336
    q4 (3,1): d = min(sqrt 10, 1, 3) = 1 > 0.6336 -> added; 2 - sqrt(2.5) < T, T stays
    q5 (3,1): d = 0 -> not added.  D = {3, 4, 1, 0}"""
    det = Prada(PradaParams(test_every=1000))
    s = det.new_state()
    det.update(s, pixels([[0, 0], [3, 0], [3, 4], [3, 1], [3, 1]]), one_class(5))
    assert s.sets[0].tolist() == [[0, 0], [3, 0], [3, 4], [3, 1]]
    assert s.dists[0] == pytest.approx([3, 4, 1, 0])
    assert s.set_dists[0] == pytest.approx([0, 3, 4, 1])
    assert s.thresholds[0] == pytest.approx(7 / 3 - np.sqrt(26 / 9), abs=1e-9)
    assert threshold_update([0, 3, 4, 1]) == pytest.approx(2 - np.sqrt(2.5))


def test_prada_shapiro_w_by_hand():
    """W for {0, 1, 3, 4}: Shapiro-Wilk coefficients for n = 4 are a = (0.6872, 0.1677), so
    W = (0.6872 * (4 - 0) + 0.1677 * (3 - 1))^2 / sum (x - 2)^2 = 3.0842^2 / 10 = 0.9512.
    One far outlier (> 3 std from the mean) is dropped before the test."""
    w = shapiro_w({0: [3.0, 4.0, 1.0, 0.0]}, min_class=1, min_total=3)
    assert w == pytest.approx(0.9512, abs=2e-3)
    with_outlier = {0: [2.0] * 20 + [3.0, 4.0, 1.0, 0.0] * 5 + [1000.0]}
    assert shapiro_w(with_outlier, min_class=1, min_total=3) == pytest.approx(
        stats.shapiro([2.0] * 20 + [3.0, 4.0, 1.0, 0.0] * 5).statistic)
    assert shapiro_w({0: [1.0] * 50}, min_class=1, min_total=3) == 0.0  # one distance: W = 0
    assert shapiro_w({0: [1.0, 2.0]}, min_class=1) is None  # too few to test
    assert shapiro_w({0: [1.0] * 200, 1: [2.0] * 5}, min_class=10, min_total=3) == 0.0


def jbda_like(n_seed: int, rounds: int, *, seed: int = 0) -> torch.Tensor:
    """Papernot-style stream: seed images, then each round every image moved by 0.2 *
    a sign vector (the sets double), as JBDA's queries."""
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(n_seed, 1, 8, 8, generator=g)
    out = [s]
    for _ in range(rounds):
        step = torch.randint(0, 2, s.shape, generator=g).float() * 2 - 1
        new = (s + 0.2 * step).clamp(0, 1)
        out.append(new)
        s = torch.cat([s, new])
    return torch.cat(out)


def first_alarm(monitor, key, x, batch=50):
    for xb in x.split(batch):
        monitor.observe(key, xb)
    return monitor.alarms(key)


def test_prada_flags_a_synthetic_stream_not_a_natural_one(model):
    m = build_monitor([("prada", {})], model=model)
    attack = jbda_like(20, 5)  # 20 * 2^5 = 640 queries
    benign = torch.rand(640, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    assert "prada" in first_alarm(m, "attacker", attack)
    assert first_alarm(m, "benign", benign) == {}
    s = m.state("benign", "prada")
    assert s.tests > 40 and s.tests_alarmed == 0 and s.statistic > 0.95
    assert sum(len(g) for g in m.state("attacker", "prada").sets.values()) <= 4 * 1000


def test_prada_memory_is_bounded():
    det = Prada(PradaParams(max_set=5, max_distances=20))
    s = det.new_state()
    det.update(s, torch.rand(200, 1, 4, 4), one_class(200))
    assert len(s.sets[0]) == 5 and len(s.dists[0]) == 20 and s.seen == 200


# the shift detector -----------------------------------------------------------------------

def test_ks_statistic_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(50):
        a = rng.integers(0, 4, size=int(rng.integers(1, 30))).astype(float)
        b = np.sort(rng.integers(0, 4, size=int(rng.integers(1, 30))).astype(float))
        assert ks_statistic(a, b) == pytest.approx(stats.ks_2samp(a, b).statistic, abs=1e-12)


@pytest.mark.parametrize("score", ["energy", "msp"])
def test_shift_flags_other_images_not_in_distribution_ones(model, score):
    ref, _ = quadrant_images(400, seed=10)
    m = build_monitor([("shift", {**SHIFT, "score": score})], model=model, reference=ref)
    benign = quadrant_images(1000, seed=11)[0].float() / 255
    other = 1 - benign[:300]  # negatives: another distribution of the same shapes
    alarms = first_alarm(m, "attacker", other)
    assert alarms["shift"] <= 100  # the first tests after `window` queries
    assert first_alarm(m, "benign", benign) == {}
    assert m.state("benign", "shift").tests == (1000 - 50) // 10 + 1


# building from names ----------------------------------------------------------------------

def test_unknown_names_and_params_list_the_valid_ones(model):
    with pytest.raises(UnknownNameError, match="valid detector names: prada, shift"):
        build_detector("prado")
    with pytest.raises(ConfigError, match=r"unknown parameter 'delt'; valid parameters: delta"):
        build_detector("prada", {"delt": "0.9"})
    with pytest.raises(ConfigError, match=r"delta='2' is invalid"):
        build_detector("prada", {"delta": "2"})
    with pytest.raises(UnknownNameError, match="valid detection policy names: flag, lock"):
        build_monitor([("prada", {})], model=model, policy="ban")
    with pytest.raises(ConfigError, match="needs the victim and held-out"):
        build_monitor([("shift", {})], model=model)
    with pytest.raises(ConfigError, match="say which detector"):
        parse_detector_args(["prada", "shift"], ["delta=0.9"])
    assert parse_detector_args(["prada", "shift"], ["prada.delta=0.9", "shift.alpha=0.05"]) == [
        ("prada", {"delta": "0.9"}), ("shift", {"alpha": "0.05"})]


# state, policies, what a client sees ------------------------------------------------------

def test_state_and_flags_survive_a_restart(model, tmp_path):
    db = tmp_path / "service.db"
    m = build_monitor([("prada", {})], model=model, store=db, policy="lock")
    attack = jbda_like(20, 5)
    m.observe("k1", attack[:100])
    m.observe("k2", attack)
    before = m.state("k1", "prada")
    m.close()
    m2 = build_monitor([("prada", {})], model=model, store=db, policy="lock")
    after = m2.state("k1", "prada")
    assert after.seen == before.seen == 100
    assert {c: g.tolist() for c, g in after.sets.items()} == {
        c: g.tolist() for c, g in before.sets.items()}
    assert after.dists == before.dists and after.thresholds == before.thresholds
    assert m2.flagged("k2") and not m2.flagged("k1")
    with pytest.raises(DetectionRefusal, match="k2 is locked"):
        m2.admit("k2", 1)
    m2.admit("k1", 1)
    (alarm,) = DetectorStore(db).alarms("k2")
    assert alarm["detector"] == "prada" and alarm["queries"] == m2.alarms("k2")["prada"]
    # other params: the old state is not reused, the flag (an alarm row) stays
    m3 = build_monitor([("prada", {"delta": "0.5"})], model=model, store=db)
    assert m3.state("k1", "prada").seen == 0 and m3.flagged("k2")


def test_local_black_box_answers_unchanged_and_lock_refuses(model):
    attack = jbda_like(20, 5)
    plain = LocalBlackBox(model)
    m = build_monitor([("prada", {})], model=model, policy="lock")
    watched = LocalBlackBox(model, monitor=m, client="eve")
    answers = []
    with pytest.raises(DetectionRefusal, match="eve is locked") as e:
        for xb in attack.split(32):
            answers.append(watched.query(xb))
    assert e.value.status == 403
    n = sum(len(a) for a in answers)
    assert watched.queries_used == n and m.alarms("eve")["prada"] <= n
    torch.testing.assert_close(torch.cat(answers), plain.query(attack[:n]), rtol=0, atol=0)


def _service(model, tmp_path, policy, **params):
    store = KeyStore(tmp_path / "service.db")
    monitor = build_monitor([("prada", {})], model=model, store=store.engine, policy=policy,
                            policy_params=params, persist_every_s=0)
    return store, monitor, TestClient(create_app(model, store=store, monitor=monitor))


def _post(client, secret, x):
    return client.post("/v1/predict", json={"pixels": x.tolist(), "dtype": "uint8"},
                       headers={"X-API-Key": secret})


def _u8(x):
    return (x * 255).round().to(torch.uint8)


def test_service_flag_is_invisible_and_recorded(model, tmp_path):
    store, monitor, client = _service(model, tmp_path, "flag")
    _, eve = store.create_key(name="eve")
    _, bob = store.create_key(name="bob")
    for xb in _u8(jbda_like(20, 5)).split(64):
        assert _post(client, eve, xb).status_code == 200
    eve_id = store.resolve("eve").id
    assert monitor.flagged(eve_id) and not monitor.flagged(store.resolve("bob").id)
    probe, _ = quadrant_images(5, seed=9)
    a, b = _post(client, eve, probe), _post(client, bob, probe)
    strip = [("used", "remaining", "request_id")]
    ja, jb = a.json(), b.json()
    for k in strip[0]:
        ja.pop(k), jb.pop(k)
    assert ja == jb  # the outputs and every other field
    assert a.content.split(b'"used"')[0] == b.content.split(b'"used"')[0]  # byte for byte
    assert set(a.headers) == set(b.headers)
    (alarm,) = DetectorStore(store.engine).alarms(eve_id)
    assert alarm["detector"] == "prada" and "Shapiro-Wilk W" in alarm["detail"]


def test_service_lock_403_and_throttle_429(model, tmp_path):
    store, monitor, client = _service(model, tmp_path, "lock")
    _, eve = store.create_key(name="eve")
    codes = [_post(client, eve, xb).status_code for xb in _u8(jbda_like(20, 5)).split(64)]
    assert codes[0] == 200 and codes[-1] == 403
    r = _post(client, eve, _u8(jbda_like(20, 0)))
    assert r.status_code == 403 and "locked" in r.json()["detail"]
    used = store.resolve("eve").used
    assert used == 64 * codes.count(200)  # refused batches are not counted

    store2, _, client2 = _service(model, tmp_path / "t", "throttle", rate=10)
    _, mal = store2.create_key(name="mal")
    for xb in _u8(jbda_like(20, 5)).split(64):
        _post(client2, mal, xb)
    r = _post(client2, mal, _u8(jbda_like(20, 0))[:11])
    assert r.status_code == 429 and "throttled to 10 images" in r.json()["detail"]
    assert int(r.headers["Retry-After"]) >= 1


# serve --detector and audit ---------------------------------------------------------------

def test_serve_with_detectors_and_audit_shows_the_flag(model, tmp_path, monkeypatch):
    import json

    import uvicorn
    from typer.testing import CliRunner

    from stealguard.artifacts import save_classifier
    from stealguard.errors import StealguardError
    from stealguard.service.cli import standalone_app

    app, runner = standalone_app(), CliRunner()

    def run(*args):
        return runner.invoke(app, [str(a) for a in args])

    artifact = save_classifier(tmp_path / "victim", model, dataset="quadrants",
                               classes=["tl", "tr", "bl", "br"])
    store = tmp_path / "keys.db"
    secret = json.loads(run("keys", "create", "--name", "eve", "--store", store,
                            "--json").output)["secret"]
    started = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.update(app=app, **kw))
    r = run("serve", artifact, "--store", store, "--detector", "prada", "--detector-param",
            "delta=0.95", "--detect-policy", "lock")
    assert r.exit_code == 0, r.output
    with TestClient(started["app"]) as client:
        codes = [_post(client, secret, xb).status_code for xb in _u8(jbda_like(20, 5)).split(64)]
    assert codes[0] == 200 and codes[-1] == 403
    audit = json.loads(run("audit", "eve", "--store", store, "--json").output)
    (alarm,) = audit["detector_alarms"]
    assert alarm["detector"] == "prada" and alarm["queries"] <= 64 * codes.count(200)
    assert "stealing detectors flagged" in run("audit", "eve", "--store", store).output
    for args, message in [
        (["--detector", "prado"], "valid detector names: prada, shift"),
        (["--detector", "prada", "--detector-param", "delt=1"], "unknown parameter 'delt'"),
        (["--detector", "prada", "--detect-policy", "ban"], "valid detection policy names"),
        (["--detector", "shift"], "needs held-out images"),
    ]:
        r = run("serve", artifact, "--store", store, *args)
        assert isinstance(r.exception, StealguardError), (args, r.output)
        assert message in str(r.exception), (args, str(r.exception))


# the detect task (detect-table's cells) ---------------------------------------------------

@pytest.mark.slow
def test_detect_task_streams_on_tiny_folders(tmp_path):
    """The knockoff attacker with noise images is flagged by the shift test; the benign
    test-split clients (2 keys) are not; the evasive JBDA attacker's stream carries its
    benign share; unknown detectors fail when the cell is validated."""
    from PIL import Image

    from stealguard.pipeline import Victim
    from stealguard.reproduce.tasks import TASKS, RunContext
    from stealguard.reproduce.victims import TrainedVictim, VictimConfig
    from stealguard.training import TrainConfig, train

    def folder(name, images, labels, split):
        for i, (img, y) in enumerate(zip(images, labels)):
            d = tmp_path / name / split / "tl tr bl br".split()[int(y)]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img[0].numpy(), mode="L").save(d / f"{i}.png")

    for split, n, seed in (("train", 256, 0), ("test", 800, 1)):
        folder("quads", *quadrant_images(n, seed=seed), split)
    folder("noise", torch.randint(0, 256, (400, 1, 8, 8), dtype=torch.uint8,
                                  generator=torch.Generator().manual_seed(2)),
           torch.arange(400) % 4, "train")
    quads, noise = f"imagefolder:{tmp_path / 'quads'}", f"imagefolder:{tmp_path / 'noise'}"
    torch.manual_seed(0)
    net = build_model("conv3", in_channels=1, image_size=8, num_classes=4)
    x, y = quadrant_images(256, seed=0)
    train(net, x, y, config=TrainConfig(epochs=3, batch_size=32, lr=0.05), progress=False)
    cfg = VictimConfig(dataset=quads, arch="conv3")
    ctx = RunContext(device=torch.device("cpu"), artifacts=tmp_path / "artifacts")
    ctx.victims.put(cfg, TrainedVictim(Victim(model=net.eval(), dataset=quads,
                                              classes="tl tr bl br".split(),
                                              test_accuracy=0.9)))
    task = TASKS.get("detect")
    shift = {"name": "shift", "params": {**SHIFT, "reference_size": 400}}
    base = {"victim": cfg.model_dump(), "reference_size": 400,
            "detectors": [{"name": "prada"}, shift]}

    r = task.run(task.Cell(**base, client="attack", attack="knockoff", queries=noise,
                           budget=300, clone={"epochs": 1}), ctx).metrics
    assert r["shift_detected"] == 1 and r["shift_queries"] <= 100 and r["queries"] <= 300
    r = task.run(task.Cell(**base, client="benign_test", keys=2, budget=400), ctx).metrics
    assert r["queries"] == 400 and r["shift_detected"] == 0 and r["shift_test_alarms"] == 0
    r = task.run(task.Cell(**base, client="evasive", attack="jbda", benign_ratio=0.5,
                           budget=64, seed_size=16, jacobian={"rounds": 3}), ctx).metrics
    assert r["queries"] >= 2 * r["attack_queries"] - 16 and r["attack_queries"] <= 64
    with pytest.raises(Exception, match="valid detector names"):
        task.Cell(**{**base, "detectors": [{"name": "prado"}]}, client="benign_test",
                  budget=10)
    with pytest.raises(Exception, match="benign_ratio > 0 is for client evasive"):
        task.Cell(**base, client="attack", attack="jbda", budget=10, benign_ratio=0.5)
