"""EDM bundles: round trip, refusal of incomplete or altered bundles, and the secret hash."""

import json
from pathlib import Path

import pytest
import torch

from stealguard.artifacts import load_classifier, sha256_file
from stealguard.ensemble import (
    DCTHash,
    DNNHash,
    EDMPredictor,
    is_edm_bundle,
    load_edm,
    public_info,
    read_edm_manifest,
    read_hash_spec,
    save_edm,
)
from stealguard.errors import ArtifactError
from stealguard.models import build_model

TASK = "my-private-glyphs/train[half0]"


def _edm(n: int = 3, hash_kind: str = "dnn") -> EDMPredictor:
    torch.manual_seed(0)
    members = [build_model("conv3", in_channels=1, image_size=8, num_classes=4,
                           mean=(0.2,), std=(0.3,)) for _ in range(n)]
    if hash_kind == "dct":
        return EDMPredictor(members, hash_fn=DCTHash())
    hash_net = build_model("conv3", in_channels=1, image_size=8, num_classes=6)
    with torch.no_grad():
        hash_net.classifier.weight.mul_(50.0)
    return EDMPredictor(members, hash_fn=DNNHash(hash_net, subclasses=3))


def _save(tmp_path: Path, edm: EDMPredictor) -> Path:
    return save_edm(tmp_path / "edm", edm, dataset="quadrants", classes=["a", "b", "c", "d"],
                    lambda_d=0.5, ood="noise", hash_task=TASK, metrics={"test_accuracy": 0.9},
                    hash_metrics={"accuracy": 0.77})


def test_round_trip(tmp_path):
    edm = _edm()
    path = _save(tmp_path, edm)
    assert sorted(p.name for p in path.iterdir()) == [
        "hash.json", "hash.safetensors", "manifest.json", "member-0.safetensors",
        "member-1.safetensors", "member-2.safetensors"]
    loaded, manifest = load_edm(path)
    x = torch.rand(32, 1, 8, 8)
    assert torch.equal(loaded.member_index(x), edm.member_index(x))
    assert torch.allclose(loaded.predict_proba(x), edm.predict_proba(x))
    assert (loaded.hash_fn.num_classes, loaded.hash_fn.subclasses) == (6, 3)
    assert manifest.lambda_d == 0.5 and read_hash_spec(path, manifest).task == TASK
    assert is_edm_bundle(path) and not is_edm_bundle(tmp_path)
    # the manifest itself is public: the hash and its task live in hash.json only
    assert TASK not in (path / "manifest.json").read_text()


def test_round_trip_with_a_dct_hash(tmp_path):
    path = _save(tmp_path, _edm(hash_kind="dct"))
    assert not (path / "hash.safetensors").exists()
    loaded, _ = load_edm(path)
    assert isinstance(loaded.hash_fn, DCTHash)


def test_public_info_never_holds_the_hash(tmp_path):
    path = _save(tmp_path, _edm())
    info = public_info(read_edm_manifest(path))
    assert info["members"] == 3 and info["defense"] == "edm" and info["lambda_d"] == 0.5
    text = json.dumps(info)
    for secret in ("hash", "my-private-glyphs", "0.77", "subclasses"):
        assert secret not in text


def test_a_missing_member_is_refused(tmp_path):
    path = _save(tmp_path, _edm())
    (path / "member-1.safetensors").unlink()
    with pytest.raises(ArtifactError, match=r"member 1 of 3 \(member-1.safetensors\) is missing"):
        load_edm(path)


def test_a_corrupt_member_or_hash_is_refused(tmp_path):
    path = _save(tmp_path, _edm())
    f = path / "member-2.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ArtifactError,
                       match="member-2.safetensors does not match the manifest's sha256"):
        load_edm(path)
    path = _save(tmp_path, _edm())
    (path / "hash.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(ArtifactError, match="hash.safetensors has 10 bytes"):
        load_edm(path)


def _edit(path: Path, name: str, edit) -> None:
    raw = json.loads((path / name).read_text())
    edit(raw)
    (path / name).write_text(json.dumps(raw))


def _edit_hash_spec(path: Path, **changes) -> None:
    """Change hash.json and re-seal it in the manifest (a consistent but wrong bundle)."""
    _edit(path, "hash.json", lambda h: h.update(changes))
    f = path / "hash.json"
    _edit(path, "manifest.json", lambda m: m["hash_spec"].update(
        sha256=sha256_file(f), bytes=f.stat().st_size))


def test_inconsistent_bundles_are_refused(tmp_path):
    path = _save(tmp_path, _edm())
    _edit(path, "hash.json", lambda h: h.update(subclasses=2))  # not re-sealed
    with pytest.raises(ArtifactError,
                       match="hash.json does not match the manifest's size or sha256"):
        load_edm(path)
    _edit_hash_spec(path, num_classes=7)
    with pytest.raises(ArtifactError, match="M = 7 does not match the hash network, which has 6"):
        load_edm(path)
    _edit_hash_spec(path, num_classes=6, subclasses=0)
    with pytest.raises(ArtifactError, match=r"m \(sub-classes\) must be >= 1"):
        load_edm(path)
    (path / "hash.json").unlink()
    with pytest.raises(ArtifactError, match=r"hash description \(hash.json\) is missing"):
        load_edm(path)
    _edit(path, "manifest.json", lambda m: m.update(members=m["members"][:1]))
    with pytest.raises(ArtifactError, match="lists 1 members; EDM needs N >= 2"):
        load_edm(path)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_edm(path)
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        load_edm(tmp_path / "nowhere")


def test_a_bundle_is_not_a_classifier_artifact(tmp_path):
    path = _save(tmp_path, _edm())
    with pytest.raises(ArtifactError,
                       match="format 'stealguard.edm' v1 is not a stealguard.classifier"):
        load_classifier(path)
