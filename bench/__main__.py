"""Benchmark: our CNN and MLP (default params.yaml) over several seeds, against the keras-io
"simple MNIST convnet", all trained in this one process.

    ./dev run python -m bench                        # seeds 1 2 3 of cnn and mlp, keras-io once
    ./dev run python -m bench --seeds 1 --models cnn --val-only --set cnn.dropout=0.4
    ./dev run python -m bench --api                  # serving: runtimes, CLI and API (bench/load.py)

For each model and seed: validation accuracy, test accuracy and errors, training seconds, batch
inference images/s, single-image latency (p50, p95); then per model the mean, standard deviation
and minimum, and each time's ratio to the keras-io recipe's. The JSON goes to reports/benchmark.json.

Recipes are compared on validation only: `--val-only` (what a sweep of variants uses) never reads
the test split, and `--set KEY=VALUE` tries a change to params.yaml without editing it. Nothing in
models/ or the MLflow store is touched. A script, not a test: timings depend on the machine's load.
"""

import argparse
import json
import os
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import numpy as np
import yaml

import pipeline  # noqa: F401  (quiets TensorFlow before it loads)
from pipeline import evaluate
from pipeline.core import params as params_module
from pipeline.core import training
from pipeline.core.files import load_arrays, write_json
from pipeline.core.graph import convert
from pipeline.core.layout import PROCESSED_DIR
from pipeline.core.shifts import corruptions
from pipeline.core.trust import confidence

OUT = "reports/benchmark.json"
API_OUT = "reports/benchmark_api.json"
LATENCY_SAMPLES = 300


