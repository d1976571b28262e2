"""The service's commands (serve, keys create|list|revoke, audit) through typer's runner."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import uvicorn
from typer.testing import CliRunner

from stealguard.artifacts import save_classifier
from stealguard.errors import ArtifactError, ConfigError
from stealguard.models import build_model
from stealguard.service.cli import standalone_app
from synthetic import quadrant_images

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
runner = CliRunner()
app = standalone_app()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("cmd", [[], ["serve"], ["keys"], ["keys", "create"], ["keys", "list"],
                                 ["keys", "revoke"], ["audit"]])
def test_every_command_has_help(cmd):
    r = run(*cmd, "--help")
    assert r.exit_code == 0 and "Usage" in r.output, r.output


def test_keys_and_audit(tmp_path):
    store = tmp_path / "keys.db"
    r = run("keys", "create", "--name", "alice", "--budget", "10", "--output", "topk", "--k", "2",
            "--store", store, "--json")
    assert r.exit_code == 0, r.output
    created = json.loads(r.output)
    secret = created["secret"]
    assert secret.startswith("sg_") and created["budget"] == 10 and created["output"] == "topk"
    text = run("keys", "create", "--name", "bob", "--store", store).output
    assert "secret (shown once, store it now): sg_" in text
    listed = run("keys", "list", "--store", store, "--json").output
    assert secret not in listed and "secret" not in listed
    assert [k["name"] for k in json.loads(listed)["keys"]] == ["alice", "bob"]
    assert "alice" in run("keys", "list", "--store", store).output

    from stealguard.service.store import KeyStore
    s = KeyStore(store)
    s.charge(s.authenticate(secret), ["a" * 64, "b" * 64, "a" * 64])
    audit = json.loads(run("audit", "alice", "--store", store, "--last", "5", "--json").output)
    assert (audit["requests"], audit["images"], audit["distinct_images"], audit["used"]) == (
        1, 3, 2, 3)
    assert len(audit["rows"]) == 1 and audit["rows"][0]["count"] == 3
    assert "distinct_images" in run("audit", created["id"], "--store", store, "--last", "1").output
    assert "revoked" in run("keys", "revoke", "alice", "--store", store).output
    assert json.loads(run("keys", "list", "--store", store, "--json").output)["keys"][0]["revoked"]
    r = run("keys", "create", "--output", "soft", "--store", store)
    assert isinstance(r.exception, ConfigError) and "unknown output mode 'soft'" in str(r.exception)
    r = run("audit", "nobody", "--store", store)
    assert isinstance(r.exception, ConfigError) and "no key is called 'nobody'" in str(r.exception)


def test_serve_builds_the_defended_app(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = build_model("conv3", in_channels=1, image_size=8, num_classes=4)
    artifact = save_classifier(tmp_path / "victim", model, dataset="quadrants",
                               classes=["tl", "tr", "bl", "br"])
    store = tmp_path / "keys.db"
    secret = json.loads(run("keys", "create", "--store", store, "--json").output)["secret"]
    started = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.update(app=app, **kw))
    r = run("serve", artifact, "--defense", "rounding", "-p", "decimals=1", "--port", "8123",
            "--store", store, "--max-images", "3")
    assert r.exit_code == 0, r.output
    assert (started["host"], started["port"]) == ("127.0.0.1", 8123)
    client = TestClient(started["app"])
    x, _ = quadrant_images(3, seed=1)
    out = client.post("/v1/predict", json={"pixels": x.tolist(), "dtype": "uint8"},
                      headers={"X-API-Key": secret}).json()["outputs"]
    assert all(abs(v * 10 - round(v * 10)) < 1e-5 for row in out for v in row)  # rounded
    info = client.get("/v1/info", headers={"X-API-Key": secret}).json()
    assert info["classes"] == ["tl", "tr", "bl", "br"] and info["max_images_per_request"] == 3
    r = run("serve", tmp_path / "missing", "--store", store)
    assert isinstance(r.exception, ArtifactError) and "manifest.json is missing" in str(r.exception)
    r = run("serve", artifact, "--defense", "rounding", "-p", "decimals", "--store", store)
    assert isinstance(r.exception, ConfigError) and "must look like name=value" in str(r.exception)
