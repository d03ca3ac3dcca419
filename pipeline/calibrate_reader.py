"""Stage calibrate_reader: when a number the line reader reads is sure.

Reads the trained line reader (models/reader.keras), the digit CNN with its calibration and gate
(models/cnn.*: it looks at each digit read, as served), and data/processed's validation digits.
Then, on two families of validation numbers, the `read.validation_lines` lines with a scanner's
variety that train_reader chose its epoch on, and plain numbers written from validation digits as
read_eval writes its own (`read.validation_numbers_per_kind`, `_per_length`), each read as serving
reads it (each digit voted by both models):
  1. fits a temperature on the windows' logits, so that a path's probability matches how often
     such readings are right;
  2. of the number's confidences (sequence.CONFIDENCES; one asks the segmenter too), takes the one
     that keeps the most numbers sure, with two thresholds, one for crisp lines and one for soft
     ones (a blurred or low-resolution scan, lines.is_soft by the digit model's `soft_from` and
     `smooth_below`): each the lowest confidence at which the numbers of its kind kept are
     `read.accepted_accuracy` right in each family (the rules, written before their runs:
     docs/reading.md, rules 9, 11 and 12).
The test digits are not read: read_eval measures the result on them.
Writes
  models/reader.calibration.json   the temperature, confidence and thresholds, with the sha256 of
                                   the reader they belong to (the export stage builds them in)
  reports/reader_calibration.json  validation scores of each confidence and of the one taken
and adds the same to the reader's MLflow run and its registered version (tags).
"""

import numpy as np

from pipeline.core import params as params_module
from pipeline.core import tracking
from pipeline.core.files import load_arrays, require, sha256, write_json
from pipeline.core.graph.convert import KerasGraph
from pipeline.core.layout import PROCESSED_DIR, READER, READER_CALIBRATION_FILE, beside, model_file
from pipeline.core.reading import lines, numbers, sequence
from pipeline.core.trust import confidence, gate

FAMILIES = ("lines", "numbers")  # the calibration's: validation lines, plain validation numbers
SOFT_RULE = ("soft_from", "smooth_below")  # what makes a scan soft (lines.is_soft): the digit model's calibration


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
    for i in tqdm(np.flatnonzero(asked), desc="calibrate_reader: the segmenter reads", unit="number", mininterval=10):
        agree[i] = sequence.segmenter_reads(images(i), digits) == served[i]
    return agree


def calibrate(reader, digits, val, plain, accepted_accuracy, soft_rule):
    """The temperature of the windows' logits at which a reading's path probability best predicts
    whether it is right (log-likelihood); then, of the number's confidences (sequence.CONFIDENCES),
    the one that keeps the most numbers sure (the validation lines' share and the plain validation
    numbers' averaged) with its thresholds, one for crisp lines and one for soft ones (lines.is_soft
    by `soft_rule`, the digit model's: its `soft_from` and `smooth_below`): each the lowest at which
    the numbers of its bin kept are `accepted_accuracy` right in each of the two families
    (docs/reading.md, rules 9, 11 and 12). Numbers are read as serving reads them: each digit voted,
    `digits` the served digit model."""
    from scipy.optimize import minimize_scalar

    # Each number's line, ink and placing (sequence.line_of); a validation line is its own ink.
    looks = [(line, line, (1.0, lines.PAD)) for line, _ in val] + [sequence.line_of(image) for image, _ in plain]
    texts = [text for _, text in val] + [text for _, text in plain]
    family = np.repeat(np.arange(len(FAMILIES)), [len(val), len(plain)])
    soft = np.array([lines.is_soft(line, soft_rule) for line, _, _ in looks])
    logits = sequence.window_logits(reader, [(line, text) for (line, _, _), text in zip(looks, texts, strict=True)])

    def image(i):  # what the segmenter reads: dark ink on light paper, as uploads come
        return plain[i - len(val)][0] if i >= len(val) else 255 - np.round(val[i][0] * 255).astype(np.uint8)

    def loss(log_t):
        c, right = sequence.judged(logits, texts, np.exp(log_t))
        c = np.clip(c, 1e-7, 1 - 1e-7)
        return -np.mean(np.where(right, np.log(c), np.log(1 - c)))

    temperature = float(np.exp(minimize_scalar(loss, bounds=(np.log(0.2), np.log(5.0)), method="bounded").x))
    paths, _ = sequence.judged(logits, texts, temperature)
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
        **soft_rule,
        "soft_sure_from": rules[chosen]["soft_sure_from"],
        "val_exact_lines": float(right_in["lines"].mean()),
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


