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
    by_kind, sure, sure_right = {}, 0, 0
    for kind, samples in sets.items():
        readings = [(text, segment.read(image, graph)) for image, text, _ in samples]
        by_kind[kind] = float(np.mean([r.text == text for text, r in readings]))
        sure += sum(r.sure for _, r in readings)
        sure_right += sum(r.sure and r.text == text for text, r in readings)
    return {
        "mean_string_accuracy": float(np.mean(list(by_kind.values()))),
        "by_kind": by_kind,
        "sure_share": sure / sum(len(s) for s in sets.values()),
        "sure_accuracy": sure_right / sure if sure else None,
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
