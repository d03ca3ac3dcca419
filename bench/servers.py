"""Servers and inputs that the benchmarks and the tests share: a drawn digit, `digits serve`
started in a thread or in its own process on a free loopback port, and Ray nodes in a network
namespace where only loopback exists."""

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def draw_digit_seven(width=400, height=300, ink=(20, 20, 20), paper=(250, 248, 240), offset=(40, 30), mode="RGB"):
    """A '7' drawn with thick strokes, off-centre on a large canvas (dark ink on light paper)."""
    from PIL import Image, ImageDraw

    image = Image.new(mode, (width, height), paper)
    draw = ImageDraw.Draw(image)
    x, y = offset
    draw.line([(x, y), (x + 80, y)], fill=ink, width=14)
    draw.line([(x + 80, y), (x + 30, y + 140)], fill=ink, width=14)
    return image


def serve_in_background(predictor, host="127.0.0.1", number_reader=None, kept=None):
    """Start the app with uvicorn in a daemon thread on a free port (benchmarks, browser tests),
    with feedback kept by `kept` (a feedback.Feedback) if given. Returns the base URL and the
    server; set `server.should_exit = True` to stop it."""
    import uvicorn

    from pipeline.serving.api import create_app

    with socket.socket() as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    app = create_app(predictor, number_reader, kept)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port} within 30 s")
        time.sleep(0.05)
    return f"http://{host}:{port}", server


def serve_in_subprocess(model, workers=1, port=None, runtime="onnx", extra=(), env=None):
    """`digits serve` in its own process on a loopback port (a free one unless given), with `extra`
    arguments and `env` added to this process's environment; returns (process, base URL) once
    /health/ready answers 200. Output goes to the process's stdout pipe."""
    import httpx

    if port is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    command = ["-m", "pipeline.cli", "serve", "--port", str(port), "--model", str(model)]
    command += ["--workers", str(workers), "--runtime", runtime, *extra]
    process = subprocess.Popen(
        [sys.executable, *command],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"digits serve exited with {process.returncode}: {process.stdout.read().decode()}")
        try:
            if httpx.get(f"{url}/health/ready", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError("digits serve was not ready within 180 s")


CLONE_NEWNET = 0x40000000


@contextlib.contextmanager
def loopback_only_network():
    """This process (and what it starts) in a new network namespace with loopback up; back to the
    original one afterwards. Needs root, as `unshare -n` does."""
    libc = ctypes.CDLL(None, use_errno=True)
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        if os.geteuid() != 0 or libc.unshare(CLONE_NEWNET) != 0:
            raise PermissionError("a network namespace needs root (as `unshare -n` does)")
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        yield
    finally:
        libc.setns(original, CLONE_NEWNET)
        os.close(original)


def start_ray_node(args, env, temp_dir, log):
    """`ray start --block ARGS` (a head with --head, a worker with --address) on loopback."""
    return subprocess.Popen(
        [
            Path(sys.executable).parent / "ray",
            "start",
            "--block",
            "--node-ip-address",
            "127.0.0.1",
            "--temp-dir",
            temp_dir,
            *args,
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the nodes' processes are ended by it alone
    )


def stop_ray_nodes(nodes, grace=5):
    """SIGTERM to every `ray start --block` at once (each stops its node's processes), then, after
    `grace` seconds, SIGKILL to whatever is left in their process groups: a node's own stop waits
    about 30 s for its workers. Returns what is still alive in those groups, as "PID (state)"
    (nothing expected)."""
    for node in nodes:
        node.send_signal(signal.SIGTERM)
    deadline = time.time() + grace
    for node in nodes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            node.wait(timeout=max(0.1, deadline - time.time()))
    for node in nodes:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            node.wait(timeout=10)  # reaped: no zombie left in the group
    groups, deadline = {node.pid for node in nodes}, time.time() + 15
    while True:  # killed processes leave once their new parent has reaped them
        left = [pid for pid in map(int, filter(str.isdigit, os.listdir("/proc"))) if _pgid(pid) in groups]
        if not left or time.time() > deadline:
            return [f"{pid} ({_state(pid)})" for pid in left]
        time.sleep(0.5)


def _state(pid):
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _pgid(pid):
    with contextlib.suppress(ProcessLookupError):
        return os.getpgid(pid)


def alive_ray_nodes(address, env):
    code = "import ray; ray.init(address=%r, log_to_driver=False); print(sum(n['Alive'] for n in ray.nodes()))"
    done = subprocess.run([sys.executable, "-c", code % address], env=env, capture_output=True, text=True, timeout=120)
    return int(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 and done.stdout.strip() else 0


def wait_for_ray_nodes(address, env, count, nodes=(), timeout=120):
    """Until `count` nodes are alive at `address`; fails if a started node exits first."""
    deadline = time.time() + timeout
    while alive_ray_nodes(address, env) < count:
        for node in nodes:
            if node.poll() is not None:
                raise RuntimeError(f"a Ray node exited with {node.returncode}")
        if time.time() > deadline:
            raise RuntimeError(f"{count} Ray nodes were not up at {address} within {timeout} s")


def write_pngs(images, folder):
    """MNIST-form images (n, 28, 28[, 1]) as PNG files 000000.png, 000001.png, ... in `folder`."""
    from PIL import Image

    for i, image in enumerate(images.reshape(-1, 28, 28)):
        Image.fromarray((255 * image).astype(np.uint8)).save(folder / f"{i:06d}.png")
