"""The calibration search: the temperatures and the "not sure" threshold that keep every promise
on a model's validation answers. One rule for the calibrate stage and for `digits finetune`.

The answers come as copies, {name: Copy}: digits as the model should read them ("clean", and for a
fine-tuned model the user's held-out images too), each promised `accepted_accuracy` right when
sure, and corrupted copies of them, each promised `accepted_accuracy_under_shift`.
  1. One temperature is fitted on the clean copies (temperature scaling, Guo et al. 2017).
  2. An image is *soft* (a blurred or low-resolution scan) when its faint share reaches what only
     a soft share of clean digits reach and its strokes are smooth, their steepest steps below
     `smooth_below` (confidence.is_soft). Soft images get their own temperature: models are most
     confidently wrong on them, and one temperature for all would make clean digits "not sure" to
     pay for them.
  3. Thresholds from where the clean copies alone put it (the highest any of them asks for) up, and
     soft temperatures from the clean one up, are tried in pairs; of the pairs at which every copy
     keeps its promise, the one that keeps the most answers sure, averaged over the copies, is used.
  4. Each soft share of `calibrate.soft_share_of_clean` is tried the same way, with each smoothness
     of `calibrate.smooth_below`. For each smoothness, the soft share that keeps the most answers
     sure, averaged over the copies, is taken; of the smoothnesses, the one whose rule keeps the most
     copies' promises, then the most answers sure (a tie: the first listed). A model that keeps
     every promise takes the smoothness rule where it keeps more answers sure; the MLP, which cannot,
     the one that fails fewer copies (faint ink alone: docs/off_mnist.md).
Why not the lowest threshold first: then a few clean errors decide how many soft answers are sure,
and that swings with the draw of validation images (docs/off_mnist.md measures it).
"""

from dataclasses import dataclass

import numpy as np

from pipeline.core.trust import confidence, gate

SOFT_TEMPERATURES = 61  # tried from the clean temperature up to 20 times it, evenly in log
THRESHOLDS = 61  # tried from the clean one up to 0.9999, evenly in log(1 - threshold)


@dataclass
class Copy:
    raw: np.ndarray  # the model's softmax outputs, uncalibrated
    images: np.ndarray  # what it answered, (n, 28, 28[, 1]) in MNIST form
    labels: np.ndarray
    clean: bool  # promised accepted_accuracy (True) or accepted_accuracy_under_shift (False)


def copies_of(model, sets, clean):
    """{name: Copy} from {name: (images, labels)}: the model's answers to each set; `clean` names
    the sets promised accepted_accuracy."""
    return {
        name: Copy(model.predict(x, batch_size=1000, verbose=0), x, y, name in clean) for name, (x, y) in sets.items()
    }


def _sure(copy, threshold, temperature, soft, soft_temperature):
    calibrated = confidence.with_temperature(copy.raw, np.where(soft, soft_temperature, temperature))
    return confidence.selective_scores(calibrated, copy.labels, threshold)


def coverage_weights(copies):
    """How much each copy's coverage counts: clean digits, what most inputs are, as much as all the
    shifted copies together."""
    clean = sum(copy.clean for copy in copies.values())
    return {name: 0.5 / clean if copy.clean else 0.5 / (len(copies) - clean) for name, copy in copies.items()}


def _kept_and_covered(confidences, correct, thresholds, accepted_accuracy):
    """At each threshold: whether the answers at or above it are `accepted_accuracy` right (none
    kept keeps it), and the share of answers kept."""
    sure = confidences[None, :] >= thresholds[:, None]
    right, answered = (sure & correct).sum(axis=1), sure.sum(axis=1)
    kept = np.where(answered > 0, right / np.maximum(answered, 1), 1.0) >= accepted_accuracy
    return kept, answered / len(correct)


