"""The CLI with its defaults (no --device) on a tiny data root, as a new user runs it:
the README's "Command line" block, command by command, and an attack over HTTP."""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stealguard.cli import app, main
from tinydata import make_tiny_root

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("STEALGUARD_DATA", REPO.parent / "shared" / "datasets"))
runner = CliRunner()


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_root(tmp_path_factory.mktemp("tiny"), train=64, test=50)


def run(root: Path, *args: str):
    return runner.invoke(app, [*args, "--data-root", str(root)], catch_exceptions=False)


@pytest.fixture(scope="module")
def victim(root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("art") / "mnist-conv3"
    r = run(root, "train", "--dataset", "mnist", "--epochs", "2", "--out", str(out), "--json")
    assert r.exit_code == 0, r.output
    return out


def test_attack_with_default_device(root: Path, victim: Path) -> None:
    """`--device auto` (the default) used to reach torch.device("auto") and crash."""
    r = run(root, "attack", "knockoff", "--victim", str(victim), "--surrogate", "fashionmnist",
            "--budget", "40", "--epochs", "1", "--json")
    assert r.exit_code == 0, r.output
    figures = json.loads(r.output.strip().splitlines()[-1])
    assert figures["queries"] == figures["blackbox_count"] == 40


# ---- the README's commands ------------------------------------------------------------------


def readme_commands() -> list[str]:
    """The `stealguard ...` commands of the README's "Command line" block, one per entry
    (continuation lines joined, `a; b` split, optional `[...]` parts dropped)."""
    text = (REPO / "README.md").read_text()
    block = text.split("## Command line", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        line = re.sub(r"\s+#.*$", "", line.strip())
        for part in line.split(";"):
            part = re.sub(r"\s*\[[^\]]*\]", "", part.strip())
            if part.startswith("stealguard "):
                commands.append(part)
    return commands


def test_readme_block_is_found() -> None:
    cmds = readme_commands()
    assert any(c.startswith("stealguard train") for c in cmds)
    assert any("--target" in c for c in cmds) and any(c.startswith("stealguard serve") for c in cmds)


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_options_exist(command: str) -> None:
    """Every option the README names exists (parsing stops at --help, after the names are
    checked; nothing runs)."""
    args = shlex.split(command)[1:]
    args = [a.replace("sg_...", "sg_x") for a in args]
    r = runner.invoke(app, [*args, "--help"], catch_exceptions=False)
    assert r.exit_code == 0, r.output


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_readme_commands_run_as_written(root: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    """Each README command with its own arguments and defaults (no --device) on tiny data;
    only paths, the port and the printed API key are substituted."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("STEALGUARD_DATA", str(root))
    monkeypatch.setenv("STEALGUARD_STORE", str(tmp_path / "service.db"))
    port, secret, server = free_port(), None, None
    try:
        for command in readme_commands():
            command = command.replace(":8000", f":{port}").replace("--port 8000",
                                                                   f"--port {port}")
            if secret:
                command = command.replace("sg_...", secret)
            args = shlex.split(command)[1:]
            if args[0] == "import":  # needs the user's own model files (tests/test_byom.py)
                continue
            if args[:2] == ["data", "download"]:  # offline: the official files already in place
                monkeypatch.setenv("STEALGUARD_DATA", str(official_copy(tmp_path, args[2])))
            if args[0] == "serve":
                env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
                server = subprocess.Popen([sys.executable, "-c", "from stealguard.cli import "
                                           "main; main()", *args], env=env,
                                          stderr=subprocess.PIPE, text=True)
                wait_for_port(port, server)
                continue
            try:
                main(args)
                code = 0
            except SystemExit as e:
                code = int(e.code or 0)
            out, err = capsys.readouterr()
            assert code == 0, f"{command}\n{out}\n{err}"
            monkeypatch.setenv("STEALGUARD_DATA", str(root))
            if args[:2] == ["keys", "create"]:
                secret = re.search(r"sg_[A-Za-z0-9_\-]+", out + err).group(0)
    finally:
        if server is not None:
            server.terminate()
            server.wait(20)
    assert (tmp_path / "artifacts" / "mnist-clone" / "manifest.json").is_file()


def official_copy(tmp_path: Path, name: str) -> Path:
    """A data root holding a copy of the official files of `name` (from the shared datasets),
    so that `data download` verifies them and needs no network."""
    import shutil

    shared = SHARED_DATA
    folder = {"mnist": "MNIST", "fashionmnist": "FashionMNIST"}[name]
    if not (shared / folder / "raw").is_dir():
        pytest.skip(f"no official {name} files under {shared} to verify offline")
    dest = tmp_path / "official" / folder / "raw"
    shutil.copytree(shared / folder / "raw", dest, dirs_exist_ok=True)
    return tmp_path / "official"


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited: {proc.stderr.read() if proc.stderr else ''}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError("serve did not start")


# ---- over HTTP: the key's budget and rate limit ---------------------------------------------


def test_http_attack_refuses_a_budget_larger_than_the_key_has(root, victim, tmp_path, capsys):
    from stealguard.artifacts import load_classifier
    from stealguard.service import KeyStore, create_app
    from test_service_http import LiveServer

    model, _ = load_classifier(victim)
    store = KeyStore(tmp_path / "service.db")
    key, secret = store.create_key(budget=30)
    with LiveServer(create_app(model, store=store)) as srv:
        try:
            main(["attack", "knockoff", "--victim", str(victim), "--target", srv.url,
                  "--api-key", secret, "--surrogate", "fashionmnist", "--budget", "50",
                  "--data-root", str(root)])
            code = 0
        except SystemExit as e:
            code = int(e.code or 0)
    err = capsys.readouterr().err
    assert code == 2 and "has 30 queries left, fewer than --budget 50" in err, err
    assert store.get(key.id).used == 0  # refused before spending any of it


def test_http_blackbox_chunks_within_the_rate_limit(victim, tmp_path):
    import torch

    from stealguard.artifacts import load_classifier
    from stealguard.service import HttpBlackBox, KeyStore, create_app
    from test_service_http import LiveServer

    model, _ = load_classifier(victim)
    store = KeyStore(tmp_path / "service.db")
    key, secret = store.create_key(rate_limit=4, rate_window=1.0)
    x = torch.rand(10, 1, 28, 28)
    with LiveServer(create_app(model, store=store)) as srv, \
            HttpBlackBox(srv.url, secret, max_rate_wait_s=5) as bb:
        assert bb.query(x).shape == (10, 10)
    assert store.get(key.id).used == 10


def test_demo_runs_with_its_defaults_shrunk_by_set(root: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """`stealguard demo` as `make demo` runs it (scale quick, results/demo under the working
    directory, device auto), its sizes shrunk by --set: every row of the spec, the wall time
    and the machine under the table, and a second run answers from the run store."""
    monkeypatch.chdir(tmp_path)
    shrink = ["--set", "victim.subset=60", "--set", "victim.train.epochs=1",
              "--set", "victim.params.hash_epochs=1", "--set", "budget=64",
              "--set", "clone.epochs=1"]
    r = run(root, "demo", *shrink)
    assert r.exit_code == 0, r.output
    table = [ln for ln in r.output.splitlines() if "knockoff(fashionmnist)" in ln]
    assert len(table) == 6
    assert sum("mad_argmax" in ln for ln in table) == 2  # soft and argmax attackers
    assert sum("edm" in ln for ln in table) == 2
    assert re.search(r"wall time \d+ s \(6 cells run, 0 from the run store results/demo/"
                     r"runs.db\); machine: .*threads, torch", r.output)
    assert (tmp_path / "results" / "demo" / "runs.db").exists()
    again = run(root, "demo", *shrink, "--json")
    assert again.exit_code == 0, again.output
    report = json.loads(again.output)
    assert report["ran"] == 0 and report["stored_before"] == 6 and len(report["rows"]) == 6
