"""Stages train_mlp and train_cnn: `python -m pipeline.train mlp|cnn`.

Reads data/processed (train and validation splits only; the test set is for evaluate), trains the
model its params.yaml section describes, and writes
  models/<model>.keras              the trained model (Keras 3 format)
  models/<model>.run.json           the MLflow run id, for evaluate and visualize
  reports/train/<model>_history.csv one row per epoch (dvc plots)
  reports/train/<model>.json        best and final validation metrics (dvc metrics)
The MLflow run gets every param used, the datasets it saw (with digests), per-epoch metrics
(step = epoch), the model in MLflow's Keras flavor with signature and input example, the history
CSV and a model summary. The model is registered as `digits-<model>`; the alias `champion` moves
to it only if it beats the champion on validation.
"""

import argparse

from pipeline.core import params as params_module
from pipeline.core import tracking, training
from pipeline.core.files import DataError, atomic_path, load_arrays, write_json, write_text
from pipeline.core.layout import IMAGE_SHAPE, MODELS, NUM_CLASSES, PROCESSED_DIR, TRAIN_REPORTS_DIR, model_file


def load_data():
    data = load_arrays(PROCESSED_DIR, ["x_train", "y_train", "x_val", "y_val"])
    for split in ("train", "val"):
        x, y = data[f"x_{split}"], data[f"y_{split}"]
        if x.ndim != 4 or x.shape[1:] != IMAGE_SHAPE or y.shape != (len(x), NUM_CLASSES):
            raise DataError(
                f"{PROCESSED_DIR}/x_{split}.npy, y_{split}.npy have shapes {x.shape}, {y.shape}; "
                f"expected (N, 28, 28, 1) and (N, 10): rerun `dvc repro preprocess`"
            )
    return data


def summary_text(model):
    lines = []
    model.summary(print_fn=lambda line, **_: lines.append(line))
    return "\n".join(lines) + "\n"


def train(model_name, params):
    import keras
    import mlflow
    import tensorflow as tf

    model_params = params.model(model_name)
    data = load_data()
    x_train, x_val = data["x_train"], data["x_val"]
    training.seed_everything(params.seed)
    model = training.compiled_model(model_params, params.epochs, len(x_train))
    print(
        f"train {model_name}: {model.count_params():,} parameters, {len(x_train):,} training and "
        f"{len(x_val):,} validation images, {params.epochs} epochs",
        flush=True,
    )

    with tracking.training_run(model_name, f"train_{model_name}", params.mlflow.experiment) as (run, tags):
        mlflow.log_params(
            {
                "model": model_name,
                "epochs": params.epochs,
                "seed": params.seed,
                **model_params.flat(),
                "param_count": model.count_params(),
                "train_size": len(x_train),
                "val_size": len(x_val),
                "tensorflow_version": tf.__version__,
                "keras_version": keras.__version__,
            }
        )
        datasets = {context: dataset for dataset, context in tracking.training_datasets(data)}
        for context, dataset in datasets.items():
            mlflow.log_input(dataset, context=context)
        rows, seconds = training.fit(model, model_params, data, params.epochs, params.seed, params.shifts.strengths)
        best = max(rows, key=lambda r: r["val_accuracy"])
        summary = {
            "val_accuracy": rows[-1]["val_accuracy"],
            "val_loss": rows[-1]["val_loss"],
            "best_val_accuracy": best["val_accuracy"],
            "best_val_loss": min(r["val_loss"] for r in rows),
            "best_epoch": best["epoch"],
            "epochs": len(rows),
            "params": model.count_params(),
            "train_seconds": round(seconds, 1),
        }
        mlflow.log_metrics({"train_seconds": seconds, "best_val_accuracy": best["val_accuracy"]})

        with atomic_path(model_file(model_name)) as tmp:
            model.save(tmp)
        write_text(TRAIN_REPORTS_DIR / f"{model_name}_history.csv", training.history_csv(rows))
        write_json(TRAIN_REPORTS_DIR / f"{model_name}.json", {model_name: summary})
        mlflow.log_artifact(str(TRAIN_REPORTS_DIR / f"{model_name}_history.csv"))
        mlflow.log_text(summary_text(model), "model_summary.txt")

        logged = tracking.log_keras_model(model, x_val[:5])
        version, verdict = tracking.register_trained(
            model_name, logged, run, tags, summary["val_accuracy"], datasets["validation"].digest
        )
    print(
        f"train {model_name}: val accuracy {summary['val_accuracy']:.4f} (best {summary['best_val_accuracy']:.4f} "
        f"at epoch {summary['best_epoch']}) in {seconds:.0f}s; MLflow run {run.info.run_id}\n"
        f"train {model_name}: registered {version.name} v{version.version}; {verdict}",
        flush=True,
    )
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m pipeline.train", description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=MODELS)
    args = parser.parse_args(argv)
    params_module.run_stage(f"train {args.model}", lambda params: train(args.model, params))


if __name__ == "__main__":
    main()
