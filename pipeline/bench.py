"""Benchmark: our CNN and MLP (default params.yaml) against the keras-io "simple MNIST convnet".

    ./dev run python -m pipeline.bench            # all three; needs data/processed (dvc repro preprocess)
    ./dev run python -m pipeline.bench --models kerasio cnn
    ./dev run python -m pipeline.bench --api      # latency of POST /predict with models/cnn.keras

Trains each model in this one process on the real data, then prints JSON with training seconds,
seconds per epoch, test accuracy, batch inference images/s, single-image latency (p50, p95) and
the ratios to the keras-io recipe, and writes it to reports/benchmark.json. Nothing in models/
or the MLflow store is touched. A script, not a test: timings depend on the machine and its load.
"""

import argparse
import json
import os
import platform
import time
from datetime import date

import numpy as np

from pipeline import evaluate, params as params_module, train
from pipeline.files import load_arrays, write_json

OUT = "reports/benchmark.json"
LATENCY_SAMPLES = 300


def kerasio_recipe(data, seed):
    """keras-io's simple MNIST convnet, as published: 15 epochs, batch 128, validation_split 0.1."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input(shape=(28, 28, 1)),
        layers.Conv2D(32, kernel_size=(3, 3), activation="relu"),
        layers.MaxPooling2D(pool_size=(2, 2)),
        layers.Conv2D(64, kernel_size=(3, 3), activation="relu"),
        layers.MaxPooling2D(pool_size=(2, 2)),
        layers.Flatten(),
        layers.Dropout(0.5),
        layers.Dense(10, activation="softmax"),
    ])
    model.compile(loss="categorical_crossentropy", optimizer="adam", metrics=["accuracy"])
    # The recipe trains on all 60,000 training images and holds out the last 10% itself.
    x = np.concatenate([data["x_train"], data["x_val"]])
    y = np.concatenate([data["y_train"], data["y_val"]])
    start = time.perf_counter()
    model.fit(x, y, batch_size=128, epochs=15, validation_split=0.1, verbose=2)
    return model, time.perf_counter() - start, 15


def ours(kind, p, data):
    mp = p.model(kind)
    train.seed_everything(p.seed)
    model = train.compiled_model(mp, p.epochs, len(data["x_train"]))
    rows, seconds = train.fit(model, mp, p, data, to_mlflow=False)
    return model, seconds, len(rows)


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
    """Milliseconds to answer one image, as the API does (a direct call, no predict() set-up)."""
    timings = timed_ms(lambda i: np.asarray(model(x_test[i:i + 1], training=False)), LATENCY_SAMPLES)
    return float(np.percentile(timings, 50)), float(np.percentile(timings, 95))


def measure(name, model, seconds, epochs, x_test, y_test, batch_size):
    probabilities, images_per_second = evaluate.predict_timed(model, x_test, batch_size)
    summary, _, _ = evaluate.evaluate(probabilities, y_test)
    p50, p95 = single_image_latency(model, x_test)
    result = {"train_seconds": round(seconds, 1), "seconds_per_epoch": round(seconds / epochs, 1), "epochs": epochs,
              "test_accuracy": summary["accuracy"], "test_errors": summary["errors"],
              "batch_images_per_second": round(images_per_second), "single_image_ms_p50": round(p50, 2),
              "single_image_ms_p95": round(p95, 2), "params": model.count_params()}
    print(f"bench {name}: {json.dumps(result)}", flush=True)
    return result


def api_latency(requests=300):
    """p50/p95 of POST /predict for one PNG upload, through a real uvicorn server on loopback."""
    import io

    import httpx
    from PIL import Image, ImageDraw

    from pipeline.api import serve_in_background
    from pipeline.predictor import Predictor

    url, server = serve_in_background(Predictor())
    image = Image.new("L", (280, 280), 255)
    ImageDraw.Draw(image).line([(70, 60), (210, 60), (120, 240)], fill=0, width=18)
    png = io.BytesIO()
    image.save(png, format="PNG")
    statuses = []
    with httpx.Client(base_url=url) as client:
        timings = timed_ms(lambda i: statuses.append(
            client.post("/predict", files={"file": ("seven.png", png.getvalue(), "image/png")}).status_code), requests)
    server.should_exit = True
    failures = sum(status != 200 for status in statuses)
    return {"requests": requests, "failures": failures, "ms_p50": round(float(np.percentile(timings, 50)), 2),
            "ms_p95": round(float(np.percentile(timings, 95)), 2), "ms_max": round(float(timings.max()), 2)}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=["kerasio", "cnn", "mlp"], default=["kerasio", "cnn", "mlp"])
    parser.add_argument("--api", action="store_true", help="only measure POST /predict latency (models/cnn.keras)")
    args = parser.parse_args(argv)
    if args.api:
        print(json.dumps({"date": date.today().isoformat(), "api_predict_latency": api_latency()}, indent=2))
        return
    p = params_module.load_or_exit()
    data = load_arrays(train.PROCESSED_DIR, ["x_train", "y_train", "x_val", "y_val", "x_test", "y_test"])
    x_test, y_test = data["x_test"], data["y_test"].argmax(1)

    results = {}
    for name in args.models:
        print(f"bench {name}: training ...", flush=True)
        model, seconds, epochs = kerasio_recipe(data, p.seed) if name == "kerasio" else ours(name, p, data)
        results[name] = measure(name, model, seconds, epochs, x_test, y_test, p.eval_batch_size)

    if "kerasio" in results:
        base = results["kerasio"]
        for name in results.keys() - {"kerasio"}:
            results[name]["train_time_ratio_to_kerasio"] = round(results[name]["train_seconds"] / base["train_seconds"], 2)
            results[name]["accuracy_gain_over_kerasio"] = round(results[name]["test_accuracy"] - base["test_accuracy"], 4)
    report = {"date": date.today().isoformat(), "machine": f"{os.cpu_count()} cores, CPU only, {platform.machine()}",
              "epochs": p.epochs, "results": results}
    write_json(OUT, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
