"""Temperature scaling, calibration error and the "not sure" threshold, on numbers made here."""

import json

import numpy as np
import pytest

from pipeline.core.trust import confidence
from tests.helpers import ROOT


def softmax(logits):
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def sampled(n=20000, sharpness=3.0, seed=0):
    """Logits, and labels drawn from softmax(logits): a model whose softmax(logits) is calibrated."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, 10)) * sharpness
    truth = softmax(logits)
    labels = np.array([rng.choice(10, p=p) for p in truth])
    return logits, labels


def test_temperature_keeps_the_answer_and_one_is_the_identity():
    logits, _ = sampled(500)
    p = softmax(logits)
    np.testing.assert_allclose(confidence.with_temperature(p, 1.0), p, atol=1e-6)
    np.testing.assert_allclose(confidence.with_temperature(p, 0.5), softmax(logits / 0.5), atol=1e-5)
    assert (confidence.with_temperature(p, 0.3).argmax(axis=1) == p.argmax(axis=1)).all()


def test_fitting_recovers_the_temperature_that_made_a_model_under_confident():
    logits, labels = sampled()
    under_confident = softmax(logits * 0.4)  # as label smoothing leaves a model: logits too small
    temperature = confidence.fit_temperature(under_confident, labels)
    assert temperature == pytest.approx(0.4, rel=0.08)
    fixed = confidence.with_temperature(under_confident, temperature)
    assert confidence.expected_calibration_error(under_confident, labels) > 0.1
    assert confidence.expected_calibration_error(fixed, labels) < 0.02
    assert confidence.negative_log_likelihood(fixed, labels) < confidence.negative_log_likelihood(
        under_confident, labels
    )


def test_the_not_sure_threshold_keeps_the_most_answers_at_the_target_accuracy():
    # 1,000 answers, most confident first; the 3 wrong ones sit at ranks 100, 500 and 900.
    confident = np.linspace(0.999, 0.5, 1000)
    probabilities = np.zeros((1000, 10))
    probabilities[:, 0] = confident
    probabilities[:, 1] = 1 - confident
    labels = np.zeros(1000, int)
    labels[[100, 500, 900]] = 1
    threshold = confidence.not_sure_threshold(probabilities, labels, accepted_accuracy=0.9975)
    kept = confidence.selective_scores(probabilities, labels, threshold)
    # Every answer down to the third mistake is kept: 2 wrong in 900 is 99.78 %; 3 in 1,000 would be 99.7 %.
    assert kept["coverage"] == pytest.approx(0.9) and kept["accepted_errors"] == 2
    assert kept["accepted_accuracy"] >= 0.9975
    assert confidence.not_sure_threshold(probabilities, labels, accepted_accuracy=1.0) == pytest.approx(confident[99])


def test_tied_confidences_are_kept_or_refused_together():
    probabilities = np.zeros((4, 10))
    probabilities[:, 0] = [0.9, 0.8, 0.8, 0.7]
    labels = np.array([0, 0, 1, 0])
    assert confidence.not_sure_threshold(probabilities, labels, accepted_accuracy=1.0) == pytest.approx(0.9)


def test_a_threshold_for_groups_keeps_its_promise_in_each_group_even_where_the_pooled_answers_would():
    # Group 0: right down to 0.5. Group 1: wrong at 0.95 and 0.75, right elsewhere.
    scores = np.r_[np.linspace(0.99, 0.5, 50), [0.98, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7]]
    right = np.r_[np.ones(50, bool), [True, False, True, True, True, False, True]]
    groups = np.r_[np.zeros(50, int), np.ones(7, int)]
    pooled = confidence.threshold_for(scores, right, 0.95)
    assert right[scores >= pooled].mean() >= 0.95 and not right[(scores >= pooled) & (groups == 1)].all()
    each = confidence.threshold_for(scores, right, 0.95, groups)
    # Group 1's answers at 0.95 and above are 1 wrong in 2: the threshold is the lowest score above it.
    assert each == pytest.approx(scores[scores > 0.95].min())
    assert all(right[(scores >= each) & (groups == g)].mean() >= 0.95 for g in (0, 1))
    # A group with no answer at or above the threshold asks nothing.
    assert confidence.threshold_for(scores[:50], right[:50], 0.95, groups[:50]) == pytest.approx(0.5)
    # A promise per group: group 1 asked 75 % only, 4 of its 5 answers at 0.8 and above are enough.
    own = confidence.threshold_for(scores, right, {0: 0.95, 1: 0.75}, groups)
    assert own == pytest.approx(scores[scores > 0.75].min()) and own < each
    assert right[(scores >= own) & (groups == 1)].mean() >= 0.75 > right[(scores >= 0.75) & (groups == 1)].mean()


def test_a_broken_calibration_file_is_named(tmp_path):
    path = tmp_path / "cnn.calibration.json"
    path.write_text(json.dumps({"temperature": -1, "not_sure_below": 0.5}))
    with pytest.raises(ValueError, match="cnn.calibration.json"):
        confidence.read_calibration(path)


def test_the_keras_form_of_temperature_scaling_matches_the_numpy_form_and_keeps_the_gate_features():
    import keras

    from pipeline.core import models, params
    from pipeline.core.trust import gate

    keras.utils.set_random_seed(0)
    model = models.build(params.load(ROOT / "params.yaml").mlp)
    images = np.random.default_rng(0).random((16, 28, 28, 1)).astype(np.float32)
    calibrated = confidence.with_temperature_layers(model, 0.45)
    raw, features = gate.with_features(model).predict(images, verbose=0)
    sharpened, same_features = gate.with_features(calibrated).predict(images, verbose=0)
    np.testing.assert_allclose(sharpened, confidence.with_temperature(raw, 0.45), atol=1e-5)
    assert not np.allclose(sharpened, raw, atol=1e-3)
    np.testing.assert_array_equal(same_features, features)


def soft_copies(n=3000, seed=0):
    """Clean digits: solid ink, calibrated answers. A "low resolution" copy: faint ink, and 10 % of
    its answers confidently wrong, as models are on 8x8 scans. ({name: Copy}, raw, images, labels)"""
    from pipeline.core.trust import calibration

    rng = np.random.default_rng(seed)
    logits, labels = sampled(n, sharpness=4.0, seed=seed)
    sharp = np.zeros((n, 28, 28, 1), np.float32)
    sharp[:, 8:20, 12:16] = 1.0
    soft = sharp * 0.3
    for image, faint_pixels in zip(sharp, rng.integers(0, 4, n), strict=True):
        image[21, 12 : 12 + faint_pixels] = 0.3  # clean digits have a little faint ink too, some more
    wrong = rng.random(n) < 0.1
    blurred = logits.copy()
    blurred[np.arange(n), labels] += 4.0  # confident where right ...
    blurred[np.arange(n), (labels + 1) % 10] += np.where(wrong, 12.0, 0.0)  # ... and where wrong
    raw = {"clean": softmax(logits), "low_resolution": softmax(blurred)}
    images = {"clean": sharp, "low_resolution": soft}
    copies = {name: calibration.Copy(raw[name], images[name], labels, name == "clean") for name in raw}
    return copies, raw, images, labels


def test_soft_images_get_their_own_temperature_so_every_copy_keeps_its_promise():
    # One temperature cannot keep the under-shift promise on the low-resolution copy without making
    # clean digits "not sure"; a soft one can.
    from pipeline.core import params
    from pipeline.core.trust import calibration as search

    settings = params.load(ROOT / "params.yaml")
    copies, raw, images, labels = soft_copies()

    calibration, record = search.search(copies, settings.calibrate)
    temperature, rule, clean_threshold = calibration["temperature"], calibration, record["clean_digits_alone_ask"]
    assert rule["soft_temperature"] > temperature
    assert rule["not_sure_below"] == pytest.approx(clean_threshold)  # clean digits pay nothing
    for name, target in (("clean", 0.999), ("low_resolution", 0.996)):
        probabilities = confidence.with_temperature(
            raw[name], np.asarray(confidence.temperatures(images[name], calibration))
        )
        assert confidence.selective_scores(probabilities, labels, rule["not_sure_below"])["accepted_accuracy"] >= target
    one_temperature = confidence.with_temperature(raw["low_resolution"], temperature)
    assert confidence.selective_scores(one_temperature, labels, clean_threshold)["accepted_accuracy"] < 0.996


def test_faint_ink_is_soft_only_where_its_strokes_are_smooth_too():
    from scipy import ndimage

    stroke = np.zeros((28, 28), np.float32)
    stroke[4:24, 12:15] = 1.0
    noisy = np.clip(stroke * 0.45 + np.random.default_rng(0).normal(0, 0.15, (28, 28)), 0, 1)
    images = np.stack([stroke, ndimage.gaussian_filter(stroke, 1.5), noisy])[..., None]
    rule = {"temperature": 0.5, "soft_from": 0.3, "soft_temperature": 2.0}
    faint_alone = np.asarray(confidence.temperatures(images, rule))
    with_smoothness = np.asarray(confidence.temperatures(images, {**rule, "smooth_below": 0.5}))
    np.testing.assert_array_equal(faint_alone, [0.5, 2.0, 2.0])  # a calibration made before the smoothness rule
    np.testing.assert_array_equal(with_smoothness, [0.5, 2.0, 0.5])  # the noisy scan's strokes are sharp


def test_the_search_writes_the_smoothness_rule_into_the_calibration():
    from pipeline.core import params
    from pipeline.core.trust import calibration

    settings = params.load(ROOT / "params.yaml").calibrate
    fitted, record = calibration.search(soft_copies(500)[0], settings)
    assert fitted["smooth_below"] in settings.smooth_below
    assert len(record["coverage_by_rule"]) == len(settings.soft_share_of_clean) * len(settings.smooth_below)


def test_a_model_confidently_wrong_on_noisy_scans_gets_the_soft_temperature_for_them_too():
    # The same answers as the low-resolution copy's, on faint ink with sharp strokes (noisy paper):
    # only faint ink alone (smooth_below 2) gives them the soft temperature that keeps their promise.
    from pipeline.core import params
    from pipeline.core.trust import calibration

    settings = params.load(ROOT / "params.yaml").calibrate
    copies, raw, images, labels = soft_copies(2000)
    noise = np.random.default_rng(1).normal(0, 0.2, images["clean"].shape)
    noisy = np.clip(images["clean"] * 0.45 + noise, 0, 1).astype(np.float32)
    copies["noise"] = calibration.Copy(raw["low_resolution"], noisy, labels, False)
    fitted, _ = calibration.search(copies, settings)
    assert fitted["smooth_below"] == 2.0
    for name, copy in copies.items():
        answers = confidence.calibrated(copy.raw, copy.images, fitted)
        kept = confidence.selective_scores(answers, labels, fitted["not_sure_below"])
        assert kept["accepted_accuracy"] >= (0.999 if copy.clean else 0.996), name
    # Without the noisy copy, smoothness asks for no more "not sure" and is taken.
    del copies["noise"]
    assert calibration.search(copies, settings)[0]["smooth_below"] == 0.5


def test_the_coverage_spread_over_resamples_narrows_with_more_validation_images():
    from pipeline.core import params
    from pipeline.core.trust import calibration

    settings = params.load(ROOT / "params.yaml").calibrate
    few = calibration.coverage_spread(soft_copies(400)[0], settings, resamples=8, seed=0)
    many = calibration.coverage_spread(soft_copies(2000)[0], settings, resamples=8, seed=0)
    assert set(few) == set(many) == {"clean", "low_resolution"}
    for spread in (few, many):
        assert all(0 <= s["low"] <= s["high"] <= 1 for s in spread.values())
    width = {name: (s["high"] - s["low"], many[name]["high"] - many[name]["low"]) for name, s in few.items()}
    assert width["clean"][0] > width["clean"][1] > 0
    assert calibration.coverage_spread(soft_copies(400)[0], settings, resamples=8, seed=0) == few
    assert calibration.coverage_spread(soft_copies(400)[0], settings, resamples=0, seed=0) == {}  # off


def test_a_model_that_asks_for_a_threshold_of_one_still_gets_a_calibration():
    """Tiny runs can leave a model whose clean answers all need a threshold of 1."""
    from pipeline.core import params
    from pipeline.core.trust import calibration

    copies, _, _, labels = soft_copies(200)
    wrong = np.eye(10)[(labels + 1) % 10] * 0.98 + 0.002  # every answer confidently wrong
    copies["clean"] = calibration.Copy(wrong, copies["clean"].images, labels, True)
    fitted, record = calibration.search(copies, params.load(ROOT / "params.yaml").calibrate)
    assert record["clean_digits_alone_ask"] >= fitted["not_sure_below"] - 1e-9 >= 0.9999 - 1e-9
