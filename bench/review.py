"""People in the loop on a shifted set, one round per seed (JSON: reports/review.json):

    ./dev run python -m bench.review [--model models/cnn.keras] [--seeds 0 1 2] [--per-digit 30] [--most 500]

Printed digits in small type (bench/printed.py: the 9 fonts matplotlib ships that the pipeline's
training never prints in, STIX and Computer Modern, as a scanner sees 10-point type) stand for a
new kind of form that the CNN reads less well than handwriting. Each
round has two batches of them, its own (seeded), each font in its own folder (one "writer"):
  1. the first batch is scored with `digits predict --review DIR --review-sure`: what is not sure
     waits in DIR, and what is sure is there too, labelled with the model's answer;
  2. a person labels what waits: here the truth is written into DIR/labels.csv, for at most
     `--most` rows (the corrections it took);
  3. `digits finetune DIR` fine-tunes on them and on the sure answers (holding out whole fonts) and
     registers a version;
  4. the second batch, images neither model has seen, is scored by the parent and by the new model.
Reported for each model on each batch: accuracy, the share sent to review, and the accuracy of the
answers not sent; the fine-tuned model's MNIST accuracy before and after; and over the rounds, the
spread of the ratio of the shares sent to review (one round's ratio swings: fine-tuning is not
bit-repeatable, and a batch of 2,700 images is not many). models/ and the project's MLflow store are not touched (a
scratch folder and store per round).
"""

import argparse
import contextlib
import csv
import io
import json
import os
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

from bench import printed
from bench.__main__ import machine, model_of
from pipeline import cli
from pipeline.core.files import write_json
from pipeline.serving import finetune, review

OUT = "reports/review.json"


def batch(folder, per_digit, seed):
    """Printed digits in small type, one sub-folder per font: ({path: label}, [font folders])."""
    truth = {}
    for i, font in enumerate(printed.HELD_OUT_FONTS):
        labels = printed.write_labelled_folder(folder / font, [font], per_digit, seed * 1000 + i, printed.SMALL)
        with labels.open(newline="") as f:
            truth |= {str(folder / font / row["file"]): int(row["label"]) for row in csv.DictReader(f)}
        labels.unlink()  # the folder then holds images only, as a user's scans would
    return truth, [folder / font for font in printed.HELD_OUT_FONTS]


def scored(model, folders, truth, queue=None, sure_too=True):
    """`digits predict` on the folders (with --review queue, and --review-sure if `sure_too`):
    accuracy, share sent to review, and the accuracy of the answers kept."""
    out = io.StringIO()
    args = ["predict", *map(str, folders), "--model", str(model), "--format", "json"]
    if queue:
        args += ["--review", str(queue), *(["--review-sure"] if sure_too else [])]
    with contextlib.redirect_stdout(out):
        code = cli.main(args)
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
    """What a person would do: fill the label of the first `most` rows that wait (the model's own
    sure answers come labelled already). Returns how many."""
    rows = review.read_rows(queue)
    waiting = [row for row in rows if not row["label"].strip()][:most]
    for row in waiting:
        row["label"] = str(truth[row["source"]])
    with (queue / review.LABELS).open("w", newline="") as f:
        writer = csv.DictWriter(f, review.COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return len(waiting)


def loop(model, scratch, per_digit, most, seed, finetune_args=(), sure_too=True):
    """The round of the module docstring, in the folder `scratch`, its batches drawn with seeds
    2 * seed and 2 * seed + 1 (rounds of other seeds share no image); `finetune_args` go to `digits
    finetune` (the tests' shorter fine-tuning); `sure_too`: the first batch scored with
    --review-sure. finetune.ForgetsMnist when fine-tuning is refused."""
    scratch = Path(scratch)
    first, first_folders = batch(scratch / "first", per_digit, 2 * seed)
    second, second_folders = batch(scratch / "second", per_digit, 2 * seed + 1)
    queue = scratch / "review"
    report = {"parent": {"first batch": scored(model, first_folders, first, queue, sure_too)}}
    report["corrections"] = label_from_truth(queue, first, most)
    tuned = scratch / "out/finetuned.keras"
    command = [str(queue), "--model", str(model), "--out", str(tuned), "--seed", str(seed), *map(str, finetune_args)]
    started = time.perf_counter()
    tuning = finetune.finetune(finetune.arguments(command))
    report["finetune_seconds"] = round(time.perf_counter() - started, 1)
    report["kept_epoch"] = tuning["kept_epoch"]
    report["mnist"] = {when: {k: tuning[when][k] for k in ("mnist_val", "mnist_test")} for when in ("before", "after")}
    report["parent"]["second batch"] = scored(model, second_folders, second)
    report["fine-tuned"] = {
        "first batch": scored(tuned, first_folders, first),
        "second batch": scored(tuned, second_folders, second),
    }
    before, after = report["parent"]["second batch"], report["fine-tuned"]["second batch"]
    report["review_share_ratio"] = round(after["sent_to_review"] / before["sent_to_review"], 3)
    return report


def summary(rounds):
    """Over the rounds fine-tuning did not refuse: the ratio's mean, sd and range, and the worst of
    what the issue promises (kept answers right, MNIST test accuracy after, corrections)."""
    done = [r for r in rounds.values() if "refused" not in r]
    if not done:
        return {"refused": len(rounds)}
    ratios = [r["review_share_ratio"] for r in done]
    return {
        "refused": len(rounds) - len(done),
        "review_share_ratio": {
            "mean": round(statistics.mean(ratios), 3),
            "sd": round(statistics.stdev(ratios), 3) if len(ratios) > 1 else 0.0,
            "min": min(ratios),
            "max": max(ratios),
        },
        "parent_kept_accuracy_min": min(r["parent"][b]["kept_accuracy"] for r in done for b in r["parent"]),
        "fine_tuned_kept_accuracy_min": min(r["fine-tuned"][b]["kept_accuracy"] for r in done for b in r["fine-tuned"]),
        "mnist_test_after_min": min(r["mnist"]["after"]["mnist_test"] for r in done),
        "corrections_max": max(r["corrections"] for r in done),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.review", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/cnn.keras")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one round each (default 0 1 2)")
    parser.add_argument("--per-digit", type=int, default=30, help="images of each digit in each font, per batch")
    parser.add_argument("--most", type=int, default=500, help="corrections a person makes (rows labelled)")
    parser.add_argument("--out", default=OUT)
    args = parser.parse_args(argv)
    rounds = {}
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as scratch:
            os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{scratch}/mlflow.db"
            try:
                rounds[str(seed)] = loop(args.model, scratch, args.per_digit, args.most, seed)
            except finetune.ForgetsMnist as e:  # it would forget MNIST: refused, as a user would see
                rounds[str(seed)] = {"refused": str(e)}
        print(f"bench.review: round {seed}: {json.dumps(rounds[str(seed)])}", flush=True)
    report = {
        "date": date.today().isoformat(),
        "machine": machine(),
        "model": model_of(args.model),
        "rounds": rounds,
        "summary": summary(rounds),
    }
    write_json(args.out, report)
    print(json.dumps(report["summary"], indent=2))


if __name__ == "__main__":
    main()
