"""Stage read_eval: how well whole numbers are read, by the line reader that serving uses
(models/reader.onnx with models/cnn.onnx looking at each digit, and its verifier with the second
look, models/mlp.onnx, judging the whole number: pipeline/core/reading/sequence.py) and, for
comparison, by cutting the line into digits (pipeline/core/reading/segment.py).

Numbers are written from *test* digits (pipeline/core/reading/numbers.py; both readers were chosen
on numbers from training and validation digits): 5-digit strings in each spacing kind, and strings
with clear gaps of every length from 1 to 10. Like evaluate, this stage only measures. Writes
  reports/reading.json       per spacing kind and per length: how many strings are read exactly,
                             the share of digits read right, the share of strings marked sure and
                             how many of those are right; and the same over everything. The line
                             reader's at the top, the segmenter's under "segment"
  data/reading_examples/     a few numbers with their boxes and the line reader's readings, for
                             visualize's figure
"""

import difflib
import json

import numpy as np

from pipeline.core import params as params_module
from pipeline.core.files import atomic_path, load_arrays, require, save_arrays, write_json
from pipeline.core.graph.runtime import OnnxGraph, ReaderGraph, verifier_file
from pipeline.core.layout import PROCESSED_DIR, READING_EXAMPLES_DIR, READING_FILE, onnx_file
from pipeline.core.reading import numbers, segment, sequence

EXAMPLES_PER_KIND = 4


def scores(readings):
    """Scores of [(true text, Reading)]."""
    right = [r.text == text for text, r in readings]
    sure = [r.sure for _, r in readings]
    digits = sum(len(text) for text, _ in readings)
    matched = sum(
        sum(block.size for block in difflib.SequenceMatcher(None, text, r.text, autojunk=False).get_matching_blocks())
        for text, r in readings
    )
    sure_right = sum(ok and s for ok, s in zip(right, sure, strict=True))
    return {
        "strings": len(readings),
        "string_accuracy": float(np.mean(right)),
        "digit_accuracy": matched / digits,
        "sure_share": float(np.mean(sure)),
        "sure_accuracy": sure_right / sum(sure) if any(sure) else None,
    }


def read_all(samples, read, progress):
    readings = []
    for image, text, _ in samples:
        readings.append((text, read(image)))
        progress.update()
    return readings


def measure(params):
    from tqdm import tqdm

    require(onnx_file("cnn"), onnx_file("mlp"), onnx_file("reader"), verifier_file(onnx_file("reader"), ".onnx"))
    data = load_arrays(PROCESSED_DIR, ["x_test", "y_test"])
    digits, reader = OnnxGraph(onnx_file("cnn")), ReaderGraph(onnx_file("reader"))
    readers = {
        "reader": lambda image: sequence.read(image, reader, digits),
        "segment": lambda image: segment.read(image, digits),
    }
    rng = np.random.default_rng(params.read_eval.seed)
    sets = numbers.evaluation_sets(params.read_eval.strings_per_kind, params.read_eval.strings_per_length)
    total = sum(count for _, _, count in sets.values()) * len(readers)
    reports = {name: {"by_kind": {}, "by_length": {}} for name in readers}
    everything = {name: [] for name in readers}
    examples = []
    with tqdm(total=total, unit="number", desc="read_eval", disable=None, leave=False) as progress:
        for name, (lengths, kind, count) in sets.items():
            samples = numbers.sample(data["x_test"], data["y_test"], lengths, kind, count, rng)
            group, key = name.split("/")
            for reader_name, read in readers.items():
                readings = read_all(samples, read, progress)
                reports[reader_name][f"by_{group}"][key] = scores(readings)
                everything[reader_name] += readings
                if group == "kind" and reader_name == "reader":
                    shown = zip(samples[:EXAMPLES_PER_KIND], readings, strict=False)
                    examples += [(image, text, r) for (image, text, _), (_, r) in shown]
    for name, report in reports.items():
        report["all"] = scores(everything[name])
    return {**reports["reader"], "segment": reports["segment"]}, examples


def save_examples(examples):
    """The example images padded to one shape (white paper), and what was read in each, as JSON."""
    height = max(image.shape[0] for image, _, _ in examples)
    width = max(image.shape[1] for image, _, _ in examples)
    images = np.full((len(examples), height, width), 255, np.uint8)
    for i, (image, _, _) in enumerate(examples):
        images[i, : image.shape[0], : image.shape[1]] = image
    save_arrays(READING_EXAMPLES_DIR, {"images": images})
    described = [
        {
            "text": text,
            "read": r.text,
            "sure": r.sure,
            "digits": [{"box": d.box, "digit": d.text, "not_sure": d.not_sure} for d in r.digits],
        }
        for _, text, r in examples
    ]
    with atomic_path(READING_EXAMPLES_DIR / "readings.json") as tmp:
        tmp.write_text(json.dumps(described, indent=1) + "\n")


def read_eval(params):
    report, examples = measure(params)
    write_json(READING_FILE, report)
    save_examples(examples)
    for name, measured in (("line reader", report), ("segmenter", report["segment"])):
        for group in ("by_kind", "by_length"):
            for key, s in measured[group].items():
                sure = f"{s['sure_accuracy']:.2%}" if s["sure_accuracy"] is not None else "-"
                print(
                    f"read_eval {name}, {group[3:]} {key}: {s['string_accuracy']:.2%} of {s['strings']} strings "
                    f"read exactly, digits {s['digit_accuracy']:.2%}; {s['sure_share']:.1%} marked sure, {sure} of "
                    "those right"
                )


def main():
    params_module.run_stage("read_eval", read_eval)


if __name__ == "__main__":
    main()
