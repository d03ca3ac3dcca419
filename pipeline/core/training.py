"""Training shared by the train stages and the sweeps: seeding, the augmented input pipeline, the
learning-rate schedule, the compiled model and its fit, with one row per epoch."""

import csv
import io
import sys
import time

import numpy as np

from pipeline.core import models, tracking

HISTORY_COLUMNS = ["epoch", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "seconds"]


def seed_everything(seed):
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)  # Python, NumPy and TensorFlow
    tf.config.experimental.enable_op_determinism()


def steps_per_epoch(train_size, model_params):
    return int(np.ceil(train_size / model_params.batch_size))


def training_dataset(x, y, model_params, seed, shift_strengths):
    """Shuffled batches with on-the-fly augmentation (pipeline/core/shifts/augmentation.py: small
    rotations, shifts and zooms in one resampling, then `augment.shift_share` of each batch given
    one of `augment.shifts` at `shift_strengths`, params.yaml's `shifts`, and `augment.printed_share`
    replaced by printed digits), run in the tf.data
    pipeline so the saved model stays a plain inference model. Endless: one epoch is
    steps_per_epoch() batches, reshuffled each time round."""
    import tensorflow as tf

    from pipeline.core.shifts.augmentation import RandomAffine, with_shifts

    augment = model_params.augment
    ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    # One iterator for the whole run: fit() starting a new one each epoch stalls the epoch's first
    # step (docs/experiments.md, "Measurements behind the code").
    ds = ds.batch(model_params.batch_size).repeat()
    if augment.rotation_degrees or augment.shift_fraction or augment.zoom_fraction:
        pose = RandomAffine(augment.rotation_degrees, augment.shift_fraction, augment.zoom_fraction, seed=seed)
        # One call at a time: the layer draws from a seed generator, and parallel calls race for its
        # state (on small batches, two runs with one seed gave different batches). Augmenting a
        # batch takes a fraction of a training step, and prefetch runs it ahead.
        ds = ds.map(lambda images, labels: (pose(images, training=True), labels))
    if augment.shift_share or augment.printed_share:
        ds = with_shifts(ds, augment, shift_strengths, seed + 3)
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
    CSV and, inside an MLflow run, per-epoch metrics with step = epoch; stops on Ctrl-C or SIGTERM.
    `columns`: the row's keys; those other than epoch, learning_rate and seconds come from the
    epoch's logs (a callback listed before this one may add to them)."""

    @staticmethod
    def create(to_mlflow=True, columns=HISTORY_COLUMNS):
        import keras
        import mlflow

        logged = [c for c in columns if c not in ("epoch", "learning_rate", "seconds")]

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
                row = {"epoch": epoch + 1, **{k: float(logs.get(k, "nan")) for k in logged}}
                row["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
                row["seconds"] = round(time.perf_counter() - self.start, 3)
                self.rows.append({k: row[k] for k in columns})
                if to_mlflow:
                    mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch + 1)

        return _EpochLog()


def compiled_model(model_params, epochs, train_size):
    """A new model of `model_params`' architecture, compiled with its recipe."""
    return compile_with_recipe(models.build(model_params), model_params, epochs, train_size)


def compile_with_recipe(model, model_params, epochs, train_size):
    """`model` (new, or trained already and to be fine-tuned) compiled with `model_params`' optimiser,
    learning-rate schedule and loss."""
    import keras

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


def fit(model, model_params, data, epochs, seed, shift_strengths, to_mlflow=True, callbacks=(), verbose=None):
    """Train in place on data's x_train and y_train (validated on x_val and y_val, where given),
    augmented as training_dataset says;
    returns the per-epoch rows and the training seconds. `callbacks` see each epoch after the row
    is logged (a sweep reports it to Ray Tune)."""
    epoch_log = EpochLog.create(to_mlflow)
    start = time.perf_counter()
    model.fit(
        training_dataset(data["x_train"], data["y_train"], model_params, seed, shift_strengths),
        epochs=epochs,
        steps_per_epoch=steps_per_epoch(len(data["x_train"]), model_params),
        validation_data=(data["x_val"], data["y_val"]) if "x_val" in data else None,
        callbacks=[epoch_log, *callbacks],
        shuffle=False,  # the dataset shuffles; Keras warns that it cannot
        verbose=(1 if sys.stdout.isatty() else 2) if verbose is None else verbose,
    )
    return epoch_log.rows, time.perf_counter() - start


def history_csv(rows, columns=HISTORY_COLUMNS):
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()
