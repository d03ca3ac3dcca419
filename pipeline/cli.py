"""`digits`: the command line of the serving and scale-out wings.

digits predict | read | serve | promote | review
                                    use the trained model (pipeline/serving/cli.py)
digits finetune                     adapt the model to your own labelled images (pipeline/serving/finetune.py)
digits sweep                        compare recipes as Ray Tune trials (pipeline/scale/sweep.py)
digits score                        score many images with Ray Data (pipeline/scale/score.py)
"""

import argparse
import sys

import pipeline  # noqa: F401  (quiets TensorFlow before it loads)
from pipeline.scale import score, sweep
from pipeline.serving import cli as serving_cli
from pipeline.serving import finetune


def main(argv=None):
    parser = argparse.ArgumentParser(prog="digits", description="Recognise handwritten digits with the trained model.")
    commands = parser.add_subparsers(dest="command", required=True)
    serving_cli.add_commands(commands)
    f = commands.add_parser("finetune", help="fine-tune the model on your own labelled images; registers a new version")
    finetune.add_arguments(f)
    f.set_defaults(run=finetune.main)
    s = commands.add_parser("sweep", help="compare recipes on validation, as Ray Tune trials tracked in MLflow")
    sweep.add_arguments(s)
    s.set_defaults(run=sweep.main)
    b = commands.add_parser("score", help="score a folder, a list or a Parquet file of images with Ray Data")
    score.add_arguments(b)
    b.set_defaults(run=score.main)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
