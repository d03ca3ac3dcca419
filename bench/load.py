"""Serving benchmark, in one run on this machine (JSON: reports/benchmark_api.json):

    ./dev run python -m bench --api [--model models/cnn.keras] [--requests 2000]

1. One image in-process (model + calibration + "not a digit" gate), p50 ms, on each runtime.
2. The two runtimes' answers on all 10,000 MNIST test images: same digits, same "not a digit",
   the largest difference in a probability.
3. `digits predict one.png` from a cold start, end to end (median of 3), and `digits predict` on
   the 10,000 test images as PNG files: images/s after start (its time less the one-image run's).
4. The API (`digits serve`, ONNX Runtime; 1 and 2 workers): 1 and 32 clients, each client one
   request at a time (POST /predict, a 280x280 PNG of a drawn digit), from this script's Python
   client and, when installed, from Debian's `hey` (compiled: it takes less CPU from the server);
   the server's RSS per worker. Then 64 clients, 10,000 requests, 10 % bad ones (not an image, a
   blank page, broken JSON, pixels of the wrong shape, ...): responses by status, connection
   errors, RSS before and after. The same 32-client level on `--runtime tf`, for the ratio.
Bounded in requests and time: a level stops after `timeout` seconds; servers are stopped at the end.
"""

import asyncio
import csv
import io
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

from bench.servers import draw_digit_seven, serve_in_subprocess, write_pngs


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


def server_rss_mb(server, workers):
    """RSS per worker: every process of the server, over the workers (uvicorn's supervisor of
    several workers is counted too)."""
    import psutil

    process = psutil.Process(server.pid)
    return round(sum(p.memory_info().rss for p in [process, *process.children(recursive=True)]) / 2**20 / workers)


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


def median_ms(call, samples=500, warmup=20):
    timings = []
    for _ in range(warmup + samples):
        begin = time.perf_counter()
        call()
        timings.append(time.perf_counter() - begin)
    return round(float(np.median(timings[warmup:])) * 1000, 3)


def in_process(model, x_test):
    """p50 ms of one image through each runtime, and how their answers on x_test compare."""
    from pipeline.serving.predictor import RUNTIMES, Predictor

    predictors = {runtime: Predictor(model, runtime) for runtime in RUNTIMES}
    image = x_test[:1, ..., 0]
    result = {
        f"{runtime}_one_image_ms_p50": median_ms(lambda p=p: p.predict(image)) for runtime, p in predictors.items()
    }
    answers = {
        runtime: [
            np.concatenate(parts)
            for parts in zip(*(p.predict(x_test[i : i + 256]) for i in range(0, len(x_test), 256)), strict=True)
        ]
        for runtime, p in predictors.items()
    }
    (onnx_probabilities, onnx_flags), (tf_probabilities, tf_flags) = answers["onnx"], answers["tf"]
    result["test_images"] = len(x_test)
    result["same_digit"] = int(np.sum(onnx_probabilities.argmax(1) == tf_probabilities.argmax(1)))
    result["same_not_a_digit"] = int(np.sum(onnx_flags == tf_flags))
    result["max_probability_difference"] = float(np.abs(onnx_probabilities - tf_probabilities).max())
    return result


def command_seconds(command):
    begin = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - begin


def command_line(model, pngs):
    """`digits predict` as a user runs it, on one image and on the folder of test PNGs."""
    from pipeline.serving.predictor import RUNTIMES

    digits = Path(sys.executable).parent / "digits"
    one = sorted(pngs.iterdir())[0]
    result = {}
    for runtime in RUNTIMES:
        base = [digits, "predict", "--model", model, "--runtime", runtime, "--format", "csv"]
        cold = statistics.median(command_seconds([*base, one]) for _ in range(3))
        folder = command_seconds([*base, pngs])
        images = sum(1 for _ in pngs.iterdir())
        result[runtime] = {
            "one_image_seconds": round(cold, 2),
            "folder_images": images,
            "folder_seconds": round(folder, 2),
            "folder_images_per_second_after_start": round(images / (folder - cold)),
        }
    return result


def hey_level(url, clients, requests, body_file, content_type):
    """The same level from `hey`, per request from its CSV output."""
    done = subprocess.run(
        [
            "hey",
            "-n",
            str(requests),
            "-c",
            str(clients),
            "-m",
            "POST",
            "-T",
            content_type,
            "-D",
            body_file,
            "-o",
            "csv",
            f"{url}/predict",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    ms = np.array([float(r["response-time"]) for r in rows]) * 1000
    seconds = max(float(r["offset"]) + float(r["response-time"]) for r in rows)
    statuses = Counter(r["status-code"] for r in rows)
    return {
        "clients": clients,
        "requests": len(rows),
        "requests_per_second": round(len(rows) / seconds, 1),
        "ms_p50": round(float(np.percentile(ms, 50)), 2),
        "ms_p99": round(float(np.percentile(ms, 99)), 2),
        "statuses": dict(statuses),
    }


def api_levels(model, runtime, workers, requests, timeout, with_bad=False):
    good, _ = request_kinds()
    server, url = serve_in_subprocess(model, workers, runtime=runtime)
    try:
        asyncio.run(run_level(url, 32, 300, 0, timeout))  # warm up every worker and the connections
        report = {"runtime": runtime, "workers": workers, "rss_mb_per_worker": server_rss_mb(server, workers)}
        report["python_client"] = [asyncio.run(run_level(url, c, requests, 0, timeout)) for c in (1, 32)]
        if shutil.which("hey"):
            with tempfile.NamedTemporaryFile(suffix=".body") as body:
                body.write(good[2])
                body.flush()
                report["hey"] = [hey_level(url, c, requests, body.name, good[1]) for c in (1, 32)]
        if with_bad:
            before = server_rss_mb(server, workers)
            level = asyncio.run(run_level(url, 64, 10000, 0.1, timeout))
            report["bad_requests"] = {
                **level,
                "rss_mb_per_worker_before": before,
                "rss_mb_per_worker_after": server_rss_mb(server, workers),
            }
        report["health_after"] = httpx.get(f"{url}/health", timeout=5).status_code
        for name, levels in report.items():
            if isinstance(levels, list):
                for level in levels:
                    print(f"bench api {runtime} x{workers} {name}: {json.dumps(level)}", flush=True)
        return report
    finally:
        server.terminate()
        server.wait(60)


def load_test(model, requests, timeout=300):
    x_test = np.load("data/processed/x_test.npy")
    report = {"model": model, "in_process": in_process(model, x_test)}
    print(f"bench api: in-process {json.dumps(report['in_process'])}", flush=True)
    folder = Path(tempfile.mkdtemp(prefix="bench-pngs-"))
    try:
        write_pngs(x_test, folder)
        report["cli"] = command_line(model, folder)
        print(f"bench api: cli {json.dumps(report['cli'])}", flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    report["api"] = [
        api_levels(model, "onnx", 1, requests, timeout),
        api_levels(model, "onnx", 2, requests, timeout, with_bad=True),
        api_levels(model, "tf", 1, requests, timeout),
    ]
    return report
