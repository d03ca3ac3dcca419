"""The "not a digit" gate's inputs: generated non-digits and the ink-shape features, on images made here."""

import numpy as np
import pytest

from pipeline.core.trust import gate, nondigits
from tests.helpers import tiny_images


def test_non_digits_are_the_same_for_the_same_seed_and_come_in_every_kind():
    digits = tiny_images(20)[0] / 255.0
    first, again = nondigits.generate(3, 7, digits), nondigits.generate(3, 7, digits)
    assert set(first) == set(nondigits.KINDS)
    for kind in nondigits.KINDS:
        assert all(np.array_equal(a, b) for a, b in zip(first[kind], again[kind], strict=True))
        assert all(image.dtype == np.uint8 and image.ndim == 2 for image in first[kind])
    assert not np.array_equal(nondigits.generate(3, 8, digits)["noise"][0], first["noise"][0])
    # A strip holds 2-4 digits side by side: wider than tall.
    assert all(image.shape[1] >= 2 * 28 for image in first["strips"])


def test_every_font_the_generator_uses_ships_with_matplotlib():
    assert all(nondigits.font_path(name).exists() for name in nondigits.EVAL_FONTS)


def test_ink_shape_tells_a_bar_from_a_stroke_and_handles_a_blank():
    images = np.zeros((3, 28, 28), np.float32)
    images[0, 13:15, 2:26] = 1.0  # a horizontal bar: 24 wide, 2 tall, all ink
    images[1, 4:24, 13] = 0.4  # a faint vertical stroke
    aspect, fill, faint = np.asarray(gate.ink_shape(images)).T
    assert aspect[0] == pytest.approx(np.log(12)) and fill[0] == 1.0 and faint[0] == 0.0
    assert aspect[1] == pytest.approx(np.log(1 / 20)) and faint[1] == 1.0
    assert (aspect[2], fill[2], faint[2]) == (0.0, 1.0, 1.0)


def test_steepest_steps_tell_a_blurred_scan_from_a_noisy_one():
    from scipy import ndimage

    stroke = np.zeros((28, 28), np.float32)
    stroke[4:24, 12:15] = 1.0
    blurred = ndimage.gaussian_filter(stroke, 1.5)
    noisy_paper = np.clip(stroke * 0.45 + np.random.default_rng(0).normal(0, 0.15, (28, 28)), 0, 1)
    steps = np.asarray(gate.steepest_steps(np.stack([stroke, blurred, noisy_paper, np.zeros((28, 28))])))
    assert steps[0] == pytest.approx(1.0, abs=0.05)  # paper to full ink in one pixel
    assert steps[1] < 0.5 < steps[2]  # the blur rises gently; faint ink on noisy paper still jumps
    assert steps[3] == 0.0
    faint = np.asarray(gate.ink_shape(np.stack([blurred, noisy_paper])))[:, 2]
    assert faint.min() > 0.5  # the faint share alone cannot tell them apart
