"""People in the loop, one round on a shifted set, one run (JSON: reports/review.json):

    ./dev run python -m bench.review [--model models/cnn.keras] [--per-digit 4] [--most 500]

Printed digits in small type (bench/printed.py: the 21 fonts matplotlib ships, as a scanner sees
10-point type) stand for a new kind of form that the CNN reads less well than handwriting. Two
batches of them, from other seeds, each font in its own folder (one "writer"):
  1. the first batch is scored with `digits predict --review DIR`;
  2. a person labels what waits: here the truth is written into DIR/labels.csv, for at most
     `--most` rows (the corrections it took);
  3. `digits finetune DIR` fine-tunes on them (holding out whole fonts) and registers a version;
  4. the second batch, images neither model has seen, is scored by the parent and by the new model.
Reported for each model on each batch: accuracy, the share sent to review, and the accuracy of the
answers not sent. models/ and the project's MLflow store are not touched (a scratch folder and
store).
"""

import argparse
import contextlib
import csv
import io
import json
import os
import tempfile
import time
from datetime import date
from pathlib import Path

from bench import printed
from bench.__main__ import machine, model_of
from pipeline import cli
from pipeline.core.files import write_json
from pipeline.serving import review

OUT = "reports/review.json"


def batch(folder, per_digit, seed):
    """Printed digits in small type, one sub-folder per font: ({path: label}, [font folders])."""
    truth = {}
    for i, font in enumerate(printed.FONTS):
        labels = printed.write_labelled_folder(folder / font, [font], per_digit, seed * 1000 + i, printed.SMALL)
        with labels.open(newline="") as f:
            truth |= {str(folder / font / row["file"]): int(row["label"]) for row in csv.DictReader(f)}
        labels.unlink()  # the folder then holds images only, as a user's scans would
    return truth, [folder / font for font in printed.FONTS]


def scored(model, folders, truth, queue=None):
    """`digits predict` on the folders (with --review queue): accuracy, share sent to review, and
    the accuracy of the answers kept."""
    out = io.StringIO()
    args = ["predict", *map(str, folders), "--model", str(model), "--format", "json"]
    with contextlib.redirect_stdout(out):
        code = cli.main([*args, "--review", str(queue)] if queue else args)
    if code != 0:
        raise RuntimeError(f"digits predict exited with {code}")
    answers = json.loads(out.getvalue())["predictions"]
    right = [a["digit"] == truth[a["file"]] for a in answers]
    kept = [ok for ok, a in zip(right, answers, strict=True) if not a["not_sure"]]
    return {
        "images": len(answers),
        "accuracy": round(sum(right) / len(right), 4),
        "sent_to_review": round(1 - len(kept) / len(answers), 4),
        # of which the gate called "not a digit" (the rest: less sure than the threshold)
        "sent_as_not_a_digit": round(sum(a["not_a_digit"] for a in answers) / len(answers), 4),
        "kept_accuracy": round(sum(kept) / len(kept), 4) if kept else None,
        "kept_errors": len(kept) - sum(kept),
    }


def label_from_truth(queue, truth, most):
    """What a person would do: fill the label of the first `most` rows that wait. Returns how many."""
    rows = review.read_rows(queue)
    for row in rows[:most]:
        row["label"] = str(truth[row["source"]])
    with (queue / review.LABELS).open("w", newline="") as f:
        writer = csv.DictWriter(f, review.COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return min(most, len(rows))


def loop(model, scratch, per_digit, most, seed, finetune_args=()):
    """The round of the module docstring, in the folder `scratch`; `finetune_args` go to `digits
    finetune` (the tests' shorter fine-tuning)."""
    scratch = Path(scratch)
    first, first_folders = batch(scratch / "first", per_digit, seed)
    second, second_folders = batch(scratch / "second", per_digit, seed + 1)
    queue = scratch / "review"
    report = {"parent": {"first batch": scored(model, first_folders, first, queue)}}
    report["corrections"] = label_from_truth(queue, first, most)
    tuned = scratch / "out/finetuned.keras"
    started = time.perf_counter()
    command = ["finetune", str(queue), "--model", str(model), "--out", str(tuned), "--seed", str(seed)]
    if cli.main([*command, *map(str, finetune_args)]) != 0:
        raise RuntimeError("digits finetune failed")
    report["finetune_seconds"] = round(time.perf_counter() - started, 1)
    report["parent"]["second batch"] = scored(model, second_folders, second)
    report["fine-tuned"] = {
        "first batch": scored(tuned, first_folders, first),
        "second batch": scored(tuned, second_folders, second),
    }
    before, after = report["parent"]["second batch"], report["fine-tuned"]["second batch"]
    report["review_share_ratio"] = round(after["sent_to_review"] / before["sent_to_review"], 3)
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.review", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/cnn.keras")
    parser.add_argument("--per-digit", type=int, default=4, help="images of each digit in each font, per batch")
    parser.add_argument("--most", type=int, default=500, help="corrections a person makes (rows labelled)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=OUT)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{scratch}/mlflow.db"
        result = loop(args.model, scratch, args.per_digit, args.most, args.seed)
    report = {"date": date.today().isoformat(), "machine": machine(), "model": model_of(args.model), **result}
    write_json(args.out, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
