"""The calibration search: the temperatures and the "not sure" threshold that keep every promise
on a model's validation answers. One rule for the calibrate stage and for `digits finetune`.

The answers come as copies, {name: Copy}: digits as the model should read them ("clean", and for a
fine-tuned model the user's held-out images too), each promised `accepted_accuracy` right when
sure, and corrupted copies of them, each promised `accepted_accuracy_under_shift`.
  1. One temperature is fitted on the clean copies (temperature scaling, Guo et al. 2017).
  2. The threshold starts where the clean copies alone put it (the highest any of them asks for).
  3. An image is *soft* (a blurred or low-resolution scan: much of its ink faint) when its faint
     share reaches what only `soft_share_of_clean` of clean digits reach. Soft images get their own
     temperature, the lowest from the clean one up at which every copy keeps its promise; only if
     none does, the threshold rises. Models are most confidently wrong on soft images, and one
     temperature for all would make clean digits "not sure" to pay for them.
  4. Each soft share of `calibrate.soft_share_of_clean` is tried: the one that keeps the most clean
     answers sure wins; within 0.1 point of it, the one that keeps the most answers sure over all
     copies.
"""

from dataclasses import dataclass

import numpy as np

from pipeline.core.trust import confidence, gate

SOFT_TEMPERATURES = 61  # tried from the clean temperature up to 20 times it, evenly in log
THRESHOLDS = 31  # tried from the clean one up, halving the distance to 1 every 10 steps
NEAR_BEST_COVERAGE = 0.001  # soft shares within this of the best clean coverage count as tied


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


def shift_aware(copies, temperature, settings, soft_share):
    """The rule for one soft share: ({not_sure_below, soft_from, soft_temperature}, the threshold the
    clean copies alone ask for, {copy: share kept sure}). A model that cannot keep every promise
    within the bounds tried (the MLP on noisy digits) keeps its clean threshold and the most careful
    soft temperature: "not sure" on most clean digits would buy it nothing. reports/calibration.json
    shows which copies it fails."""
    target = {
        name: settings.accepted_accuracy if copy.clean else settings.accepted_accuracy_under_shift
        for name, copy in copies.items()
    }
    faint = {name: np.asarray(gate.ink_shape(copy.images))[:, 2] for name, copy in copies.items()}
    clean = [name for name, copy in copies.items() if copy.clean]
    soft_from = float(np.quantile(np.concatenate([faint[name] for name in clean]), 1 - soft_share))
    soft = {name: share >= soft_from for name, share in faint.items()}
    clean_threshold = max(
        confidence.not_sure_threshold(
            confidence.with_temperature(copies[name].raw, temperature), copies[name].labels, target[name]
        )
        for name in clean
    )

    def promise_kept(threshold, soft_temperature):
        return all(
            _sure(copy, threshold, temperature, soft[name], soft_temperature)["accepted_accuracy"] >= target[name]
            for name, copy in copies.items()
        )

    soft_temperatures = temperature * np.geomspace(1.0, 20.0, SOFT_TEMPERATURES)
    thresholds = 1 - (1 - clean_threshold) * 0.5 ** (np.arange(THRESHOLDS) / 10)
    threshold, soft_temperature = next(
        ((float(th), float(t)) for th in thresholds for t in soft_temperatures if promise_kept(th, t)),
        (float(clean_threshold), float(soft_temperatures[-1])),
    )
    rule = {"not_sure_below": threshold, "soft_from": soft_from, "soft_temperature": soft_temperature}
    kept = {
        name: _sure(copy, threshold, temperature, soft[name], soft_temperature)["coverage"]
        for name, copy in copies.items()
    }
    return rule, clean_threshold, kept


def search(copies, settings):
    """The calibration for these answers, by the rule in this module's docstring, and the record of
    the search: (calibration {temperature, not_sure_below, soft_from, soft_temperature},
    {clean_digits_alone_ask, soft_share_of_clean, coverage_by_soft_share}). `settings`: params.yaml's
    `calibrate` section."""
    clean = [copy for copy in copies.values() if copy.clean]
    temperature = confidence.fit_temperature(
        np.concatenate([copy.raw for copy in clean]), np.concatenate([copy.labels for copy in clean])
    )
    tried = {share: shift_aware(copies, temperature, settings, share) for share in settings.soft_share_of_clean}

    def clean_coverage(kept):
        return np.mean([kept[name] for name, copy in copies.items() if copy.clean])

    most_clean = max(clean_coverage(kept) for _, _, kept in tried.values())
    share = max(
        (share for share, (_, _, kept) in tried.items() if clean_coverage(kept) >= most_clean - NEAR_BEST_COVERAGE),
        key=lambda share: np.mean(list(tried[share][2].values())),
    )
    rule, clean_threshold, _ = tried[share]
    record = {
        "clean_digits_alone_ask": clean_threshold,
        "soft_share_of_clean": share,
        "coverage_by_soft_share": {str(k): kept for k, (_, _, kept) in tried.items()},
    }
    return {"temperature": temperature, **rule}, record
