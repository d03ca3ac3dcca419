"""How far `digits finetune` takes the pipeline's CNN on printed digits, one run, JSON in
reports/finetune.json:

    ./dev run python -m bench.finetune [--seeds 0 1 2] [--per-digit 5]

Printed digits from the 9 fonts matplotlib ships that the pipeline's training never draws from
(bench/printed.py: STIX and Computer Modern; training prints in DejaVu), in two type sizes: large
print, and small print as a scanner sees it. Per seed, `--per-digit` images of each digit in each
font; `digits finetune` holds out whole fonts (its default share, 0.2: 2 of 9 fonts), so the
held-out accuracy is on type it never fine-tuned on, and fine-tunes on the rest (7 fonts x 10
digits x 5 = 350 images at the defaults). Reported per run and as mean and sd: held-out accuracy
before and after, the held-out share's sure answers, and MNIST validation and test accuracy before
and after (a run that would lose more than --max-mnist-loss on MNIST's validation digits is refused).
models/ and the project's MLflow store are not touched: each run writes to a scratch folder and
registers in a scratch store.
"""

import argparse
import json
import os
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

from bench import printed
from bench.__main__ import machine, model_of
from pipeline.core.files import write_json
from pipeline.serving import finetune

OUT = "reports/finetune.json"
SIZES = {"large print": printed.LARGE, "small print": printed.SMALL}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.finetune", description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--per-digit", type=int, default=5, help="images of each digit in each font (default 5)")
    parser.add_argument("--model", default="models/cnn.keras")
    parser.add_argument("--out", default=OUT)
    args = parser.parse_args(argv)

    report = {
        "date": date.today().isoformat(),
        "machine": machine(),
        "model": model_of(args.model),
        "runs": {},
        "summary": {},
    }
    with tempfile.TemporaryDirectory() as scratch:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{scratch}/mlflow.db"
        for size_name, sizes in SIZES.items():
            runs = report["runs"][size_name] = []
            for seed in args.seeds:
                folder = Path(scratch) / f"{size_name}-{seed}"
                labels = printed.write_labelled_folder(folder, printed.HELD_OUT_FONTS, args.per_digit, seed, sizes)
                cli = [
                    str(labels),
                    "--model",
                    args.model,
                    "--out",
                    str(folder / "out/finetuned.keras"),
                    "--seed",
                    str(seed),
                ]
                start = time.perf_counter()
                try:
                    result = finetune.finetune(finetune.arguments(cli))
                except finetune.ForgetsMnist as e:  # it would forget MNIST: refused, as a user would see
                    result = {"refused": str(e)}
                runs.append({"seed": seed, **result, "seconds": round(time.perf_counter() - start, 1)})
                print(f"bench.finetune: {size_name}, seed {seed}: {json.dumps(runs[-1])}", flush=True)
            done = [r for r in runs if "refused" not in r]
            report["summary"][size_name] = {"refused": len(runs) - len(done)} | {
                f"{when}_{what}": {
                    "mean": statistics.mean(r[when][what] for r in done),
                    "sd": statistics.stdev(r[when][what] for r in done) if len(done) > 1 else 0.0,
                    "min": min(r[when][what] for r in done),
                }
                for when in ("before", "after")
                for what in ("held_out", "mnist_val", "mnist_test")
                if done
            }
    write_json(args.out, report)
    print(json.dumps(report["summary"], indent=2))


if __name__ == "__main__":
    main()
