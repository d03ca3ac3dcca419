"""Stage train_reader: the line reader, which reads a whole number without cutting it into digits.

Reads data/processed (training and validation digits; the test digits are read_eval's) and the
trained digit CNN (models/cnn.keras), which gives the reader its eyes (pipeline/core/reading/
sequence.py) and, with its calibration and gate (models/cnn.calibration.json, cnn.gate.pkl), looks
at each digit read, as served.
Then
  1. writes `read.training_lines` lines from training digits and `read.validation_lines` from
     validation digits, every length up to 12, every spacing kind, with scanner variety
     (pipeline/core/reading/lines.py), and plain numbers from validation digits as read_eval writes
     its own (pipeline/core/reading/numbers.py, `read.validation_numbers_per_kind`, `_per_length`);
  2. trains with a CTC loss for `read.epochs` epochs, and keeps the epoch whose model reads the
     most validation lines exactly (the rule, chosen before any run: docs/reading.md);
  3. calibrates the number's confidence on both families of validation numbers, the lines and the
     plain numbers: a temperature on the windows' logits, fitted so that a path's probability
     matches how often such readings are right; then, of the confidences in sequence.CONFIDENCES
     (one asks the segmenter too), the one that keeps the most numbers sure, and its thresholds, one
     for crisp lines and one for soft ones (a blurred or low-resolution scan, by the digit model's
     `soft_from`): each the lowest confidence at which the numbers of its kind kept are
     `read.accepted_accuracy` right in each family.
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
from pipeline.core.graph.convert import KerasGraph
from pipeline.core.layout import PROCESSED_DIR, READER, TRAIN_REPORTS_DIR, beside, model_file
from pipeline.core.reading import lines, numbers, sequence
from pipeline.core.trust import confidence, gate

HISTORY_COLUMNS = ["epoch", "loss", "val_exact", "learning_rate", "seconds"]
FAMILIES = ("lines", "numbers")  # the calibration's: validation lines, plain validation numbers


def line_sets(data, settings):
    """(training lines, validation lines), each [(line, text)]; the test digits are not read."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    jobs = [("train", settings.seed + i, n) for i, n in enumerate(_chunked(settings.training_lines))]
    jobs += [("val", settings.seed + 10_000 + i, n) for i, n in enumerate(_chunked(settings.validation_lines))]
    digits = {split: (data[f"x_{split}"][..., 0], data[f"y_{split}"].argmax(1)) for split in ("train", "val")}
    # Chunks with their own seeds: the lines are the same however many processes write them.
    # spawn, not fork: the workers need NumPy and PIL, not a copy of this process's TensorFlow.
    with ProcessPoolExecutor(2, multiprocessing.get_context("spawn"), _share, (digits,)) as pool:
        made = list(pool.map(_lines, jobs))
    train = [line for (split, _, _), part in zip(jobs, made, strict=True) if split == "train" for line in part]
    val = [line for (split, _, _), part in zip(jobs, made, strict=True) if split == "val" for line in part]
    return train, val


def _chunked(count, size=2000):
    return [min(size, count - start) for start in range(0, count, size)]


_digits = {}


def _share(digits):
    _digits.update(digits)


def _lines(job):
    split, seed, count = job
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


def plain_numbers(data, settings):
    """Plain numbers written from validation digits as read_eval writes its own from test digits
    (numbers.evaluation_sets), seeded: [(image, text)], the calibration's second family."""
    rng = np.random.default_rng(settings.seed + 20_000)
    sets = numbers.evaluation_sets(settings.validation_numbers_per_kind, settings.validation_numbers_per_length)
    return [
        (image, text)
        for lengths, kind, count in sets.values()
        for image, text, _ in numbers.sample(data["x_val"], data["y_val"], lengths, kind, count, rng)
    ]


