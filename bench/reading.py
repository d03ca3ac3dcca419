"""How the number reader's method was chosen: variants of pipeline/core/reading/segment.py compared on
numbers written from *training* digits (the read_eval stage measures on test digits), one run,
JSON in reports/reading_choice.json:

    ./dev run python -m bench.reading [--numbers 200] [--variant NAME KEY=VALUE ...]

Each variant overrides some of the reader's constants (segment.SPLIT_COST=0.5 ...). The rule,
written before the runs: the variant with the highest string accuracy averaged over the four
spacing kinds wins, unless its sure readings are less often right than the current one's.
"""

import argparse
import json
import time
from datetime import date
from pathlib import Path

import numpy as np

from bench.__main__ import machine
from pipeline import read_eval
from pipeline.core.files import load_arrays
from pipeline.core.graph.runtime import OnnxGraph
from pipeline.core.layout import PROCESSED_DIR, onnx_file
from pipeline.core.reading import numbers, segment

OUT = "reports/reading_choice.json"
VARIANTS = {
    "current": {},
    "no splitting": {"WIDE_FROM": 99.0, "HEAVY_FROM": 99.0, "SPLIT_COST": 99.0},
    "split only what the model doubts": {"WIDE_FROM": 99.0, "HEAVY_FROM": 99.0},
    "dearer splits": {"SPLIT_COST": 1.0},
    "only wider pieces tried": {"WIDE_FROM": 1.05, "HEAVY_FROM": 0.5},
    "gate counts less": {"NOT_A_DIGIT_COST": 2.0},
    "cuts through ink cost nothing": {"CUT_COST": 0.0},
}


def measure(sets, graph):
    """read_eval's scores of each kind, and over all kinds."""
    readings = {kind: [(text, segment.read(image, graph)) for image, text, _ in s] for kind, s in sets.items()}
    pooled = read_eval.scores([pair for pairs in readings.values() for pair in pairs])
    by_kind = {kind: read_eval.scores(pairs)["string_accuracy"] for kind, pairs in readings.items()}
    return {
        "mean_string_accuracy": float(np.mean(list(by_kind.values()))),
        "by_kind": by_kind,
        "sure_share": pooled["sure_share"],
        "sure_accuracy": pooled["sure_accuracy"],
    }


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.reading", description=__doc__.splitlines()[0])
    parser.add_argument("--numbers", type=int, default=200, help="5-digit numbers per spacing kind (default 200)")
    parser.add_argument("--variant", nargs="+", action="append", metavar=("NAME", "KEY=VALUE"), default=[])
    parser.add_argument("--out", default=OUT)
    args = parser.parse_args(argv)
    variants = dict(VARIANTS)
    for name, *settings in args.variant:
        variants[name] = {key: float(value) for key, value in (s.split("=", 1) for s in settings)}
    data = load_arrays(PROCESSED_DIR, ["x_train", "y_train"])
    rng = np.random.default_rng(0)
    x, y = data["x_train"], data["y_train"]
    sets = {kind: numbers.sample(x, y, [5], kind, args.numbers, rng) for kind in numbers.KINDS}
    graph = OnnxGraph(onnx_file("cnn"))
    defaults = {key: getattr(segment, key) for settings in variants.values() for key in settings}
    report = {"date": date.today().isoformat(), "machine": machine(), "numbers_per_kind": args.numbers, "variants": {}}
    for name, settings in variants.items():
        for key, value in {**defaults, **settings}.items():
            setattr(segment, key, value)
        start = time.perf_counter()
        scores = measure(sets, graph)
        scores["settings"], scores["seconds"] = settings, round(time.perf_counter() - start, 1)
        report["variants"][name] = scores
        print(json.dumps({name: scores}), flush=True)
    current = report["variants"]["current"]["sure_accuracy"] or 0
    eligible = {n: v for n, v in report["variants"].items() if (v["sure_accuracy"] or 0) >= current}
    report["chosen"] = max(eligible, key=lambda n: eligible[n]["mean_string_accuracy"])
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"chosen: {report['chosen']}")


if __name__ == "__main__":
    main()
