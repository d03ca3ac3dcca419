"""Servers and inputs that the benchmarks and the tests share: a drawn digit, and `digits serve`
started in a thread or in its own process on a free loopback port."""

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

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


def serve_in_background(predictor, host="127.0.0.1"):
    """Start the app with uvicorn in a daemon thread on a free port (benchmarks, browser tests).
    Returns the base URL and the server; set `server.should_exit = True` to stop it."""
    import uvicorn

    from pipeline.serving.api import create_app

    with socket.socket() as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(predictor), host=host, port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port} within 30 s")
        time.sleep(0.05)
    return f"http://{host}:{port}", server


def serve_in_subprocess(model, workers=1, port=None):
    """`digits serve` in its own process on a loopback port (a free one unless given); returns
    (process, base URL) once /health/ready answers 200. Output goes to the process's stdout pipe."""
    import httpx

    if port is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    command = ["-m", "pipeline.cli", "serve", "--port", str(port), "--model", str(model)]
    command += ["--workers", str(workers)]
    process = subprocess.Popen([sys.executable, *command], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
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
