"""Stage train_reader: the line reader, which reads a whole number without cutting it into digits.

Reads data/processed (training and validation digits; the test digits are read_eval's) and the
trained digit CNN (models/cnn.keras), which gives the reader its eyes (pipeline/core/reading/
sequence.py) and, with its calibration (models/cnn.calibration.json), looks at each digit read.
Then
  1. writes `read.training_lines` lines from training digits and `read.validation_lines` from
     validation digits, every length up to 12, every spacing kind, with scanner variety
     (pipeline/core/reading/lines.py);
  2. trains with a CTC loss for `read.epochs` epochs, and keeps the epoch whose model reads the
     most validation lines exactly (the rule, chosen before any run: docs/reading.md);
  3. calibrates the number's confidence: a temperature on the windows' logits, fitted on the
     validation lines so that a path's probability matches how often such readings are right;
     then, of the confidences in sequence.CONFIDENCES, the one that keeps the most numbers sure in
     the median of calibrations on resamples, and its threshold: the lowest confidence at which
     the numbers kept are `read.accepted_accuracy` right both among the validation lines and among
     as many plain numbers of validation digits, written as read_eval writes its numbers.
Writes
  models/reader.keras, models/reader.calibration.json, models/reader.run.json
  reports/train/reader.json          validation scores of the kept epoch and of the calibration
  reports/train/reader_history.csv   one row per epoch (dvc plots)
The MLflow run gets the params, the datasets (with digests), per-epoch metrics and the model; it
is registered as `digits-reader`, and `champion` moves to it only if it reads more validation
lines exactly than the champion, on the same validation lines.
"""

import numpy as np

from pipeline.core import params as params_module
from pipeline.core import tracking, training
from pipeline.core.files import atomic_path, load_arrays, require, sha256, write_json, write_text
from pipeline.core.layout import PROCESSED_DIR, READER, TRAIN_REPORTS_DIR, beside, model_file
from pipeline.core.reading import lines, sequence
from pipeline.core.trust import confidence

HISTORY_COLUMNS = ["epoch", "loss", "val_exact", "learning_rate", "seconds"]
CHOICE_RESAMPLES = 20  # calibrations on resamples of the lines, for the choice of the number's confidence


def line_sets(data, settings):
    """(training lines, validation lines, plain validation numbers): the first two [(line, text)]
    with a scanner's variety, the third [(line, text, spacing kind)] written as read_eval writes
    numbers (lines.plain_lines), as many as the validation lines. The test digits are not read."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    jobs = [("train", settings.seed + i, n) for i, n in enumerate(_chunked(settings.training_lines))]
    jobs += [("val", settings.seed + 10_000 + i, n) for i, n in enumerate(_chunked(settings.validation_lines))]
    jobs += [("plain", settings.seed + 20_000 + i, n) for i, n in enumerate(_chunked(settings.validation_lines))]
    digits = {split: (data[f"x_{split}"][..., 0], data[f"y_{split}"].argmax(1)) for split in ("train", "val")}
    # Chunks with their own seeds: the lines are the same however many processes write them.
    # spawn, not fork: the workers need NumPy and PIL, not a copy of this process's TensorFlow.
    with ProcessPoolExecutor(2, multiprocessing.get_context("spawn"), _share, (digits,)) as pool:
        made = list(pool.map(_lines, jobs))
    return tuple(
        [line for (split, _, _), part in zip(jobs, made, strict=True) if split == wanted for line in part]
        for wanted in ("train", "val", "plain")
    )


def _chunked(count, size=2000):
    return [min(size, count - start) for start in range(0, count, size)]


_digits = {}


def _share(digits):
    _digits.update(digits)


def _lines(job):
    split, seed, count = job
    if split == "plain":
        return lines.plain_lines(*_digits["val"], count, seed)
    return lines.training_lines(*_digits[split], count, seed)


def batches(written, batch_size, shape, rng=None):
    """[(x, y, indices)]: lines of similar width together (lines.padded); shuffled within and between
    widths when `rng` is given, in order otherwise."""
    order = np.argsort([line.shape[1] for line, _ in written], kind="stable")
    if rng is not None:  # shuffle, then sort by width in coarse steps: similar widths, new company
        order = rng.permutation(len(written))
        order = order[np.argsort([written[i][0].shape[1] // lines.WIDTH_STEP for i in order], kind="stable")]
    groups = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if rng is not None:
        rng.shuffle(groups)
    out = []
    for group in groups:
        x, widths = lines.padded([written[i][0] for i in group])
        counts = [sequence.windows(w, shape) for w in widths]
        out.append((x, sequence.targets([written[i][1] for i in group], counts, lines.MAX_LENGTH), group))
    return out


def window_logits(reader, written, batch_size=256):
    """Each line's window logits, [(windows, CLASSES)], cut to the windows of its own width."""
    found, shape = [None] * len(written), sequence.geometry(reader)
    for x, _, group in batches(written, batch_size, shape):
        logits = reader(x, training=False).numpy()
        for row, i in zip(logits, group, strict=True):
            found[i] = row[: sequence.windows(written[i][0].shape[1], shape)]
    return found


