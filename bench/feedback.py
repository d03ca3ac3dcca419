"""POST /feedback under load and under `kill -9`, in one run on this machine (JSON:
reports/feedback.json):

    ./dev run python -m bench.feedback [--model models/cnn.keras] [--requests 5000] [--clients 64] [--kills 20]

1. `digits serve --feedback DIR --workers 2`: `--clients` clients send `--requests` corrections,
   10 % of them bad (a label that is no digit, a number for a digit, a blank image, not an image,
   broken JSON, no label, a wrong content type). Responses by status, and whether every correction
   answered 201 is in DIR exactly once: its row in labels.csv and its image, and no row else.
2. `--kills` times: `digits serve --feedback DIR` (one process) gets corrections from 8 clients and
   is killed with SIGKILL after 0.5-2 s, then started again on the same DIR. After each kill,
   labels.csv parses and every correction answered 201 is in it.
Bounded: every level stops after `timeout` seconds; servers are stopped at the end. The clients
are one address (127.0.0.1), so the per-client rate is lifted for the run.
"""

import argparse
import asyncio
import json
import os
import signal
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

from bench.load import png
from bench.servers import draw_digit_seven, serve_in_subprocess
from pipeline.serving import review

UNLIMITED = ["--feedback-per-minute", "100000000"]


def corrections():
    """(name, content type, body, good?) of a good correction and of the bad ones mixed in."""
    import aiohttp
    from PIL import Image

    seven = png(draw_digit_seven(120, 120, offset=(20, 10)))

    def form(image, name="seven.png", **fields):
        data = aiohttp.FormData()
        if image is not None:
            data.add_field("file", image, filename=name, content_type="application/octet-stream")
        for key, value in fields.items():
            data.add_field(key, value)
        return data

    good = ("good", None, lambda: form(seven, label="7", shown="1", visit="bench"), True)
    pixels = [[0.0] * 40 for _ in range(20)]
    bad = [
        ("label not a digit", None, lambda: form(seven, label="seven"), False),
        ("a number for a digit", None, lambda: form(seven, label="71"), False),
        ("blank image", None, lambda: form(png(Image.new("L", (50, 50), 255)), label="7"), False),
        ("not an image", None, lambda: form(b"hello", name="notes.txt", label="7"), False),
        ("no label", None, lambda: form(seven), False),
        ("invalid json", "application/json", lambda: b"{not json", False),
        ("blank pixels", "application/json", lambda: json.dumps({"pixels": pixels, "label": "7"}), False),
        ("wrong content type", "application/xml", lambda: b"<xml/>", False),
    ]
    return good, bad


async def send(url, plan, clients, deadline, accepted, statuses, errors):
    """POST the planned corrections from `clients` concurrent clients until done or `deadline`;
    the names of the files answered 201 go to `accepted`."""
    import aiohttp

    next_request = iter(range(len(plan)))

    async def client(session):
        for i in next_request:
            if time.monotonic() > deadline:
                return
            name, content_type, body, _ = plan[i]
            headers = {"content-type": content_type} if content_type else None
            try:
                async with session.post(f"{url}/feedback", data=body(), headers=headers) as response:
                    answer = await response.json(content_type=None)
                    statuses[response.status] += 1
                    if response.status == 201:
                        accepted.append(answer["file"])
                    elif name == "good":
                        errors[f"good correction answered {response.status}"] += 1
            except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as e:
                errors[type(e).__name__] += 1

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))


def plan_of(requests, bad_share, seed):
    good, bad = corrections()
    rng = np.random.default_rng(seed)
    return [bad[rng.integers(len(bad))] if rng.random() < bad_share else good for _ in range(requests)]


def folder_check(folder, accepted):
    """Whether every accepted correction is in the folder exactly once, and nothing else is."""
    rows = review.read_rows(folder)  # raises if labels.csv does not parse
    files = [r["file"] for r in rows]
    images = {
        f"{review.IMAGES}/{p.name}" for p in (Path(folder) / review.IMAGES).iterdir() if not p.name.startswith(".")
    }
    return {
        "rows": len(rows),
        "accepted": len(accepted),
        "accepted_missing": len(set(accepted) - set(files)),
        "rows_not_accepted": len(set(files) - set(accepted)),
        "rows_twice": len(files) - len(set(files)),
        "rows_without_image": len(set(files) - images),
        "rows_torn": sum(None in r.values() or r["kind"] not in review.KINDS for r in rows),
        "labels_parse": True,
    }


def load(model, folder, requests=5000, clients=64, bad_share=0.1, workers=2, timeout=300, seed=0):
    """Level 1 of the module docstring."""
    process, url = serve_in_subprocess(model, workers, extra=["--feedback", str(folder), *UNLIMITED])
    accepted, statuses, errors = [], Counter(), Counter()
    try:
        started = time.monotonic()
        plan = plan_of(requests, bad_share, seed)
        asyncio.run(send(url, plan, clients, started + timeout, accepted, statuses, errors))
        seconds = time.monotonic() - started
    finally:
        process.terminate()
        process.wait(timeout=60)
    return {
        "clients": clients,
        "requests": sum(statuses.values()),
        "bad_planned": sum(not good for *_, good in plan),
        "seconds": round(seconds, 2),
        "requests_per_second": round(sum(statuses.values()) / seconds, 1),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "status_5xx": sum(v for k, v in statuses.items() if k >= 500),
        "errors": dict(errors),
        **folder_check(folder, accepted),
    }


def kills(model, folder, repeats=20, clients=8, seed=0):
    """Level 2 of the module docstring: one entry per kill."""
    rng = np.random.default_rng(seed)
    results, accepted = [], []
    for _ in range(repeats):
        process, url = serve_in_subprocess(model, 1, extra=["--feedback", str(folder), *UNLIMITED])
        statuses, errors = Counter(), Counter()
        plan = plan_of(100_000, 0.1, int(rng.integers(1 << 30)))
        wait = float(rng.uniform(0.5, 2.0))
        killer = threading.Timer(wait, os.kill, (process.pid, signal.SIGKILL))
        killer.start()
        asyncio.run(send(url, plan, clients, time.monotonic() + wait + 10, accepted, statuses, errors))
        killer.join()
        process.wait(timeout=30)
        check = folder_check(folder, accepted)
        results.append({"killed_after_s": round(wait, 2), "answered_201": statuses[201], **check})
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/cnn.keras")
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--out", default="reports/feedback.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        loaded = load(args.model, Path(tmp) / "load", args.requests, args.clients)
        print(f"bench.feedback: load {json.dumps(loaded)}", flush=True)
        killed = kills(args.model, Path(tmp) / "kills", args.kills)
    report = {
        "load": loaded,
        "kills": {
            "repeats": len(killed),
            "labels_always_parse": all(k["labels_parse"] for k in killed),
            "accepted_missing_after_any_kill": max(k["accepted_missing"] for k in killed),
            "rows_twice": max(k["rows_twice"] for k in killed),
            "answered_201_before_kills": sum(k["answered_201"] for k in killed),
            "each": killed,
        },
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"bench.feedback: kills {json.dumps(report['kills'] | {'each': '...'})}; wrote {args.out}")


if __name__ == "__main__":
    main()
