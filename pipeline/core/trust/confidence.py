"""How far to trust an answer: temperature scaling, calibration error, and the "not sure" threshold.

Shared by the calibrate stage (which fits both on the validation split), evaluate (which measures
them on the test split) and the predictor (which applies them to every answer). NumPy, apart from
the Keras form of temperature scaling that the served and the MLflow-logged models carry.
"""

import json

import numpy as np

ECE_BINS = 15


def with_temperature(probabilities, temperature):
    """Softmax outputs rescaled as if their logits had been divided by `temperature` (one, or one
    per row). The log of a softmax is the logits minus a per-row constant, which the softmax
    cancels, so this is exactly temperature scaling (T > 1 softens, T < 1 sharpens)."""
    logits = np.log(np.maximum(np.asarray(probabilities, np.float64), 1e-30)) / np.reshape(temperature, (-1, 1))
    logits -= logits.max(axis=1, keepdims=True)
    scaled = np.exp(logits)
    return (scaled / scaled.sum(axis=1, keepdims=True)).astype(np.float32)


def is_soft(faint_share, steepest, calibration):
    """Whether an image is *soft* (a blurred or low-resolution scan), from its ink's faint share
    (gate.ink_shape) and its steepest steps (gate.steepest_steps): at least `soft_from` of its ink
    faint and, where the calibration has `smooth_below`, its strokes smooth, their steepest steps
    below it. Faint ink alone also takes in noisy and unevenly lit scans, whose strokes are sharp and
    read as well as clean ones (docs/off_mnist.md, rule 4). NumPy arrays or Keras tensors."""
    soft = faint_share >= calibration["soft_from"]
    if "smooth_below" in calibration:  # calibrated before the smoothness rule: faint ink alone
        soft = soft & (steepest < calibration["smooth_below"])
    return soft


def temperatures(images, calibration):
    """Each image's temperature: `soft_temperature` for a soft image (is_soft), else `temperature`.
    Models are most confidently wrong on such images, so calibrate fits them their own. In Keras
    ops, so that the serving graph computes the same (NumPy in, a tensor out)."""
    from keras import ops

    from pipeline.core.trust.gate import ink_shape, steepest_steps

    if "soft_from" not in calibration:  # calibrated before the soft rule
        return ops.full((ops.shape(images)[0],), calibration["temperature"])
    soft = is_soft(ink_shape(images)[:, 2], steepest_steps(images), calibration)
    return ops.where(soft, calibration["soft_temperature"], calibration["temperature"])


def calibrated(probabilities, images, calibration):
    """with_temperature at each image's temperature (temperatures): what the served graph answers."""
    return with_temperature(probabilities, np.asarray(temperatures(images, calibration)))


def with_temperature_layers(model, temperature):
    """with_temperature as part of a Keras model: its output layer split into logits -> divide by T
    -> softmax, from Keras' own layers, so the model loads anywhere (safe mode, MLflow alone)."""
    import keras

    head = model.get_layer("digit")
    logits = keras.layers.Dense(head.units, name="digit_logits")(head.input)
    outputs = keras.layers.Softmax(name="digit")(keras.layers.Rescaling(1.0 / temperature)(logits))
    calibrated = keras.Model(model.inputs, outputs, name=f"{model.name}_calibrated")
    calibrated.get_layer("digit_logits").set_weights(head.get_weights())
    return calibrated


def negative_log_likelihood(probabilities, labels):
    return float(-np.mean(np.log(np.maximum(probabilities[np.arange(len(labels)), labels], 1e-30))))


def fit_temperature(probabilities, labels):
    """The temperature that minimises the negative log-likelihood of `labels` (Guo et al., 2017)."""
    from scipy.optimize import minimize_scalar  # here: serving reads calibrations and starts fast

    result = minimize_scalar(
        lambda log_t: negative_log_likelihood(with_temperature(probabilities, np.exp(log_t)), labels),
        bounds=(np.log(0.05), np.log(20.0)),
        method="bounded",
    )
    return float(np.exp(result.x))


def expected_calibration_error(probabilities, labels, bins=ECE_BINS):
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by the bins' sizes."""
    confidence, correct = probabilities.max(axis=1), probabilities.argmax(axis=1) == labels
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    return float(
        sum(
            abs(correct[which == b].mean() - confidence[which == b].mean()) * np.mean(which == b)
            for b in range(bins)
            if np.any(which == b)
        )
    )


def most_confident_first(confidence, correct):
    """The answers ranked by confidence, highest first: their confidences, and for every k the
    accuracy of the k most confident (the risk-coverage curve, as accuracy)."""
    order = np.argsort(-confidence, kind="stable")
    return confidence[order], np.cumsum(correct[order]) / np.arange(1, len(correct) + 1)


def not_sure_threshold(probabilities, labels, accepted_accuracy):
    """The lowest confidence whose accepted answers (confidence >= it) are still at least `accepted_accuracy`
    correct: the most answers kept at that accuracy."""
    return threshold_for(probabilities.max(axis=1), probabilities.argmax(axis=1) == labels, accepted_accuracy)


