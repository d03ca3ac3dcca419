"""Benchmark of the scale-out wing, in one run on this machine (JSON: reports/benchmark_ray.json):

    ./dev run python -m bench.ray [--sweeps 1:1,2 default:1] [--repeats 2] [--images 10000 100000]

1. A sweep through Ray (`digits sweep`, local Ray, one trial at a time with every CPU) against the
   same trials trained in this process, one after another: the time ratio (Ray's overhead). Both
   sides count everything a user waits for: start-up, data, training and the final metrics. Sizes
   are EPOCHS:SEEDS; `default` is params.yaml's epochs (the default recipe's size). Each size runs
   --repeats times each way, in the order AB BA ..., so that a drift of the machine's speed falls
   on both sides alike; the ratio is of the summed times.
2. Batch scoring of the MNIST test images as PNG files: `digits score` (Ray Data, one node) against
   `digits predict`, both as a user runs them (process start and model load included), at each
   --images size (more than 10,000 repeat the test set). Ray's fixed cost is measured alone too:
   `digits score` of 10 images on the running node.
3. `digits score` on one Ray node against two nodes on this same machine. Both share its cores, so
   this measures the cost of a second node's processes, not a speed-up.

Ray runs inside a network namespace this script creates (as root), where only loopback exists.
"""

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

from bench.__main__ import machine
from bench.servers import loopback_only_network, start_ray_node, stop_ray_nodes, wait_for_ray_nodes, write_pngs
from pipeline.core import params as params_module

OUT = "reports/benchmark_ray.json"
BIN = Path(sys.executable).parent


def timed(command, env=None):
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode not in (0,):
        raise RuntimeError(f"{' '.join(map(str, command))} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return seconds


def in_process_trials(epochs, seeds):
    """The sweep's trials without Ray: the same training and final metrics, one after another."""
    code = f"""
import time
import numpy as np
import pipeline
from pipeline.core import training
from pipeline.core.trust import confidence
from pipeline.core.shifts import corruptions
from pipeline.core import params as params_module
from pipeline.core.files import load_arrays
from pipeline.core.layout import PROCESSED_DIR
start = time.perf_counter()
data = load_arrays(PROCESSED_DIR, ["x_train", "y_train", "x_val", "y_val"])
corrupted = corruptions.corrupted_copies(data["x_val"], params_module.load())
for seed in {seeds}:
    params = params_module.load(overrides={{"epochs": {epochs}, "seed": seed}})
    training.seed_everything(seed)
    model = training.compiled_model(params.cnn, params.epochs, len(data["x_train"]))
    training.fit(model, params.cnn, data, params.epochs, seed, params.shifts.strengths, to_mlflow=False, verbose=0)
    confidence.validation_scorecard(
        model, data["x_val"], data["y_val"].argmax(1), corrupted, params.calibrate.accepted_accuracy, 1000
    )
print(time.perf_counter() - start)
"""
    return timed([sys.executable, "-c", code])


def ray_sweep(epochs, seeds, cpus):
    command = [BIN / "digits", "sweep", "--seeds", *map(str, seeds), "--set", f"epochs={epochs}"]
    command += ["--cpus-per-trial", str(cpus), "--name", f"bench-ray-{epochs}ep", "--out", "/tmp/bench-sweep.csv"]
    return timed(command, env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})


def compare_sweeps(size, repeats, cpus):
    epochs, _, seeds = size.partition(":")
    epochs = params_module.load().epochs if epochs == "default" else int(epochs)
    seeds = [int(seed) for seed in seeds.split(",")]
    times = {"in_process": [], "ray": []}
    for repeat in range(repeats):
        order = ["in_process", "ray"] if repeat % 2 == 0 else ["ray", "in_process"]
        for side in order:
            seconds = in_process_trials(epochs, seeds) if side == "in_process" else ray_sweep(epochs, seeds, cpus)
            times[side].append(round(seconds, 1))
    result = {
        "epochs": epochs,
        "seeds": seeds,
        "in_process_seconds": times["in_process"],
        "ray_seconds": times["ray"],
        "ratio": round(sum(times["ray"]) / sum(times["in_process"]), 3),
    }
    print(json.dumps(result), flush=True)
    return result


def compare_scoring(images, cpus):
    """`digits predict` against `digits score` on `images` PNGs: a Ray started by the command,
    then running clusters of one and two nodes."""
    folder = Path(tempfile.mkdtemp(prefix="bench-pngs-"))
    few = Path(tempfile.mkdtemp(prefix="bench-pngs-"))
    try:
        test = np.load("data/processed/x_test.npy")
        write_pngs(np.resize(test, (images, *test.shape[1:])), folder)
        write_pngs(test[:10], few)
        model = ["--model", "models/cnn.keras"]
        score = [BIN / "digits", "score", "--out", "/tmp/bench-score.csv", *model]
        cli = timed([BIN / "digits", "predict", folder, "--format", "csv", *model])
        own = timed([*score, folder])
        scoring = {"images": images, "cli_seconds": round(cli, 1), "ray_own_seconds": round(own, 1)}

        env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
        temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
        for count in (1, 2):
            nodes, address = [], "127.0.0.1:6390"
            log = open(os.devnull, "w")
            try:
                share = str(max(1, cpus // count))
                nodes.append(start_ray_node(["--head", "--port", "6390", "--num-cpus", share], env, temp_dir, log))
                wait_for_ray_nodes(address, env, 1)
                if count == 2:
                    nodes.append(start_ray_node(["--address", address, "--num-cpus", share], env, temp_dir, log))
                    wait_for_ray_nodes(address, env, 2)
                on_cluster = dict(env, RAY_ADDRESS=address)
                if count == 1:
                    # The first job on a new cluster also starts Ray Data's own helper actors; a
                    # running cluster has them. 10 images: the fixed cost alone, on a warm cluster.
                    scoring["cluster_first_job_10_images_seconds"] = round(timed([*score, few], on_cluster), 1)
                    scoring["cluster_10_images_seconds"] = round(timed([*score, few], on_cluster), 1)
                scoring[f"cluster_{count}_node_seconds"] = round(timed([*score, folder], on_cluster), 1)
            finally:
                stop_ray_nodes(nodes)
                log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(few, ignore_errors=True)
    scoring["ray_own_to_cli_throughput"] = round(cli / own, 3)
    scoring["cluster_1_node_to_cli_throughput"] = round(cli / scoring["cluster_1_node_seconds"], 3)
    scoring["two_to_one_node_time"] = round(scoring["cluster_2_node_seconds"] / scoring["cluster_1_node_seconds"], 3)
    print(json.dumps(scoring), flush=True)
    return scoring


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.ray", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sweeps", nargs="*", default=["1:1,2", "default:1"], help="EPOCHS:SEEDS (default 1:1,2 default:1; none: skip)"
    )
    parser.add_argument("--repeats", type=int, default=2, help="runs of each sweep size each way (default 2)")
    parser.add_argument(
        "--images", type=int, nargs="*", default=[10000, 100000], help="PNGs to score (default 10000 100000)"
    )
    parser.add_argument("--out", default=OUT)
    args = parser.parse_args(argv)
    cpus = os.cpu_count()
    report = {"date": date.today().isoformat(), "machine": machine()}
    started = time.perf_counter()
    with loopback_only_network():
        report["sweep"] = [compare_sweeps(size, args.repeats, cpus) for size in args.sweeps]
        report["scoring"] = [compare_scoring(images, cpus) for images in args.images]
    report["wall_seconds"] = round(time.perf_counter() - started)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
