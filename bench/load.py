"""Load test of the REST API: `digits serve` in its own process, clients on loopback.

    ./dev run python -m bench --api --concurrency 1 32 --requests 2000
    ./dev run python -m bench --api --concurrency 64 --requests 10000 --bad-share 0.1 --workers 2

For each concurrency level, that many clients send `--requests` requests in all, each client one
at a time: POST /predict with a 280x280 PNG of a drawn digit, and with --bad-share, a share of bad
requests (not an image, a blank page, broken JSON, pixels of the wrong shape, ...) spread evenly.
Reported per level: requests/s, latency p50/p95/p99/max, responses by status, connection errors,
and the server's memory (RSS of all its processes) before and after. Bounded in requests and time:
a level stops after --timeout seconds, and the server is stopped at the end.
"""

import asyncio
import io
import json
import time
from collections import Counter

import numpy as np

from bench.servers import draw_digit_seven, serve_in_subprocess


def png(image):
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def request_kinds():
    """(name, content type, body) of the good request and the bad ones that are mixed in."""
    from PIL import Image

    seven = png(draw_digit_seven(280, 280, offset=(90, 60)))
    boundary = "digitsbench"

    def multipart(name, data, field="file"):
        return (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
                f"Content-Type: application/octet-stream\r\n\r\n"
            ).encode()
            + data
            + f"\r\n--{boundary}--\r\n".encode()
        )

    form = f"multipart/form-data; boundary={boundary}"
    good = ("good", form, multipart("seven.png", seven))
    bad = [
        ("not an image", form, multipart("notes.txt", b"hello, not an image")),
        ("blank image", form, multipart("blank.png", png(Image.new("L", (50, 50), 255)))),
        ("truncated png", form, multipart("cut.png", seven[:300])),
        ("wrong form field", form, multipart("seven.png", seven, field="image")),
        ("invalid json", "application/json", b"{not json"),
        ("wrong shape", "application/json", json.dumps({"pixels": [[0.0] * 27] * 28}).encode()),
        ("deeply nested json", "application/json", b'{"pixels": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
        ("wrong content type", "application/xml", b"<xml/>"),
    ]
    return good, bad


def server_rss_mb(server):
    import psutil

    process = psutil.Process(server.pid)
    return round(sum(p.memory_info().rss for p in [process, *process.children(recursive=True)]) / 2**20)


async def run_level(url, clients, requests, bad_share, timeout):
    import aiohttp

    good, bad = request_kinds()
    every = round(1 / bad_share) if bad_share else 0
    plan = [bad[(i // every) % len(bad)] if every and i % every == every - 1 else good for i in range(requests)]
    statuses, latencies, errors = Counter(), [], Counter()
    next_request = iter(range(requests))
    deadline = time.perf_counter() + timeout

    async def client(session):
        for i in next_request:
            if time.perf_counter() > deadline:
                return
            name, content_type, body = plan[i]
            start = time.perf_counter()
            try:
                async with session.post(
                    f"{url}/predict", data=body, headers={"content-type": content_type}
                ) as response:
                    await response.read()
                    statuses[response.status] += 1
                    if name == "good" and response.status != 200:
                        errors[f"good request answered {response.status}"] += 1
            except aiohttp.ClientError as e:
                errors[type(e).__name__] += 1
                continue
            latencies.append(time.perf_counter() - start)

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        seconds = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {
        "clients": clients,
        "requests": sum(statuses.values()),
        "seconds": round(seconds, 2),
        "requests_per_second": round(sum(statuses.values()) / seconds, 1),
        "ms_p50": round(float(np.percentile(ms, 50)), 2),
        "ms_p95": round(float(np.percentile(ms, 95)), 2),
        "ms_p99": round(float(np.percentile(ms, 99)), 2),
        "ms_max": round(float(ms.max()), 2),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "status_5xx": sum(v for k, v in statuses.items() if k >= 500),
        "errors": dict(errors),
    }


def in_process_latency(model, samples=500):
    """One image through the serving graph and through a plain Keras call, in this process:
    p50 milliseconds of each (their ratio is what the traced graph saves)."""
    import pipeline  # noqa: F401  (quiets TensorFlow before it loads)
    from pipeline.serving.predictor import Predictor

    predictor = Predictor(model)
    image = np.zeros((1, 28, 28), np.float32)
    image[0, 6:22, 12:16] = 1.0  # a "1"
    result = {}
    for name, call in [
        ("traced_graph", lambda: predictor.probabilities(image)),
        ("keras_call", lambda: np.asarray(predictor.model(image[..., None], training=False))),
    ]:
        timings = []
        for _ in range(samples + 20):
            start = time.perf_counter()
            call()
            timings.append(time.perf_counter() - start)
        result[f"{name}_ms_p50"] = round(float(np.median(timings[20:])) * 1000, 3)
    return result


def load_test(model, workers, concurrency, requests, bad_share, timeout=300):
    import httpx

    latency = in_process_latency(model)
    print(f"bench api: one image in-process {json.dumps(latency)}", flush=True)
    server, url = serve_in_subprocess(model, workers)
    try:
        # Warm up every worker's graph and the client's connections before measuring.
        asyncio.run(run_level(url, max(concurrency), 200, 0, timeout))
        report = {
            "model": model,
            "workers": workers,
            "bad_share": bad_share,
            "in_process_one_image": latency,
            "rss_mb_before": server_rss_mb(server),
            "levels": [],
        }
        for clients in concurrency:
            level = asyncio.run(run_level(url, clients, requests, bad_share, timeout))
            print(f"bench api: {json.dumps(level)}", flush=True)
            report["levels"].append(level)
        report["rss_mb_after"] = server_rss_mb(server)
        report["health_after"] = httpx.get(f"{url}/health", timeout=5).status_code
        return report
    finally:
        server.terminate()
        server.wait(60)
