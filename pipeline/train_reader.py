"""Stage train_reader: the line reader, which reads a whole number without cutting it into digits.

Reads data/processed (training and validation digits; the test digits are read_eval's) and the
trained digit CNN (models/cnn.keras), which gives the reader its eyes (pipeline/core/reading/
sequence.py).
Then
  1. writes `read.training_lines` lines from training digits and `read.validation_lines` from
     validation digits, every length up to 12, every spacing kind, with scanner variety
     (pipeline/core/reading/lines.py);
  2. trains with a CTC loss for `read.epochs` epochs, and keeps the epoch whose model reads the
     most validation lines exactly (the rule, chosen before any run: docs/reading.md).
Writes
  models/reader.keras, models/reader.run.json
  reports/train/reader.json          the kept epoch and its validation lines read exactly
  reports/train/reader_history.csv   one row per epoch (dvc plots)
The MLflow run gets the params, the datasets (with digests), per-epoch metrics and the model; it
is registered as `digits-reader`, and `champion` moves to it only if it reads more validation
lines exactly than the champion, on the same validation lines. When a number is sure is the
calibrate_reader stage's: it adds its calibration to this run.
"""

import numpy as np

from pipeline.core import params as params_module
from pipeline.core import tracking, training
from pipeline.core.files import atomic_path, load_arrays, require, write_json, write_text
from pipeline.core.layout import PROCESSED_DIR, READER, TRAIN_REPORTS_DIR, model_file
from pipeline.core.reading import lines, sequence

HISTORY_COLUMNS = ["epoch", "loss", "val_exact", "learning_rate", "seconds"]


def line_sets(data, settings):
    """(training lines, validation lines), each [(line, text)]; the test digits are not read."""
    written = lines.line_sets(data, {"train": settings.training_lines, "val": settings.validation_lines}, settings.seed)
    return written["train"], written["val"]


def fit(reader, train, val, settings, to_mlflow=True):
    """Train; keep the epoch that reads the most validation lines exactly. Returns the history and
    {"best_epoch", "val_exact"}, the kept epoch and its share of validation lines read exactly.
    `to_mlflow`: log each epoch's metrics to the active MLflow run."""
    import keras
    import tensorflow as tf

    rng, shape = np.random.default_rng(settings.seed), sequence.geometry(reader)

    def one_epoch():  # called anew for each epoch: a new shuffle
        for x, y, _ in sequence.batches(train, settings.batch_size, shape, rng):
            yield x, y

    # Batches differ in width: one signature with that dimension open, so Keras traces once.
    signature = (
        tf.TensorSpec((None, lines.HEIGHT, None, 1), tf.float32),
        tf.TensorSpec((None, lines.MAX_LENGTH + 2), tf.int32),
    )
    dataset = tf.data.Dataset.from_generator(one_epoch, output_signature=signature).repeat().prefetch(1)
    steps = -(-len(train) // settings.batch_size)
    reader.compile(
        optimizer=keras.optimizers.Adam(
            keras.optimizers.schedules.CosineDecay(settings.learning_rate, settings.epochs * steps)
        ),
        loss=sequence.ctc_loss,
    )
    epoch_log = training.EpochLog.create(to_mlflow, columns=HISTORY_COLUMNS)
    best = {"val_exact": -1.0}

    class KeepBest(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs["val_exact"] = sequence.exact(reader, val)
            print(f"train_reader: epoch {epoch + 1}: {logs['val_exact']:.2%} of validation lines read exactly")
            if logs["val_exact"] > best["val_exact"]:
                best.update(val_exact=logs["val_exact"], epoch=epoch + 1, weights=reader.get_weights())

    reader.fit(
        dataset,
        epochs=settings.epochs,
        steps_per_epoch=steps,
        callbacks=[KeepBest(), epoch_log],
        shuffle=False,
        verbose=2,
    )
    reader.set_weights(best["weights"])
    # Saved without the CTC loss, a function of ours: Keras and MLflow then load the model (for its
    # input example, or `models:/digits-reader/N`) without being told of it.
    reader.compile()
    return epoch_log.rows, {"best_epoch": best["epoch"], "val_exact": best["val_exact"]}


def train_reader(params):
    import keras
    import mlflow

    settings = params.read
    require(model_file("cnn"))
    data = load_arrays(PROCESSED_DIR, ["x_train", "y_train", "x_val", "y_val"])
    training.seed_everything(settings.seed)
    train, val = line_sets(data, settings)
    reader = sequence.build(keras.models.load_model(model_file("cnn"), compile=False))
    print(
        f"train_reader: {reader.count_params():,} parameters, {len(train):,} training and {len(val):,} "
        f"validation lines, {settings.epochs} epochs",
        flush=True,
    )
    with tracking.training_run(READER, "train_reader", params.mlflow.experiment) as (run, tags):
        mlflow.log_params({"model": READER, **{f"read.{k}": v for k, v in vars(settings).items()}})
        rows, scores = fit(reader, train, val, settings)
        mlflow.log_metrics(scores)
        with atomic_path(model_file(READER)) as tmp:
            reader.save(tmp)
        write_text(TRAIN_REPORTS_DIR / f"{READER}_history.csv", training.history_csv(rows, HISTORY_COLUMNS))
        write_json(TRAIN_REPORTS_DIR / f"{READER}.json", {READER: scores})
        version = register(reader, data, val, run, tags, scores)
    print(
        f"train_reader: {scores['val_exact']:.2%} of validation lines read exactly (epoch {scores['best_epoch']}); "
        f"registered {version.name} v{version.version}",
        flush=True,
    )


def register(reader, data, val, run, tags, scores):
    """The datasets (the digits the lines were written from, and the validation lines' texts) and
    the model on the run; the model registered as digits-reader, crowned if it reads more validation
    lines exactly than the champion did on the same lines."""
    import mlflow

    for dataset, context in tracking.training_datasets(data):
        mlflow.log_input(dataset, context=context)
    validation = mlflow.data.from_numpy(np.array([t for _, t in val]), name="validation-lines")
    mlflow.log_input(validation, context="validation")
    x, _ = lines.padded([line for line, _ in val[:5]])
    logged = tracking.log_keras_model(reader, x)
    mlflow.log_artifact(str(TRAIN_REPORTS_DIR / f"{READER}_history.csv"))
    version, _ = tracking.register_trained(READER, logged, run, tags, scores["val_exact"], validation.digest)
    return version


def main():
    params_module.run_stage("train_reader", train_reader)


if __name__ == "__main__":
    main()