def threshold_for(confidence, correct, accepted_accuracy, groups=None):
    """not_sure_threshold for any answers: their confidences, and whether each is right. With
    `groups` (a label per answer), the answers kept must be that accurate within each group, or as
    accurate as {group: accepted accuracy} asks of each; a group with none kept asks nothing."""
    confidence, correct = np.asarray(confidence), np.asarray(correct, bool)
    groups = np.zeros(len(confidence), int) if groups is None else np.asarray(groups)
    # Only cut at distinct confidences, highest first: a tie is accepted or refused as a whole.
    cuts = np.unique(confidence)[::-1]
    holds = np.ones(len(cuts), bool)
    for group in np.unique(groups):
        target = accepted_accuracy[group] if isinstance(accepted_accuracy, dict) else accepted_accuracy
        mine = groups == group
        order = np.argsort(confidence[mine], kind="stable")
        ranked, right = confidence[mine][order], correct[mine][order]
        right_from = np.append(np.cumsum(right[::-1])[::-1], 0)  # right answers at each rank and above
        first_kept = np.searchsorted(ranked, cuts, side="left")
        kept = len(ranked) - first_kept
        holds &= (kept == 0) | (right_from[first_kept] / np.maximum(kept, 1) >= target)
    return float(cuts[holds][-1]) if holds.any() else 1.0


def selective_scores(probabilities, labels, threshold):
    """Coverage (share answered) and accuracy of the answered ones at `threshold`."""
    confidence, correct = probabilities.max(axis=1), probabilities.argmax(axis=1) == labels
    accepted = confidence >= threshold
    return {
        "coverage": float(accepted.mean()),
        "accepted_accuracy": float(correct[accepted].mean()) if accepted.any() else 1.0,
        "accepted_errors": int(np.sum(accepted & ~correct)),
    }


def calibration_scores(probabilities, labels):
    return {
        "ece": expected_calibration_error(probabilities, labels),
        "nll": negative_log_likelihood(probabilities, labels),
        "mean_confidence": float(probabilities.max(axis=1).mean()),
    }


def is_not_sure(probabilities, not_a_digit, not_sure_below):
    """Whether one answer is "not sure": not a digit at all, or less confident than the threshold."""
    return bool(not_a_digit or np.max(probabilities) < not_sure_below)


def read_calibration(path):
    """{"temperature": T, "not_sure_below": threshold, ...} as the calibrate stage wrote it."""
    calibration = json.loads(path.read_text())
    if not calibration.get("temperature", 0) > 0 or not 0 <= calibration.get("not_sure_below", -1) <= 1:
        raise ValueError(f"{path}: expected a positive temperature and not_sure_below in [0, 1]")
    if "soft_from" in calibration and not calibration.get("soft_temperature", 0) > 0:
        raise ValueError(f"{path}: soft_from needs a positive soft_temperature")
    if "smooth_below" in calibration and "soft_from" not in calibration:
        raise ValueError(f"{path}: smooth_below needs soft_from and soft_temperature")
    return calibration


def not_sure_on_validation(probabilities, labels, accepted_accuracy):
    """What the calibrate stage would fit on these validation answers (temperature, "not sure"
    threshold), and how well confidence ranks them, for choosing a recipe by its "not sure": the
    share kept at that threshold (in-sample) and the area under the risk-coverage curve (the error
    rate of the k most confident answers, averaged over every k; lower is better). Both after the
    temperature, which changes how answers rank against each other."""
    temperature = fit_temperature(probabilities, labels)
    probabilities = with_temperature(probabilities, temperature)
    threshold = not_sure_threshold(probabilities, labels, accepted_accuracy)
    _, accuracy_of_top = most_confident_first(probabilities.max(1), probabilities.argmax(1) == labels)
    scores = {
        "val_not_sure_coverage": selective_scores(probabilities, labels, threshold)["coverage"],
        "val_risk_coverage_area": float(np.mean(1 - accuracy_of_top)),
    }
    return scores, temperature, threshold


def validation_scorecard(model, x_val, labels, corrupted_val, accepted_accuracy, batch_size):
    """What recipes are compared by (sweeps, the benchmark), all on validation: accuracy, accuracy on
    each corrupted copy and their mean, and not_sure_on_validation's scores; with the temperature
    and threshold fitted on the way."""
    probabilities = model.predict(x_val, batch_size=batch_size, verbose=0)
    scores, temperature, threshold = not_sure_on_validation(probabilities, labels, accepted_accuracy)
    corrupted = {
        name: float(np.mean(model.predict(x, batch_size=batch_size, verbose=0).argmax(1) == labels))
        for name, x in corrupted_val.items()
    }
    scorecard = {
        "val_accuracy": float(np.mean(probabilities.argmax(1) == labels)),
        "val_corrupted_mean_accuracy": float(np.mean(list(corrupted.values()))),
        **{f"val_corrupted_{name}_accuracy": value for name, value in corrupted.items()},
        **scores,
    }
    return scorecard, temperature, threshold