def shift_aware(copies, ink, temperature, settings, soft_share, smooth_below, weight):
    """The rule for one soft share and smoothness: ({not_sure_below, soft_from, smooth_below,
    soft_temperature}, the threshold the clean copies alone ask for, {copy: share kept sure}, how
    many copies keep their promise). A model that cannot keep every promise
    within the bounds tried (the MLP on noisy digits) keeps its clean threshold and the most careful
    soft temperature: "not sure" on most clean digits would buy it nothing. reports/calibration.json
    shows which copies it fails."""
    target = {
        name: settings.accepted_accuracy if copy.clean else settings.accepted_accuracy_under_shift
        for name, copy in copies.items()
    }
    clean = [name for name, copy in copies.items() if copy.clean]
    soft_from = float(np.quantile(np.concatenate([ink[name].faint for name in clean]), 1 - soft_share))
    rule = {"soft_from": soft_from, "smooth_below": smooth_below}
    soft = {name: confidence.is_soft(measures.faint, measures.steepest, rule) for name, measures in ink.items()}
    clean_threshold = max(
        confidence.not_sure_threshold(
            confidence.with_temperature(copies[name].raw, temperature), copies[name].labels, target[name]
        )
        for name in clean
    )

    soft_temperatures = temperature * np.geomspace(1.0, 20.0, SOFT_TEMPERATURES)
    # (A model right on every clean image can ask for a threshold of 1: geomspace cannot start at 0.)
    thresholds = np.maximum(1 - np.geomspace(max(1 - clean_threshold, 1e-4), 1e-4, THRESHOLDS), clean_threshold)
    # promise_kept[i, j]: every copy keeps its promise at thresholds[i] with soft_temperatures[j];
    # coverage[i, j]: the mean share of a copy's answers sure there.
    promise_kept = np.ones((THRESHOLDS, SOFT_TEMPERATURES), bool)
    coverage = np.zeros((THRESHOLDS, SOFT_TEMPERATURES))
    for name, copy in copies.items():
        correct = copy.raw.argmax(axis=1) == copy.labels
        sharp = confidence.with_temperature(copy.raw, temperature).max(axis=1)
        soft_rows = np.flatnonzero(soft[name])
        if soft_rows.size == 0:  # the soft temperature changes nothing here: scored once for every column
            kept, covered = _kept_and_covered(sharp, correct, thresholds, target[name])
            promise_kept &= kept[:, None]
            coverage += covered[:, None] * weight[name]
            continue
        for j, soft_temperature in enumerate(soft_temperatures):
            scored = sharp.copy()
            scored[soft_rows] = confidence.with_temperature(copy.raw[soft_rows], soft_temperature).max(axis=1)
            kept, covered = _kept_and_covered(scored, correct, thresholds, target[name])
            promise_kept[:, j] &= kept
            coverage[:, j] += covered * weight[name]
    # Of the pairs that keep every promise, the one that keeps the most answers sure over all copies.
    if promise_kept.any():
        i, j = np.unravel_index(np.argmax(np.where(promise_kept, coverage, -1.0)), coverage.shape)
        threshold, soft_temperature = float(thresholds[i]), float(soft_temperatures[j])
    else:
        threshold, soft_temperature = float(clean_threshold), float(soft_temperatures[-1])
    rule = {"not_sure_below": threshold, **rule, "soft_temperature": soft_temperature}
    sure = {name: _sure(copy, threshold, temperature, soft[name], soft_temperature) for name, copy in copies.items()}
    promises = sum(sure[name]["accepted_accuracy"] >= target[name] for name in copies)
    return rule, clean_threshold, {name: scores["coverage"] for name, scores in sure.items()}, promises


@dataclass
class Ink:
    faint: np.ndarray  # each image's share of ink that is faint (gate.ink_shape)
    steepest: np.ndarray  # and its steepest steps (gate.steepest_steps)

    def __getitem__(self, picks):
        return Ink(self.faint[picks], self.steepest[picks])


def ink_of(copies):
    """{name: Ink}: what decides which of each copy's images are soft."""
    return {
        name: Ink(np.asarray(gate.ink_shape(copy.images))[:, 2], np.asarray(gate.steepest_steps(copy.images)))
        for name, copy in copies.items()
    }


def search(copies, settings, ink=None):
    """The calibration for these answers, by the rule in this module's docstring, and the record of
    the search: (calibration {temperature, not_sure_below, soft_from, smooth_below, soft_temperature},
    {clean_digits_alone_ask, soft_share_of_clean, coverage_by_rule}). `settings`: params.yaml's
    `calibrate` section; `ink`: ink_of(copies), when already known."""
    ink = ink_of(copies) if ink is None else ink
    weight = coverage_weights(copies)
    clean = [copy for copy in copies.values() if copy.clean]
    temperature = confidence.fit_temperature(
        np.concatenate([copy.raw for copy in clean]), np.concatenate([copy.labels for copy in clean])
    )
    tried = {
        (share, smooth): shift_aware(copies, ink, temperature, settings, share, smooth, weight)
        for share in settings.soft_share_of_clean
        for smooth in settings.smooth_below
    }

    def coverage(key):
        return sum(weight[name] * share for name, share in tried[key][2].items())

    # For each smoothness, its best soft share; of those, the one keeping the most copies' promises.
    best_share = [
        max(((share, smooth) for share in settings.soft_share_of_clean), key=coverage)
        for smooth in settings.smooth_below
    ]
    share, _ = best = max(best_share, key=lambda key: (tried[key][3], coverage(key)))
    rule, clean_threshold, _, _ = tried[best]
    record = {
        "clean_digits_alone_ask": clean_threshold,
        "soft_share_of_clean": share,
        "coverage_by_rule": {
            f"soft share {share}, smooth below {smooth}": kept for (share, smooth), (_, _, kept, _) in tried.items()
        },
    }
    return {"temperature": temperature, **rule}, record


def coverage_spread(copies, settings, resamples, seed):
    """How much each copy's share marked sure hangs on the draw of validation images: the search
    rerun on `resamples` resamples of every copy (with replacement), each result applied to the
    whole copies. {copy: {"low", "high"}}: the 2.5 and 97.5 % points of its coverage; {} for none."""
    if not resamples:
        return {}
    rng = np.random.default_rng(seed)
    ink = ink_of(copies)
    coverage = {name: [] for name in copies}
    for _ in range(resamples):
        picks = {name: rng.integers(len(copy.labels), size=len(copy.labels)) for name, copy in copies.items()}
        resampled = {
            name: Copy(copy.raw[picks[name]], copy.images[picks[name]], copy.labels[picks[name]], copy.clean)
            for name, copy in copies.items()
        }
        fitted, _ = search(resampled, settings, {name: ink[name][picks[name]] for name in copies})
        for name, copy in copies.items():
            answers = confidence.calibrated(copy.raw, copy.images, fitted)
            coverage[name].append(
                confidence.selective_scores(answers, copy.labels, fitted["not_sure_below"])["coverage"]
            )
    return {
        name: dict(zip(("low", "high"), map(float, np.percentile(shares, [2.5, 97.5])), strict=True))
        for name, shares in coverage.items()
    }
