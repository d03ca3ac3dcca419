"""How long reading one number takes in-process on ONNX Runtime, as `digits read` and `POST /read`
read it (one image at a time), one run, JSON in reports/reader_speed.json:

    ./dev run python -m bench.reader_speed [--numbers 200]

5-digit numbers of each spacing kind written from *validation* digits (pipeline/core/reading/
numbers.py), each read from its uint8 image to the answer: the line reader (models/reader.onnx with
models/cnn.onnx, its verifier and its second look, models/mlp.onnx: the default) and the segmenter
(`--reader segment`). Reported: p50 and p95 ms per number over all kinds (and for the line reader,
apart for the numbers it marks sure), and the line reader's time as a ratio of the segmenter's in
the same run.
"""

import argparse
import json
import time
from datetime import date

import numpy as np

from bench.__main__ import machine, model_of
from pipeline.core.files import load_arrays, write_json
from pipeline.core.graph.runtime import OnnxGraph, ReaderGraph, verifier_file
from pipeline.core.layout import PROCESSED_DIR, onnx_file
from pipeline.core.reading import numbers, segment, sequence

OUT = "reports/reader_speed.json"


def percentiles(spent):
    return {"p50_ms": round(float(np.percentile(spent, 50)), 2), "p95_ms": round(float(np.percentile(spent, 95)), 2)}


def timed_ms(read, images, warmup=20):
    """Each image's reading and the ms it took, after `warmup` reads."""
    for image in images[:warmup]:
        read(image)
    readings, spent = [], []
    for image in images:
        begin = time.perf_counter()
        readings.append(read(image))
        spent.append((time.perf_counter() - begin) * 1000)
    return readings, np.array(spent)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.reader_speed", description=__doc__.splitlines()[0])
    parser.add_argument("--numbers", type=int, default=200, help="numbers of each spacing kind (default 200)")
    parser.add_argument("--out", default=OUT)
    args = parser.parse_args(argv)
    data = load_arrays(PROCESSED_DIR, ["x_val", "y_val"])
    rng = np.random.default_rng(0)
    images = [
        image
        for kind in numbers.KINDS
        for image, _, _ in numbers.sample(data["x_val"], data["y_val"], [5], kind, args.numbers, rng)
    ]
    digits, reader = OnnxGraph(onnx_file("cnn")), ReaderGraph(onnx_file("reader"))
    readings, by_line = timed_ms(lambda image: sequence.read(image, reader, digits), images)
    _, by_cuts = timed_ms(lambda image: segment.read(image, digits), images)
    sure = np.array([reading.sure for reading in readings])
    measured = {
        "line reader": percentiles(by_line),
        "line reader, numbers it marks sure": {"share": round(float(sure.mean()), 3), **percentiles(by_line[sure])},
        "line reader, the others": percentiles(by_line[~sure]),
        "segmenter": percentiles(by_cuts),
    }
    report = {
        "date": date.today().isoformat(),
        "machine": machine(),
        "models": [
            model_of(file)
            for file in (
                onnx_file("reader"),
                verifier_file(onnx_file("reader"), ".onnx"),
                *map(onnx_file, ("cnn", "mlp")),
            )
        ],
        "numbers": len(images),
        **measured,
        "line_reader_over_segmenter_p50": round(measured["line reader"]["p50_ms"] / measured["segmenter"]["p50_ms"], 2),
    }
    write_json(args.out, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
