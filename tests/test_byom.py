"""Bring your own model: a module of the user's (defined here, not one of ours) goes wrap ->
MAD (full Jacobian) -> KnockoffNets -> the HTTP service; the same through `stealguard import`
from a .pt state_dict and from ONNX; every registered artifact format saves, loads, describes
and serves; bad input is refused at import time with what to fix."""

from __future__ import annotations

import asyncio
import json
import sys
import textwrap
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from torch import nn
from typer.testing import CliRunner

import stealguard
from stealguard.attacks import KnockoffNets
from stealguard.blackbox import LocalBlackBox
from stealguard.cli import app
from stealguard.defenses import DefenseConfig, build_defense
from stealguard.defenses.distances import DISTANCES
from stealguard.errors import ConfigError
from stealguard.formats import FORMATS, describe_artifact, load_victim, save_victim
from stealguard.models import build_model
from stealguard.service import HttpBlackBox, KeyStore, create_app, load_served_model, ray_serve
from stealguard.training import TrainConfig
from stealguard.victim import Predictor, Victim
from stealguard.wrapped import WrappedModel
from synthetic import quadrant_dataset, quadrant_images

CLASSES = ["q0-tl", "q1-tr", "q2-bl", "q3-br"]  # sorted as the image folder sorts them
NET_SOURCE = '''
import torch
from torch import nn


class QuadNet(nn.Module):
    """A user's own 8x8, 4-class network (not a stealguard architecture)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.fc = nn.Linear(24, 4)

    def forward(self, x):
        return self.fc(self.body(x))


def build():
    return QuadNet()
'''
namespace: dict = {}
exec(compile(NET_SOURCE, "<user net>", "exec"), namespace)
QuadNet = namespace["QuadNet"]  # the user's class, defined in this test


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _fit(model: nn.Module, steps: int = 150) -> nn.Module:
    """The user's own training loop (not ours): Adam on the quadrant task."""
    x, y = quadrant_images(512, seed=1)
    xf = x.float() / 255
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, 512, (64,), generator=g)
        loss = nn.functional.cross_entropy(model(xf[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained() -> WrappedModel:
    torch.manual_seed(0)
    model = stealguard.wrap(QuadNet(), input_shape=(1, 8, 8), num_classes=4, mean=[0.5],
                            std=[0.5], classes=CLASSES)
    return _fit(model)  # type: ignore[return-value]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The quadrant task as an image folder: the dataset the imported models name."""
    root = tmp_path_factory.mktemp("quads")
    for split, n, seed in (("train", 128, 0), ("test", 96, 1)):
        x, y = quadrant_images(n, seed=seed)
        for i, (img, label) in enumerate(zip(x, y)):
            d = root / split / CLASSES[int(label)]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img[0].numpy(), mode="L").save(d / f"{i}.png")
    return f"imagefolder:{root}"


@pytest.fixture
def user_pkg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The user's package on PYTHONPATH: `<name>.nets:build` is the factory."""
    name = f"userpkg_{tmp_path.name.replace('-', '_')}"
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text("")
    (tmp_path / name / "nets.py").write_text(textwrap.dedent(NET_SOURCE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    for mod in [m for m in sys.modules if m.startswith(name)]:
        del sys.modules[mod]


def _serve(model, defense, tmp_path: Path) -> tuple[TestClient, str]:
    store = KeyStore(tmp_path / "keys.db")
    _, secret = store.create_key()
    return TestClient(create_app(model, defense=defense, store=store)), secret


def _cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=True)


X = quadrant_images(24, seed=7)[0]  # uint8 (24, 1, 8, 8)


# -- wrap -> MAD (full Jacobian) -> KnockoffNets -> HTTP ---------------------------------

def test_a_users_module_is_defended_stolen_and_served(trained, tmp_path):
    mad = build_defense("mad", {"epsilon": 0.5}, victim=trained)  # jacobian=full (default)
    assert isinstance(mad.surrogate, WrappedModel)  # a re-initialised copy of QuadNet
    assert not torch.equal(mad.surrogate.module.fc.weight, trained.module.fc.weight)
    bb = LocalBlackBox(trained, defense=mad, budget=200)
    x = X.float() / 255
    y, y_tilde = LocalBlackBox(trained).query(x), bb.query(x)
    assert DISTANCES.get("l1")(y.double(), y_tilde.double()).max() <= 0.5 + 1e-5
    assert (y - y_tilde).abs().max() > 1e-3  # MAD moved the answers

    with pytest.warns(UserWarning, match="no registered architecture"):
        opts = stealguard.victim.clone_arch(trained)
    attack = KnockoffNets(quadrant_dataset(400, seed=5), arch=opts, query_batch=64,
                          clone=TrainConfig(epochs=5, batch_size=32, lr=0.05))
    result = attack(LocalBlackBox(trained, defense=mad, budget=400), 400)
    assert result.queries == 400
    xt, yt = quadrant_images(128, seed=2)
    with torch.no_grad():
        v_pred, c_pred = trained(xt.float() / 255).argmax(1), result.clone(xt).argmax(1)
    assert (v_pred == yt).float().mean() > 0.9  # the user's training worked
    assert (c_pred == v_pred).float().mean() > 0.7  # and the clone learned from the answers

    client, secret = _serve(trained, build_defense("mad", {"epsilon": 0.5}, victim=trained),
                            tmp_path)
    with HttpBlackBox("http://testserver", secret, client=client) as hbb:
        served = hbb.query(X)
    torch.testing.assert_close(served, y_tilde, rtol=0, atol=1e-5)


def test_last_layer_mad_needs_the_final_linear_layer(trained):
    with pytest.raises(ConfigError, match="jacobian='last_layer' needs a surrogate with "
                                          "forward_features"):
        build_defense("mad", {"epsilon": 0.5, "jacobian": "last_layer"}, victim=trained)
    named = stealguard.wrap(trained.module, input_shape=(1, 8, 8), num_classes=4, mean=[0.5],
                            std=[0.5], last_layer="fc")
    fast = build_defense("mad", {"epsilon": 0.5, "jacobian": "last_layer",
                                 "surrogate_features": "victim"}, victim=named)
    out = LocalBlackBox(named, defense=fast).query(X)
    assert out.shape == (24, 4) and torch.allclose(out.sum(1), torch.ones(24), atol=1e-5)
    h = named.forward_features(X.float() / 255)
    torch.testing.assert_close(named.classifier(h), named(X.float() / 255))


def test_wrap_refuses_what_the_module_does_not_do():
    with pytest.raises(ConfigError, match=r"output of shape \(2, 4\); expected \(2, 5\)"):
        stealguard.wrap(QuadNet(), input_shape=(1, 8, 8), num_classes=5)
    with pytest.raises(ConfigError, match=r"rejects input of shape \(B, 3, 8, 8\)"):
        stealguard.wrap(QuadNet(), input_shape=(3, 8, 8), num_classes=4)
    with pytest.raises(ConfigError, match="must name the module's final nn.Linear.*'fc'"):
        stealguard.wrap(QuadNet(), input_shape=(1, 8, 8), num_classes=4, last_layer="body")
    with pytest.raises(ConfigError, match="input_shape must be"):
        stealguard.wrap(QuadNet(), input_shape=(8, 8), num_classes=4)
    with pytest.raises(ConfigError, match="give both mean and std"):
        stealguard.wrap(QuadNet(), input_shape=(1, 8, 8), num_classes=4, mean=[0.5])

    class Head(nn.Module):  # fc is not applied last: its output is not the logits
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 4)

        def forward(self, x):
            return self.fc(x.flatten(1)) * 2

    with pytest.raises(ConfigError, match="'fc' must be its final layer"):
        stealguard.wrap(Head(), input_shape=(1, 8, 8), num_classes=4, last_layer="fc")


def test_register_model_makes_a_users_architecture_an_edm_member():
    from stealguard.ensemble import EDMPredictor, SHA1Hash
    from stealguard.models import MODELS

    @stealguard.register_model("test_byom_quadnet")
    def quadnet(*, in_channels: int, image_size: int, num_classes: int) -> nn.Module:
        return QuadNet()

    try:
        members = [build_model("test_byom_quadnet", in_channels=1, image_size=8, num_classes=4)
                   for _ in range(2)]
        edm = EDMPredictor(members, hash_fn=SHA1Hash())
        assert edm.predict_proba(X.float() / 255).shape == (24, 4)
        with pytest.raises(ValueError, match="already registered"):
            stealguard.register_model("test_byom_quadnet")(quadnet)
    finally:
        MODELS._items.pop("test_byom_quadnet")


# -- stealguard import: factory + .pt --------------------------------------------------------

def _import_pt(user_pkg: str, trained: WrappedModel, tmp_path: Path, folder: str,
               *extra: str, state: dict | None = None):
    pt = tmp_path / "net.pt"
    torch.save(trained.module.state_dict() if state is None else state, pt)
    return _cli("import", "--factory", f"{user_pkg}.nets:build", "--weights", pt,
                "--input-shape", "1,8,8", "--num-classes", "4", "--dataset", folder,
                "--mean", "0.5", "--std", "0.5", "--classes", ",".join(CLASSES),
                "--out", tmp_path / "imported", "--json", *extra)


def test_import_a_pt_state_dict_then_evaluate_attack_and_serve(user_pkg, trained, tmp_path,
                                                               folder):
    r = _import_pt(user_pkg, trained, tmp_path, folder, "--last-layer", "fc")
    assert r.exit_code == 0, r.output
    art = tmp_path / "imported"
    assert json.loads(r.output)["format"] == "stealguard.module"
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["normalization"] == {"mean": [0.5], "std": [0.5]}
    assert manifest["dataset"] == folder and manifest["classes"] == CLASSES
    assert not list(art.glob("*.pt"))  # the artifact holds safetensors, never the pickle
    victim = load_victim(art)
    x = X.float() / 255
    torch.testing.assert_close(victim.model(x), trained(x), rtol=0, atol=1e-6)

    r = _cli("evaluate", art, "--json", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["test_accuracy"] > 0.8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the clone defaults to conv3, and says so
        r = _cli("attack", "knockoff", "--victim", art, "--surrogate", folder, "--budget", "64",
                 "--epochs", "1", "--json", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["queries"] == 64

    served = load_served_model(art)
    mad = build_defense("mad", {"epsilon": 0.5, "jacobian": "last_layer"}, victim=served.model)
    client, secret = _serve(served, mad, tmp_path)
    with HttpBlackBox("http://testserver", secret, client=client) as hbb:
        out = hbb.query(X)
    torch.testing.assert_close(out, LocalBlackBox(victim.model, defense=mad).query(X),
                               rtol=0, atol=1e-5)


def test_import_refuses_bad_checkpoints(user_pkg, trained, tmp_path, folder):
    state = dict(trained.module.state_dict())
    state["head.weight"] = state.pop("fc.weight")
    r = _import_pt(user_pkg, trained, tmp_path, folder, state=state)
    assert r.exit_code != 0
    with pytest.raises(ConfigError, match=r"missing keys \['fc.weight'\], unexpected keys "
                                          r"\['head.weight'\]"):
        raise r.exception
    torch.save(load_module(user_pkg), tmp_path / "whole.pt")  # a pickled module: needs code
    torch.save(trained.module.state_dict(), tmp_path / "good.pt")
    from stealguard.formats.imported import import_factory

    with pytest.raises(ConfigError, match="needs arbitrary unpickling to load.*refused"):
        import_factory(tmp_path / "x", factory=f"{user_pkg}.nets:build",
                       weights=tmp_path / "whole.pt", input_shape=(1, 8, 8), num_classes=4,
                       dataset=folder)
    with pytest.raises(ConfigError, match=r"expected \(2, 10\)"):
        import_factory(tmp_path / "x", factory=f"{user_pkg}.nets:build",
                       weights=tmp_path / "good.pt", input_shape=(1, 8, 8), num_classes=10,
                       dataset=folder)
    with pytest.raises(ConfigError, match=r"rejects input of shape \(B, 3, 8, 8\)"):
        import_factory(tmp_path / "x", factory=f"{user_pkg}.nets:build",
                       weights=tmp_path / "good.pt", input_shape=(3, 8, 8), num_classes=4,
                       dataset=folder)
    with pytest.raises(ConfigError, match="cannot import 'nowhere_pkg.nets'.*PYTHONPATH"):
        import_factory(tmp_path / "x", factory="nowhere_pkg.nets:build",
                       weights=tmp_path / "good.pt", input_shape=(1, 8, 8), num_classes=4,
                       dataset=folder)
    assert not (tmp_path / "x" / "manifest.json").exists()  # nothing written on refusal


def test_import_errors_are_one_line_with_exit_2(tmp_path):
    import subprocess

    main = "from stealguard.cli import main; main()"
    r = subprocess.run([sys.executable, "-c", main, "import", "--factory", "a:b",
                        "--onnx", "m.onnx", "--num-classes", "4", "--dataset", "mnist",
                        "--out", str(tmp_path / "o")], capture_output=True, text=True,
                       cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        "error: give either --factory (with --weights and --input-shape) or --onnx"]


# -- stealguard import --onnx ----------------------------------------------------------------

def _export(module: nn.Module, path: Path, *, dynamic: dict | None = None,
            shape: tuple = (1, 1, 8, 8)) -> Path:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    torch.onnx.export(module, (torch.rand(*shape),), str(path), input_names=["x"],
                      output_names=["logits"],
                      dynamic_axes={"x": {0: "n"}} if dynamic is None else dynamic,
                      dynamo=False)
    return path


def test_import_onnx_then_defend_attack_and_serve(trained, tmp_path, folder):
    onnx = _export(trained.module, tmp_path / "net.onnx")
    art = tmp_path / "onnx-art"
    r = _cli("import", "--onnx", onnx, "--num-classes", "4", "--dataset", folder, "--mean",
             "0.5", "--std", "0.5", "--out", art, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["input_shape"] == [1, 8, 8]
    victim = load_victim(art)
    x = X.float() / 255
    torch.testing.assert_close(victim.model.predict_proba(x), trained.predict_proba(x),
                               rtol=0, atol=1e-5)
    with pytest.warns(UserWarning, match="no architecture to copy; its surrogate is a random "
                                         "'conv3'"):
        mad = build_defense("mad", {"epsilon": 0.5}, victim=victim.model)
    client, secret = _serve(load_served_model(art), mad, tmp_path)
    with HttpBlackBox("http://testserver", secret, client=client) as hbb:
        out = hbb.query(X)
    torch.testing.assert_close(out, LocalBlackBox(victim.model, defense=mad).query(X),
                               rtol=0, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        r = _cli("attack", "knockoff", "--victim", art, "--surrogate", folder, "--budget", "48",
                 "--epochs", "1", "--json", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["queries"] == 48

    with pytest.raises(ConfigError, match="onnxruntime, which exposes neither its features"):
        build_defense("mad", {"epsilon": 0.5, "jacobian": "last_layer",
                              "surrogate_features": "victim"}, victim=victim.model)
    from stealguard.ensemble import EDMPredictor, SHA1Hash

    with pytest.raises(ConfigError, match="an ONNX model cannot be a member"):
        EDMPredictor([victim.model, victim.model], hash_fn=SHA1Hash())


def test_import_onnx_refuses_dynamic_or_wrong_shapes(trained, tmp_path, folder):
    import onnx

    from stealguard.formats.onnx import import_onnx

    ok = _export(trained.module, tmp_path / "ok.onnx")
    graph = onnx.load(str(ok))  # the same graph, declared with dynamic height and width
    dims = graph.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "h", "w"
    onnx.save(graph, str(tmp_path / "dyn.onnx"))
    with pytest.raises(ConfigError, match=r"dynamic or unknown dims \['n', 1, 'h', 'w'\]; "
                                          r"only the batch dim may be dynamic"):
        import_onnx(tmp_path / "a", onnx_path=tmp_path / "dyn.onnx", num_classes=4,
                    dataset=folder)
    with pytest.raises(ConfigError, match=r"takes images of shape \(1, 8, 8\), not "
                                          r"\(1, 16, 16\)"):
        import_onnx(tmp_path / "a", onnx_path=ok, num_classes=4, dataset=folder,
                    input_shape=(1, 16, 16))
    with pytest.raises(ConfigError, match=r"expected \(2, 3\): num_classes"):
        import_onnx(tmp_path / "a", onnx_path=ok, num_classes=3, dataset=folder)
    fixed = _export(trained.module, tmp_path / "fixed.onnx", dynamic={}, shape=(4, 1, 8, 8))
    with pytest.raises(ConfigError, match="fixed batch of 4"):
        import_onnx(tmp_path / "a", onnx_path=fixed, num_classes=4, dataset=folder)
    assert not (tmp_path / "a" / "manifest.json").exists()


# -- every registered artifact format: save, load, describe, serve ----------------------------

def _classifier(tmp: Path, trained, user_pkg) -> Victim:
    torch.manual_seed(3)
    return Victim(build_model("conv3", in_channels=1, image_size=8, num_classes=4), "quads",
                  CLASSES, 0.5, {})


def _edm(tmp: Path, trained, user_pkg) -> Victim:
    from stealguard.ensemble import DNNHash, EDMPredictor

    torch.manual_seed(4)
    members = [build_model("conv3", in_channels=1, image_size=8, num_classes=4)
               for _ in range(2)]
    hash_net = build_model("conv3", in_channels=1, image_size=8, num_classes=6)
    return Victim(EDMPredictor(members, hash_fn=DNNHash(hash_net, subclasses=3)), "quads",
                  CLASSES, 0.5, {})


def _module(tmp: Path, trained, user_pkg) -> Victim:
    model = stealguard.wrap(load_module(user_pkg), input_shape=(1, 8, 8), num_classes=4,
                            mean=[0.5], std=[0.5], classes=CLASSES)
    model.module.load_state_dict(trained.module.state_dict())
    model.factory = f"{user_pkg}.nets:build"
    return Victim(model, "quads", CLASSES, 0.9, {})


def _onnx(tmp: Path, trained, user_pkg) -> Victim:
    from stealguard.formats.onnx import OnnxModel

    path = _export(trained.module, tmp / "graph.onnx")
    return Victim(OnnxModel(path, num_classes=4, classes=CLASSES, mean=[0.5], std=[0.5]),
                  "quads", CLASSES, 0.9, {})


def load_module(user_pkg: str) -> nn.Module:
    from stealguard.formats.imported import build_module

    return build_module(f"{user_pkg}.nets:build")


MAKERS: dict[str, Callable[[Path, WrappedModel, str], Victim]] = {
    "stealguard.classifier": _classifier, "stealguard.edm": _edm,
    "stealguard.module": _module, "stealguard.onnx": _onnx,
}


def test_every_format_has_a_contract_case():
    assert sorted(MAKERS) == FORMATS.names()


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_format_contract_save_load_describe_serve(name, trained, user_pkg, tmp_path):
    victim = MAKERS[name](tmp_path, trained, user_pkg)
    fmt = FORMATS.get(name)
    assert fmt.handles(victim.model)
    path = save_victim(victim, tmp_path / "art")
    assert json.loads((path / "manifest.json").read_text())["format"] == name
    info = describe_artifact(path)
    assert (info.format, info.input_shape, info.num_classes, info.classes) == (
        name, (1, 8, 8), 4, CLASSES)
    loaded = load_victim(path)
    assert isinstance(loaded.model, Predictor)  # input_shape, num_classes, predict_proba
    assert (loaded.dataset, loaded.classes) == ("quads", CLASSES)
    assert loaded.test_accuracy == victim.test_accuracy
    x = X.float() / 255
    want = LocalBlackBox(victim.model).query(x)
    torch.testing.assert_close(LocalBlackBox(loaded.model).query(x), want, rtol=0, atol=1e-6)
    again = save_victim(loaded, tmp_path / "again")  # a loaded artifact saves again
    torch.testing.assert_close(LocalBlackBox(load_victim(again).model).query(x), want,
                               rtol=0, atol=1e-6)
    assert fmt.load_member(path, 0) is not None
    standin = fmt.standin(path)
    assert tuple(standin.input_shape) == (1, 8, 8) and int(standin.num_classes) == 4
    client, secret = _serve(load_served_model(path), None, tmp_path)
    with HttpBlackBox("http://testserver", secret, client=client) as hbb:
        torch.testing.assert_close(hbb.query(X), want, rtol=0, atol=1e-5)
    router = ray_serve.Router(str(path), [LocalHandle(ray_serve.MemberModel(str(path), i,
                                                                          threads=1))
                                          for i in range(info.members)],
                              DefenseConfig(), threads=1)  # Ray Serve's code, without Ray
    torch.testing.assert_close(asyncio.run(router(x)), want, rtol=0, atol=1e-5)


class LocalHandle:
    """A member deployment's handle, in this process: `remote(x)` is awaitable."""

    def __init__(self, member: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.member = member

    def remote(self, x: torch.Tensor):
        async def answer() -> torch.Tensor:
            return self.member(x)
        return answer()


def test_reproduce_takes_an_imported_artifact_as_victim(user_pkg, trained, tmp_path, folder):
    from stealguard.reproduce.tasks.base import TASKS, RunContext
    from stealguard.reproduce.victims import VictimConfig

    assert _import_pt(user_pkg, trained, tmp_path, folder).exit_code == 0
    cfg = VictimConfig(dataset=folder, arch="conv3", training="artifact",
                       params={"path": str(tmp_path / "imported")})
    task = TASKS.get("steal")
    cell = task.Cell.model_validate({
        "victim": cfg.model_dump(), "queries": folder, "budget": 48,
        "defense": {"name": "mad", "params": {"epsilon": 0.5}},
        "clone": {"epochs": 1, "batch_size": 16, "lr": 0.05}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        r = task.run(cell, RunContext(device=torch.device("cpu"), artifacts=tmp_path / "runs"))
    assert r.metrics["queries"] == 48
    assert r.metrics["victim_accuracy"] > 0.8 and r.metrics["l1_mean"] <= 0.5 + 1e-6
    bad = VictimConfig(dataset="mnist", arch="conv3", training="artifact",
                       params={"path": str(tmp_path / "imported")})
    with pytest.raises(ConfigError, match="was trained on 'imagefolder:"):
        RunContext(device=torch.device("cpu"), artifacts=tmp_path / "runs").victim(bad)