def judged(logits, texts, temperature=1.0):
    """(each reading's path confidence, whether it is right) at this temperature."""
    readings = [sequence.decode(sequence.softmax(z, temperature)) for z in logits]
    right = [sequence.text_of(digits) == text for (digits, _), text in zip(readings, texts, strict=True)]
    return np.array([c for _, c in readings]), np.array(right)


def exact(reader, written):
    """The share of lines read exactly."""
    _, right = judged(window_logits(reader, written), [text for _, text in written])
    return float(right.mean())


def fit(reader, train, val, settings, to_mlflow=True):
    """Train; keep the epoch that reads the most validation lines exactly. Returns the history.
    `to_mlflow`: log each epoch's metrics to the active MLflow run."""
    import keras
    import tensorflow as tf

    rng, shape = np.random.default_rng(settings.seed), sequence.geometry(reader)

    def one_epoch():  # called anew for each epoch: a new shuffle
        for x, y, _ in batches(train, settings.batch_size, shape, rng):
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
            logs["val_exact"] = exact(reader, val)
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
    return epoch_log.rows, best["epoch"]


def digit_answers(digit_model, digit_calibration, logits, written, stride):
    """Per line: what it decodes to, and the digit model's calibrated probabilities for each
    decoded digit's ink (sequence.digit_ink), as the served digit model would answer them."""
    found = [sequence.decode(sequence.softmax(z))[0] for z in logits]  # argmax: the same at any temperature
    crops = [
        sequence.digit_ink(line, f, 1.0, lines.PAD, stride)[1] for (line, _), f in zip(written, found, strict=True)
    ]
    counts = np.cumsum([0, *(len(c) for c in crops)])
    if counts[-1] == 0:  # a reader that reads nothing yet (a tiny test run)
        return found, [np.zeros((0, 10), np.float32)] * len(found)
    images = np.concatenate(crops)[..., None]
    answers = confidence.calibrated(digit_model.predict(images, batch_size=1000, verbose=0), images, digit_calibration)
    return found, [answers[a:b] for a, b in zip(counts[:-1], counts[1:], strict=True)]


def served(reader, digit_model, digit_calibration, written, logits, temperature):
    """`written` lines, whose window_logits are `logits`, read as serving reads them (each digit
    voted): (whether each is read exactly, {rule: each number's confidence} for every rule of
    sequence.CONFIDENCES, whether the digit model agrees with the line reader on every digit)."""
    paths, _ = judged(logits, [text for _, text in written], temperature)
    found, answers = digit_answers(digit_model, digit_calibration, logits, written, sequence.geometry(reader)[0])
    readings = [
        sequence.text_of(sequence.voted(f, sequence.softmax(z, temperature), a))
        for f, z, a in zip(found, logits, answers, strict=True)
    ]
    right = np.array([reading == text for reading, (_, text) in zip(readings, written, strict=True)])
    confidences = {
        rule: np.array([sequence.number_confidence(rule, *line) for line in zip(paths, found, answers, strict=True)])
        for rule in sequence.CONFIDENCES
    }
    return right, confidences, np.array([sequence.agree(*line) for line in zip(found, answers, strict=True)])