def digit_answers(digits, logits, looks, stride):
    """Per number: what it decodes to, and the digit model's calibrated probabilities for each
    decoded digit's ink (sequence.digit_ink), as the served digit model (`digits`) answers. `looks`:
    each number's (line, ink, (scale, left)), as sequence.line_of gives them."""
    found = [sequence.decode(sequence.softmax(z))[0] for z in logits]  # argmax: the same at any temperature
    crops = [
        sequence.digit_ink(ink, f, scale, left, stride)[1]
        for (_, ink, (scale, left)), f in zip(looks, found, strict=True)
    ]
    counts = np.cumsum([0, *(len(c) for c in crops)])
    if counts[-1] == 0:  # a reader that reads nothing yet (a tiny test run)
        return found, [np.zeros((0, 10), np.float32)] * len(found)
    answers, _ = digits.predict(np.concatenate(crops))
    return found, [answers[a:b] for a, b in zip(counts[:-1], counts[1:], strict=True)]


def both_readers_agree(digits, images, served, asked):
    """Per number: whether the segmenter reads the number served, asked only where `asked`
    (elsewhere False), as serving asks it only about numbers that would be sure. `images`: each
    number's image, by index."""
    from tqdm import tqdm

    agree = np.zeros(len(served), bool)
    for i in tqdm(np.flatnonzero(asked), desc="train_reader: the segmenter reads", unit="number", mininterval=10):
        agree[i] = sequence.segmenter_reads(images(i), digits) == served[i]
    return agree


def calibrate(reader, digits, val, plain, accepted_accuracy, soft_from):
    """The temperature of the windows' logits at which a reading's path probability best predicts
    whether it is right (log-likelihood); then, of the number's confidences (sequence.CONFIDENCES),
    the one that keeps the most numbers sure (the validation lines' share and the plain validation
    numbers' averaged) with its thresholds, one for crisp lines and one for soft ones (at least
    `soft_from` of the ink faint, lines.faint_share): each the lowest at which the numbers of its
    bin kept are `accepted_accuracy` right in each of the two families (docs/reading.md, rules 9
    and 11). Numbers are read as serving reads them: each digit voted, `digits` the served digit
    model."""
    from scipy.optimize import minimize_scalar

    # Each number's line, ink and placing (sequence.line_of); a validation line is its own ink.
    looks = [(line, line, (1.0, lines.PAD)) for line, _ in val] + [sequence.line_of(image) for image, _ in plain]
    texts = [text for _, text in val] + [text for _, text in plain]
    family = np.repeat(np.arange(len(FAMILIES)), [len(val), len(plain)])
    soft = np.array([lines.faint_share(line) >= soft_from for line, _, _ in looks])
    logits = window_logits(reader, [(line, text) for (line, _, _), text in zip(looks, texts, strict=True)])

    def image(i):  # what the segmenter reads: dark ink on light paper, as uploads come
        return plain[i - len(val)][0] if i >= len(val) else 255 - np.round(val[i][0] * 255).astype(np.uint8)

    def loss(log_t):
        c, right = judged(logits, texts, np.exp(log_t))
        c = np.clip(c, 1e-7, 1 - 1e-7)
        return -np.mean(np.where(right, np.log(c), np.log(1 - c)))

    temperature = float(np.exp(minimize_scalar(loss, bounds=(np.log(0.2), np.log(5.0)), method="bounded").x))
    paths, right_alone = judged(logits, texts, temperature)
    found, answers = digit_answers(digits, logits, looks, sequence.geometry(reader)[0])
    # What serving answers: each digit voted by both models (sequence.voted).
    served = [
        sequence.text_of(sequence.voted(f, sequence.softmax(z, temperature), a))
        for f, z, a in zip(found, logits, answers, strict=True)
    ]
    right = np.array([text == truth for text, truth in zip(served, texts, strict=True)])
    confidences = {
        rule: np.array([sequence.number_confidence(rule, *seen) for seen in zip(paths, found, answers, strict=True)])
        for rule in sequence.CONFIDENCES
    }
    both = confidences[sequence.BOTH_READERS]
    both[~both_readers_agree(digits, image, served, both > 0)] = 0.0

    def per_family(values):
        return {name: values[family == f] for f, name in enumerate(FAMILIES)}

    rules = {}
    for rule, score in confidences.items():
        on_crisp, on_soft = (
            confidence.threshold_for(score[soft == b], right[soft == b], accepted_accuracy, family[soft == b])
            for b in (False, True)
        )
        kept = per_family(score >= np.where(soft, on_soft, on_crisp))
        share = np.mean([k.mean() for k in kept.values()])
        rules[rule] = {"sure_from": on_crisp, "soft_sure_from": on_soft, "kept": kept, "share": share}
    chosen = max(sequence.CONFIDENCES, key=lambda rule: rules[rule]["share"])  # the first, on a tie
    kept, right_in = rules[chosen]["kept"], per_family(right)
    scores = {
        "temperature": temperature,
        "confidence": chosen,
        "sure_from": rules[chosen]["sure_from"],
        "soft_from": soft_from,
        "soft_sure_from": rules[chosen]["soft_sure_from"],
        "val_exact": float(right_in["lines"].mean()),
        "val_exact_line_reader_alone": float(per_family(right_alone)["lines"].mean()),
        "val_exact_numbers": float(right_in["numbers"].mean()),
        "val_agreement_share": float(np.mean([sequence.agree(*seen) for seen in zip(found, answers, strict=True)])),
        **{f"val_soft_share_{name}": float(share.mean()) for name, share in per_family(soft).items()},
        **{f"val_sure_share_{rule}": float(rules[rule]["share"]) for rule in sequence.CONFIDENCES},
        "val_sure_share": float(rules[chosen]["share"]),
    }
    for name in FAMILIES:
        scores[f"val_sure_share_{name}"] = float(kept[name].mean())
        scores[f"val_sure_accuracy_{name}"] = float(right_in[name][kept[name]].mean()) if kept[name].any() else None
    return scores