def kerasio_recipe(data, seed):
    """keras-io's simple MNIST convnet, as published: 15 epochs, batch 128, validation_split 0.1."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input(shape=(28, 28, 1)),
            layers.Conv2D(32, kernel_size=(3, 3), activation="relu"),
            layers.MaxPooling2D(pool_size=(2, 2)),
            layers.Conv2D(64, kernel_size=(3, 3), activation="relu"),
            layers.MaxPooling2D(pool_size=(2, 2)),
            layers.Flatten(),
            layers.Dropout(0.5),
            layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(loss="categorical_crossentropy", optimizer="adam", metrics=["accuracy"])
    # The recipe trains on all 60,000 training images and holds out the last 10% itself.
    x = np.concatenate([data["x_train"], data["x_val"]])
    y = np.concatenate([data["y_train"], data["y_val"]])
    start = time.perf_counter()
    model.fit(x, y, batch_size=128, epochs=15, validation_split=0.1, verbose=2)
    return model, time.perf_counter() - start, 15


def ours(kind, params, data):
    model_params = params.model(kind)
    training.seed_everything(params.seed)
    model = training.compiled_model(model_params, params.epochs, len(data["x_train"]))
    rows, seconds = training.fit(
        model, model_params, data, params.epochs, params.seed, params.shifts.strengths, to_mlflow=False
    )
    return model, seconds, len(rows)


def params_with(overrides, seed):
    """params.yaml with `KEY=VALUE` overrides (dotted keys, YAML values) and the given seed."""
    pairs = (override.partition("=") for override in overrides)
    return params_module.load(overrides={**{key: yaml.safe_load(value) for key, _, value in pairs}, "seed": seed})


WARMUP_CALLS = 20  # the first calls trace graphs and fill caches; they are not what a user waits for


def timed_ms(call, count):
    """Run call(i) for i in range(WARMUP_CALLS + count); the milliseconds of the last `count`."""
    timings = []
    for i in range(WARMUP_CALLS + count):
        start = time.perf_counter()
        call(i)
        timings.append((time.perf_counter() - start) * 1000)
    return np.array(timings[WARMUP_CALLS:])


def single_image_latency(model, x_test):
    """Milliseconds to answer one image through the traced graph (the model alone; `--api` measures
    what serving runs)."""
    infer = convert.serving_function(model)
    timings = timed_ms(lambda i: infer(x_test[i : i + 1])["probabilities"].numpy(), LATENCY_SAMPLES)
    return float(np.percentile(timings, 50)), float(np.percentile(timings, 95))


def measure(model, seconds, epochs, data, params, val_only, corrupted_val=None):
    """corrupted_val: the robustness stage's corruptions of the validation images, what augmentation
    is chosen by; None for a recipe that trained on the validation images (no validation metrics)."""
    batch_size = params.evaluate.batch_size
    result = {
        "train_seconds": round(seconds, 1),
        "seconds_per_epoch": round(seconds / epochs, 1),
        "epochs": epochs,
        "params": model.count_params(),
    }
    if corrupted_val is not None:
        scorecard, temperature, threshold = confidence.validation_scorecard(
            model, data["x_val"], data["y_val"].argmax(1), corrupted_val, params.calibrate.accepted_accuracy, batch_size
        )
        per_copy = {f"val_corrupted_{name}_accuracy": name for name in corrupted_val}
        result.update({k: v for k, v in scorecard.items() if k not in per_copy})
        result["val_corrupted"] = {name: scorecard[key] for key, name in per_copy.items()}
    if val_only:
        return result
    labels = data["y_test"].argmax(1)
    probabilities, images_per_second = evaluate.predict_timed(model, data["x_test"], batch_size)
    summary, _, _ = evaluate.score(probabilities, labels)
    p50, p95 = single_image_latency(model, data["x_test"])
    if corrupted_val is not None:
        # As evaluate does: the test answers under the temperature and threshold fitted on validation.
        calibrated = confidence.with_temperature(probabilities, temperature)
        selective = confidence.selective_scores(calibrated, labels, threshold)
        result["test_not_sure_coverage"] = selective["coverage"]
        result["test_accepted_accuracy"] = selective["accepted_accuracy"]
    return {
        **result,
        "test_accuracy": summary["accuracy"],
        "test_errors": summary["errors"],
        "batch_images_per_second": round(images_per_second),
        "single_image_ms_p50": round(p50, 2),
        "single_image_ms_p95": round(p95, 2),
    }


def spread(runs):
    """Mean, standard deviation and minimum of each accuracy, and the mean of the timings."""
    out = {}
    for key in (
        "val_accuracy",
        "val_not_sure_coverage",
        "val_risk_coverage_area",
        "val_corrupted_mean_accuracy",
        "test_accuracy",
        "test_errors",
        "test_not_sure_coverage",
        "train_seconds",
        "batch_images_per_second",
        "single_image_ms_p50",
    ):
        values = [r[key] for r in runs if key in r]
        if values:
            out[key] = {
                "mean": float(f"{statistics.mean(values):.5g}"),  # significant digits: some are ~1e-4
                "min": min(values),
                "max": max(values),
                "sd": float(f"{statistics.stdev(values):.3g}") if len(values) > 1 else 0.0,
            }
    return out


def machine():
    """The machine a benchmark ran on, as its JSON records it. An "AMD EPYC" with AVX-512 and one
    without pick other TensorFlow kernels (other draws, other speeds), so the CPU family, model and
    widest vector unit are named too."""
    info = {}
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    cpu = info.get("model name", platform.processor())
    if "cpu family" in info:
        flags = info.get("flags", "").split()
        vectors = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
        cpu += f" (family {info['cpu family']} model {info['model']}, {vectors})"
    return f"{os.cpu_count()} cores, {cpu}, CPU only, {platform.machine()}"


def model_of(path):
    """A model file as a benchmark's JSON names it: its path, its md5, and whether it is the one
    the committed dvc.lock records (git's, not the working copy's, which a local `./dev repro`
    rewrites) or another draw, so that numbers measured on a model trained elsewhere say so."""
    import hashlib
    import subprocess

    md5 = hashlib.md5(Path(path).read_bytes()).hexdigest()
    committed = subprocess.run(["git", "show", "HEAD:dvc.lock"], capture_output=True, text=True)
    if committed.returncode != 0:  # not a git clone: nothing to compare with
        return f"{path} (md5 {md5})"
    outs = {
        out["md5"]
        for stage in yaml.safe_load(committed.stdout)["stages"].values()
        for out in stage.get("outs", [])
        if out.get("path") == str(path)
    }
    whose = "the committed run's (dvc.lock)" if md5 in outs else "another draw than the committed run's (dvc.lock)"
    return f"{path} (md5 {md5}: {whose})"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=["kerasio", "cnn", "mlp"], default=["kerasio", "cnn", "mlp"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3], help="seeds of our models (default 1 2 3)")
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="params.yaml overrides, e.g. cnn.dropout=0.4"
    )
    parser.add_argument("--val-only", action="store_true", help="compare on validation; never read the test split")
    parser.add_argument("--out", default=OUT, help=f"where the JSON goes (default {OUT})")
    api = parser.add_argument_group("serving benchmark (--api): see bench/load.py")
    api.add_argument("--api", action="store_true", help="measure serving (runtimes, CLI, API) instead of training")
    api.add_argument("--requests", type=int, default=2000, help="requests per API level (default 2000)")
    api.add_argument("--model", default="models/cnn.keras")
    args = parser.parse_args(argv)
    if args.api:
        from bench.load import load_test

        started = time.perf_counter()
        report = {
            "date": date.today().isoformat(),
            "machine": machine(),
            **load_test(args.model, args.requests),
        }
        report["wall_seconds"] = round(time.perf_counter() - started)
        write_json(API_OUT if args.out == OUT else args.out, report)
        print(json.dumps(report, indent=2))
        return
    splits = ["train", "val"] + ([] if args.val_only else ["test"])
    data = load_arrays(PROCESSED_DIR, [f"{xy}_{s}" for s in splits for xy in "xy"])
    started = time.perf_counter()

    # The seed does not change the shifted copies (shifts.seed does), so one set serves every run;
    # keras-io's recipe trains on the validation images, so it gets none.
    corrupted_val = None
    if set(args.models) - {"kerasio"}:
        corrupted_val = corruptions.corrupted_copies(data["x_val"], params_with(args.set, args.seeds[0]))

    results = {}
    for name in args.models:
        for seed in [args.seeds[0]] if name == "kerasio" else args.seeds:
            params = params_with(args.set, seed)
            print(f"bench {name} seed {seed}: training ...", flush=True)
            model, seconds, epochs = kerasio_recipe(data, seed) if name == "kerasio" else ours(name, params, data)
            own_val = None if name == "kerasio" else corrupted_val
            result = {
                "seed": seed,
                **measure(model, seconds, epochs, data, params, args.val_only, own_val),
            }
            print(f"bench {name} seed {seed}: {json.dumps(result)}", flush=True)
            results.setdefault(name, {"runs": []})["runs"].append(result)
    for entry in results.values():
        entry["summary"] = spread(entry["runs"])
    if "kerasio" in results:
        base = results["kerasio"]["summary"]["train_seconds"]["mean"]
        for name in results.keys() - {"kerasio"}:
            results[name]["train_time_ratio_to_kerasio"] = round(
                results[name]["summary"]["train_seconds"]["mean"] / base, 2
            )

    report = {
        "date": date.today().isoformat(),
        "machine": machine(),
        "overrides": args.set,
        "epochs": params.epochs,
        "seeds": args.seeds,
        "val_only": args.val_only,
        "wall_seconds": round(time.perf_counter() - started),
        "results": results,
    }
    write_json(args.out, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