def sure_from(confidences, right, accepted_accuracy):
    """The lowest threshold at which the numbers kept are `accepted_accuracy` right in every family
    of lines: {family: confidences}, {family: whether each is right}."""
    return max(confidence.threshold_for(confidences[f], right[f], accepted_accuracy) for f in right)


def steadiest(confidences, right, accepted_accuracy, seed):
    """The rule of sequence.CONFIDENCES that keeps the most numbers sure (the families' mean share)
    in the median of CHOICE_RESAMPLES calibrations on resamples of the lines, and each rule's 2.5,
    50 and 97.5 % points of that share: a rule whose share hangs on a few numbers loses to a
    steadier one."""
    rng = np.random.default_rng(seed)
    shares = {rule: [] for rule in sequence.CONFIDENCES}
    for _ in range(CHOICE_RESAMPLES):
        picks = {f: rng.integers(len(right[f]), size=len(right[f])) for f in right}
        resampled = {f: right[f][picks[f]] for f in right}
        for rule, share in shares.items():
            scores = {f: confidences[f][rule][picks[f]] for f in right}
            threshold = sure_from(scores, resampled, accepted_accuracy)
            share.append(np.mean([np.mean(scores[f] >= threshold) for f in right]))
    spread = {rule: np.percentile(share, [2.5, 50, 97.5]).tolist() for rule, share in shares.items()}
    return max(sequence.CONFIDENCES, key=lambda rule: spread[rule][1]), spread  # the first, on a tie


def calibrate(reader, digit_model, digit_calibration, val, plain, accepted_accuracy, seed=0):
    """The temperature of the windows' logits at which a reading's path probability best predicts
    whether it is right (log-likelihood, on the validation lines); then the number's confidence
    (steadiest) and its threshold (sure_from), on both families of lines: the validation lines, with
    a scanner's variety, and the plain numbers [(line, text, spacing kind)], as read_eval's are."""
    from scipy.optimize import minimize_scalar

    families = {"val": val, "val_plain": [(line, text) for line, text, _ in plain]}
    logits = {family: window_logits(reader, written) for family, written in families.items()}
    texts = [text for _, text in val]

    def loss(log_t):
        c, right = judged(logits["val"], texts, np.exp(log_t))
        c = np.clip(c, 1e-7, 1 - 1e-7)
        return -np.mean(np.where(right, np.log(c), np.log(1 - c)))

    temperature = float(np.exp(minimize_scalar(loss, bounds=(np.log(0.2), np.log(5.0)), method="bounded").x))
    _, right_alone = judged(logits["val"], texts, temperature)
    right, confidences, agreed = {}, {}, {}
    for family, written in families.items():
        right[family], confidences[family], agreed[family] = served(
            reader, digit_model, digit_calibration, written, logits[family], temperature
        )
    chosen, spread = steadiest(confidences, right, accepted_accuracy, seed)
    threshold = sure_from({f: confidences[f][chosen] for f in right}, right, accepted_accuracy)
    kept = {f: confidences[f][chosen] >= threshold for f in right}
    kinds = np.array([kind for *_, kind in plain])
    return {
        "temperature": temperature,
        "confidence": chosen,
        "sure_from": threshold,
        "val_exact": float(right["val"].mean()),
        "val_exact_line_reader_alone": float(right_alone.mean()),
        "val_agreement_share": float(agreed["val"].mean()),
        **{f"val_sure_share_{rule}": share for rule, share in spread.items()},
        **{f"{f}_exact": float(right[f].mean()) for f in families if f != "val"},
        **{f"{f}_sure_share": float(kept[f].mean()) for f in families},
        **{f"{f}_sure_accuracy": float(right[f][kept[f]].mean()) if kept[f].any() else None for f in families},
        **{
            f"val_plain_{kind}_{measure}": value
            for kind in dict.fromkeys(kinds)
            for measure, value in _kept_scores(right["val_plain"][kinds == kind], kept["val_plain"][kinds == kind])
        },
    }