def train_reader(params):
    import keras
    import mlflow

    settings = params.read
    require(model_file("cnn"), beside(model_file("cnn"), "calibration"), beside(model_file("cnn"), "gate"))
    digit_calibration = confidence.read_calibration(beside(model_file("cnn"), "calibration"))
    data = load_arrays(PROCESSED_DIR, ["x_train", "y_train", "x_val", "y_val"])
    training.seed_everything(settings.seed)
    train, val = line_sets(data, settings)
    plain = plain_numbers(data, settings)
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
        digits = KerasGraph(digit_model, digit_calibration, gate.load(beside(model_file("cnn"), "gate")))
        scores = calibrate(reader, digits, val, plain, settings.accepted_accuracy, digit_calibration["soft_from"])
        scores["best_epoch"] = best_epoch
        mlflow.log_param("read.confidence", scores["confidence"])
        mlflow.log_metrics({k: float(v) for k, v in scores.items() if isinstance(v, float | int)})
        write_outputs(reader, rows, scores, settings)
        version = register(reader, data, val, run, tags, scores)
    print(
        f"train_reader: {scores['val_exact']:.2%} of validation lines read exactly (epoch {best_epoch}); "
        f"sure when {scores['confidence']} reaches {scores['sure_from']:.4f} ({scores['soft_sure_from']:.4f} on soft "
        f"lines): {scores['val_sure_share_lines']:.1%} "
        f"of them ({scores['val_sure_accuracy_lines'] or 0:.2%} right) and {scores['val_sure_share_numbers']:.1%} of "
        f"plain validation numbers ({scores['val_sure_accuracy_numbers'] or 0:.2%} right); "
        f"registered {version.name} v{version.version}",
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
        "soft_from": scores["soft_from"],
        "soft_sure_from": scores["soft_sure_from"],
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
