import json

import pytest
import torch

from stealguard.artifacts import MANIFEST, WEIGHTS, load_classifier, save_classifier
from stealguard.errors import ArtifactError
from stealguard.models import build_model


@pytest.fixture()
def saved(tmp_path):
    torch.manual_seed(0)
    model = build_model("conv3", in_channels=1, image_size=8, num_classes=4,
                        mean=(0.2,), std=(0.3,))
    path = save_classifier(tmp_path / "a", model, dataset="quadrants",
                           classes=["a", "b", "c", "d"], train_config={"epochs": 1},
                           metrics={"test_accuracy": 0.5})
    return model, path


def test_round_trip_is_exact(saved):
    model, path = saved
    loaded, manifest = load_classifier(path)
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(model.eval()(x), loaded(x))
    assert manifest.arch == "conv3" and manifest.input_shape == (1, 8, 8)
    assert manifest.normalization["mean"] == pytest.approx([0.2])
    assert manifest.metrics["test_accuracy"] == 0.5
    assert not any(p.suffix in (".pt", ".pth", ".pkl") for p in path.iterdir())


def test_truncated_weights_are_refused(saved):
    _, path = saved
    data = (path / WEIGHTS).read_bytes()
    (path / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="truncated"):
        load_classifier(path)


def test_altered_weights_are_refused(saved):
    _, path = saved
    data = bytearray((path / WEIGHTS).read_bytes())
    data[-1] ^= 0xFF
    (path / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256"):
        load_classifier(path)


def test_manifest_architecture_mismatch_is_refused(saved):
    _, path = saved
    m = json.loads((path / MANIFEST).read_text())
    m["num_classes"] = 7
    (path / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="do not match architecture"):
        load_classifier(path)


def test_unknown_arch_and_bad_json(saved):
    _, path = saved
    m = json.loads((path / MANIFEST).read_text())
    m["arch"] = "transformer9000"
    (path / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="unknown model 'transformer9000'"):
        load_classifier(path)
    (path / MANIFEST).write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_classifier(path)


def test_missing_artifact_says_how_to_make_one(tmp_path):
    with pytest.raises(ArtifactError, match="stealguard train"):
        load_classifier(tmp_path / "nothing")