def _kept_scores(right, kept):
    return (
        ("exact", float(right.mean())),
        ("sure_share", float(kept.mean())),
        ("sure_accuracy", float(right[kept].mean()) if kept.any() else None),
    )


def train_reader(params):
    import keras
    import mlflow

    settings = params.read
    require(model_file("cnn"), beside(model_file("cnn"), "calibration"))
    digit_calibration = confidence.read_calibration(beside(model_file("cnn"), "calibration"))
    data = load_arrays(PROCESSED_DIR, ["x_train", "y_train", "x_val", "y_val"])
    training.seed_everything(settings.seed)
    train, val, plain = line_sets(data, settings)
    digit_model = keras.models.load_model(model_file("cnn"), compile=False)
    reader = sequence.build(digit_model)
    print(
        f"train_reader: {reader.count_params():,} parameters, {len(train):,} training and {len(val):,} "
        f"validation lines, {len(plain):,} plain validation numbers, {settings.epochs} epochs",
        flush=True,
    )
    with tracking.training_run(READER, "train_reader", params.mlflow.experiment) as (run, tags):
        mlflow.log_params({"model": READER, **{f"read.{k}": v for k, v in vars(settings).items()}})
        rows, best_epoch = fit(reader, train, val, settings)
        scores = calibrate(
            reader, digit_model, digit_calibration, val, plain, settings.accepted_accuracy, settings.seed
        )
        scores["best_epoch"] = best_epoch
        mlflow.log_param("read.confidence", scores["confidence"])
        mlflow.log_metrics({k: float(v) for k, v in scores.items() if isinstance(v, float | int)})
        mlflow.log_metrics({f"{k}_median": v[1] for k, v in scores.items() if isinstance(v, list)})
        write_outputs(reader, rows, scores, settings)
        version = register(reader, data, val, run, tags, scores)
    print(
        f"train_reader: {scores['val_exact']:.2%} of validation lines read exactly (epoch {best_epoch}); "
        f"sure when {scores['confidence']} reaches {scores['sure_from']:.4f}: {scores['val_sure_share']:.1%} of them "
        f"({scores['val_sure_accuracy'] or 0:.2%} right) and {scores['val_plain_sure_share']:.1%} of the plain numbers "
        f"({scores['val_plain_sure_accuracy'] or 0:.2%} right); registered {version.name} v{version.version}",
        flush=True,
    )


def save(reader, scores, accepted_accuracy, path):
    """The reader at `path` (.keras) and its calibration beside it, for the export stage."""
    with atomic_path(path) as tmp:
        reader.save(tmp)
    calibration = {
        "temperature": scores["temperature"],
        "confidence": scores["confidence"],
        "sure_from": scores["sure_from"],
        # The windows' geometry, for readers of the ONNX graph.
        **dict(zip(("stride", "lost"), sequence.geometry(reader), strict=True)),
        "accepted_accuracy": accepted_accuracy,
        "model_sha256": sha256(path),
    }
    write_json(beside(path, "calibration"), calibration)


def write_outputs(reader, rows, scores, settings):
    save(reader, scores, settings.accepted_accuracy, model_file(READER))
    write_text(TRAIN_REPORTS_DIR / f"{READER}_history.csv", training.history_csv(rows, HISTORY_COLUMNS))
    write_json(TRAIN_REPORTS_DIR / f"{READER}.json", {READER: scores})


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
