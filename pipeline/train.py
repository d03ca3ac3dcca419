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
import csv
import io
import sys
import time

import numpy as np

from pipeline import models, tracking
from pipeline import params as params_module
from pipeline.files import DataError, atomic_path, load_arrays, write_json, write_text
from pipeline.layout import IMAGE_SHAPE, NUM_CLASSES, PROCESSED_DIR, TRAIN_REPORTS_DIR, model_file

HISTORY_COLUMNS = ["epoch", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "seconds"]


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


def seed_everything(seed):
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)  # Python, NumPy and TensorFlow
    tf.config.experimental.enable_op_determinism()


def steps_per_epoch(train_size, model_params):
    return int(np.ceil(train_size / model_params.batch_size))


def training_dataset(x, y, model_params, seed):
    """Shuffled batches with on-the-fly augmentation (pipeline/augmentation.py: small rotations,
    shifts and zooms in one resampling, then corruptions, `augment.corruption_share`), run in the tf.data
    pipeline so the saved model stays a plain inference model. Endless: one epoch is
    steps_per_epoch() batches, reshuffled each time round."""
    import keras
    import tensorflow as tf

    from pipeline.augmentation import RandomAffine, RandomCorruption

    strength = model_params.augment
    augment = keras.Sequential(
        [
            layer
            for layer, active in [
                (
                    RandomAffine(strength.rotation_degrees, strength.shift_fraction, strength.zoom_fraction, seed=seed),
                    strength.rotation_degrees or strength.shift_fraction or strength.zoom_fraction,
                ),
                (RandomCorruption(strength.corruption_share, seed=seed + 3), strength.corruption_share),
            ]
            if active
        ],
        name="augment",
    )
    ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    # One iterator for the whole run: fit() starting a new one each epoch stalled the epoch's first
    # step by 10-17 s in 10 of 28 epochs measured on two cores.
    ds = ds.batch(model_params.batch_size).repeat()
    if augment.layers:
        # One call at a time: the layers draw from seed generators, and parallel calls race for
        # their state (on small batches, two runs with one seed gave different batches). Augmenting
        # a batch takes a fraction of a training step, and prefetch runs it ahead.
        ds = ds.map(lambda images, labels: (augment(images, training=True), labels))
    return ds.prefetch(tf.data.AUTOTUNE)


def learning_rate_schedule(model_params, epochs, epoch_steps):
    """Linear warm-up to the peak rate, then cosine decay to zero at the last step, so the schedule
    stretches with `epochs` and `dvc exp run -S epochs=20` keeps the same recipe."""
    import keras

    warmup = min(model_params.warmup_epochs, epochs - 1) * epoch_steps
    total = epochs * epoch_steps
    peak = model_params.learning_rate
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup else peak,
        decay_steps=max(total - warmup, 1),
        warmup_target=peak if warmup else None,
        warmup_steps=warmup,
    )


class EpochLog:
    """Keras callback (built lazily so importing this module stays cheap): rows for the history
    CSV and, inside an MLflow run, per-epoch metrics with step = epoch; stops on Ctrl-C or SIGTERM."""

    @staticmethod
    def create(to_mlflow=True):
        import keras
        import mlflow

        class _EpochLog(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.rows = []

            def on_train_batch_begin(self, batch, logs=None):
                # Ctrl-C and SIGTERM stop training between steps. (A batch *end* hook would make
                # Keras wait for every step's metrics before starting the next.)
                tracking.raise_if_signalled()

            def on_epoch_begin(self, epoch, logs=None):
                self.start = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                row = {"epoch": epoch + 1, **{k: float(logs[k]) for k in HISTORY_COLUMNS[1:5]}}
                row["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
                row["seconds"] = round(time.perf_counter() - self.start, 3)
                self.rows.append(row)
                if to_mlflow:
                    mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch + 1)

        return _EpochLog()


def compiled_model(model_params, epochs, train_size):
    import keras

    model = models.build(model_params)
    model.compile(
        # weight_decay is decoupled from the gradient (AdamW): each step shrinks every weight by
        # learning_rate * weight_decay, so the decay follows the schedule to zero.
        # With ema_momentum, fit() ends by replacing the weights with their moving average.
        optimizer=keras.optimizers.Adam(
            learning_rate_schedule(model_params, epochs, steps_per_epoch(train_size, model_params)),
            weight_decay=model_params.weight_decay or None,
            use_ema=model_params.ema_momentum > 0,
            ema_momentum=model_params.ema_momentum or 0.99,
        ),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=model_params.label_smoothing),
        metrics=["accuracy"],
    )
    return model