def save(reader, reader_path, scores, accepted_accuracy):
    """The calibration beside the reader at `reader_path` (.keras), for the export stage."""
    calibration = {
        **{key: scores[key] for key in ("temperature", "confidence", "sure_from", "soft_sure_from", *SOFT_RULE)},
        # The windows' geometry, for readers of the ONNX graph.
        **dict(zip(("stride", "lost"), sequence.geometry(reader), strict=True)),
        "accepted_accuracy": accepted_accuracy,
        "model_sha256": sha256(reader_path),
    }
    write_json(beside(reader_path, "calibration"), calibration)
    return calibration


def calibrate_reader(params):
    import keras
    import mlflow

    settings = params.read
    cnn = model_file("cnn")
    require(model_file(READER), cnn, beside(cnn, "calibration"), beside(cnn, "gate"))
    digit_calibration = confidence.read_calibration(beside(cnn, "calibration"))
    digits = KerasGraph(keras.models.load_model(cnn, compile=False), digit_calibration, gate.load(beside(cnn, "gate")))
    reader = keras.models.load_model(model_file(READER), compile=False)
    data = load_arrays(PROCESSED_DIR, ["x_val", "y_val"])
    val = lines.line_sets(data, {"val": settings.validation_lines}, settings.seed)["val"]  # train_reader's
    plain = plain_numbers(data, settings)
    print(f"calibrate_reader: {len(val):,} validation lines and {len(plain):,} plain validation numbers", flush=True)
    soft_rule = {key: digit_calibration[key] for key in SOFT_RULE}
    scores = calibrate(reader, digits, val, plain, settings.accepted_accuracy, soft_rule)
    calibration = save(reader, model_file(READER), scores, settings.accepted_accuracy)
    write_json(READER_CALIBRATION_FILE, {READER: scores})
    run_file = tracking.read_run_file(READER)
    tracking.use_experiment(params.mlflow.experiment)
    with tracking.run(run_id=run_file["run_id"]):
        # Metrics and a tag, not params: the stage reruns on the same training run when only the
        # calibration changes, and MLflow params cannot change.
        mlflow.set_tag("calibration_confidence", scores["confidence"])
        mlflow.log_metrics({f"calibration_{k}": v for k, v in calibration.items() if isinstance(v, float)})
        mlflow.log_metrics({k: v for k, v in scores.items() if k.startswith("val_") and isinstance(v, float)})
        mlflow.log_dict(calibration, "calibration.json")
    tracking.tag_model_version(run_file, {key: calibration[key] for key in ("temperature", "confidence", "sure_from")})
    kept = [
        f"{scores[f'val_sure_share_{name}']:.1%} of the {said} ({scores[f'val_sure_accuracy_{name}'] or 0:.2%} right)"
        for name, said in zip(FAMILIES, ("lines", "plain numbers"), strict=True)
    ]
    print(
        f"calibrate_reader: {scores['val_exact_lines']:.2%} of validation lines and {scores['val_exact_numbers']:.2%} "
        f"of plain validation numbers read exactly (voted); sure when {scores['confidence']} reaches "
        f"{scores['sure_from']:.4f} ({scores['soft_sure_from']:.4f} on soft lines): {' and '.join(kept)}",
        flush=True,
    )


def main():
    params_module.run_stage("calibrate_reader", calibrate_reader)


if __name__ == "__main__":
    main()