def fit(model, model_params, params, data, to_mlflow=True):
    """Train in place; returns the per-epoch rows and the training seconds."""
    epoch_log = EpochLog.create(to_mlflow)
    start = time.perf_counter()
    model.fit(
        training_dataset(data["x_train"], data["y_train"], model_params, params.seed),
        epochs=params.epochs,
        steps_per_epoch=steps_per_epoch(len(data["x_train"]), model_params),
        validation_data=(data["x_val"], data["y_val"]),
        callbacks=[epoch_log],
        shuffle=False,  # the dataset shuffles; Keras warns that it cannot
        verbose=1 if sys.stdout.isatty() else 2,
    )
    return epoch_log.rows, time.perf_counter() - start


def history_csv(rows):
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=HISTORY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def summary_text(model):
    lines = []
    model.summary(print_fn=lambda line, **_: lines.append(line))
    return "\n".join(lines) + "\n"


def train(kind, params):
    import keras
    import mlflow
    import tensorflow as tf

    model_params = params.model(kind)
    data = load_data()
    x_train, x_val = data["x_train"], data["x_val"]
    seed_everything(params.seed)
    model = compiled_model(model_params, params.epochs, len(x_train))
    print(
        f"train {kind}: {model.count_params():,} parameters, {len(x_train):,} training and "
        f"{len(x_val):,} validation images, {params.epochs} epochs",
        flush=True,
    )

    experiment = tracking.use_experiment(params.experiment)
    tracking.end_orphaned_runs(experiment.experiment_id)
    train_set = mlflow.data.from_numpy(x_train, targets=data["y_train"], name="mnist-train")
    val_set = mlflow.data.from_numpy(x_val, targets=data["y_val"], name="mnist-validation")
    tags = tracking.run_tags(kind, f"train_{kind}")
    with tracking.run(run_name=tracking.run_name(kind), tags=tags) as run:
        mlflow.log_params(
            {
                "model": kind,
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
        mlflow.log_input(train_set, context="training")
        mlflow.log_input(val_set, context="validation")
        rows, seconds = fit(model, model_params, params, data)
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

        with atomic_path(model_file(kind)) as tmp:
            model.save(tmp)
        write_text(TRAIN_REPORTS_DIR / f"{kind}_history.csv", history_csv(rows))
        write_json(TRAIN_REPORTS_DIR / f"{kind}.json", {kind: summary})
        mlflow.log_artifact(str(TRAIN_REPORTS_DIR / f"{kind}_history.csv"))
        mlflow.log_text(summary_text(model), "model_summary.txt")

        logged = tracking.log_keras_model(model, x_val[:5])
        version = tracking.register(
            kind,
            logged.model_uri,
            {
                "git_commit": tracking.git_commit() or "none",
                "dvc_exp_name": tags["dvc.exp_name"],
                "run_id": run.info.run_id,
                "val_accuracy": summary["val_accuracy"],
                "val_digest": val_set.digest,
            },
        )
        tracking.write_run_file(kind, run.info, version.version)
        verdict = tracking.crown_if_better(version)
    print(
        f"train {kind}: val accuracy {summary['val_accuracy']:.4f} (best {summary['best_val_accuracy']:.4f} "
        f"at epoch {summary['best_epoch']}) in {seconds:.0f}s; MLflow run {run.info.run_id}\n"
        f"train {kind}: registered {version.name} v{version.version}; {verdict}",
        flush=True,
    )
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m pipeline.train", description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=params_module.MODELS)
    args = parser.parse_args(argv)
    params = params_module.load_or_exit(f"train {args.model}")
    try:
        train(args.model, params)
    except DataError as e:
        sys.exit(f"train {args.model}: {e}")


if __name__ == "__main__":
    main()
