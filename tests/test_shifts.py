"""The shifts (pipeline/core/shifts/corruptions.py) and printed digits (printed.py): each changes an
image the way its name says, the same way for the same seed, and training draws them only for its
share of a batch."""

import numpy as np
import pytest

from pipeline.core import params
from pipeline.core.shifts import corruptions
from pipeline.core.shifts.printed import print_some
from tests.helpers import ROOT

STRENGTHS = params.load(ROOT / "params.yaml").shifts.strengths
ROWS, COLS = np.mgrid[:28, :28]


def bars(count=8, width=4):
    """Upright bars, well inside the frame."""
    image = np.zeros((28, 28), np.float32)
    image[6:22, 14 - width // 2 : 14 + width - width // 2] = 1.0
    return np.repeat(image[None], count, axis=0)


def centre(images):
    ink = images.sum(axis=(1, 2))
    return (images * ROWS).sum(axis=(1, 2)) / ink, (images * COLS).sum(axis=(1, 2)) / ink


@pytest.mark.parametrize("name", corruptions.CORRUPTIONS)
def test_each_shift_is_seeded_keeps_shape_and_range_and_changes_every_image(name):
    images = bars()[..., None]
    low, high = STRENGTHS[name]
    strength = (low, high) if low < high or name == "lighting" else (low - 2, high + 2)  # something to draw
    out = corruptions.corrupt(images, name, strength, seed=1)
    assert out.shape == images.shape and out.dtype == np.float32 and 0 <= out.min() <= out.max() <= 1
    assert np.array_equal(out, corruptions.corrupt(images, name, strength, seed=1))
    assert not np.array_equal(out, corruptions.corrupt(images, name, strength, seed=2))
    assert (np.abs(out - images).reshape(len(images), -1).max(axis=1) > 0.05).all()


def test_stroke_width_changes_by_about_the_pixels_asked_at_the_writing_resolution():
    images = bars(width=4)
    for name, sign in (("thick", 1), ("thin", -1)):
        for pixels in (0.5, 1.0, 2.0):
            width = corruptions.corrupt(images, name, (pixels, pixels), seed=0).sum(axis=2)[:, 14].mean()
            assert width - 4 == pytest.approx(sign * pixels, abs=0.3)


def test_cut_moves_the_digit_along_one_axis_and_the_frame_cuts_it():
    images = np.zeros((200, 28, 28), np.float32)
    images[:, 2:26, 12:16] = 1.0  # tall and narrow
    out = corruptions.corrupt(images, "cut", (6, 8), seed=0)
    y, x = centre(out)
    moved_down_or_up, moved_sideways = np.abs(y - 13.5) > 1, np.abs(x - 13.5) > 1
    assert not (moved_down_or_up & moved_sideways).any() and moved_down_or_up.any() and moved_sideways.any()
    sideways_ink = out[moved_sideways].sum(axis=(1, 2)) / images[0].sum()
    assert np.allclose(sideways_ink, 1.0, atol=0.02)  # 12 px from the sides: it keeps its ink sideways
    assert (out[moved_down_or_up].sum(axis=(1, 2)) / images[0].sum() < 0.85).all()  # 2 px: cut at top or bottom


def test_lighting_brightens_the_paper_unevenly_and_keeps_the_ink_brightest():
    images = bars(50)
    out = corruptions.corrupt(images, "lighting", (0.3, 0.3), seed=0)
    paper = out[:, :, :6]  # left of the bar
    assert paper.mean() > 0.05 and paper.std(axis=(1, 2)).mean() > 0.02
    assert np.allclose(out[images == 1], 1.0)


def test_jpeg_loses_more_at_lower_quality():
    images = bars(20)
    error = [np.abs(corruptions.corrupt(images, "jpeg", (q, q), seed=0) - images).mean() for q in (5, 30, 90)]
    assert error[0] > error[1] > error[2] > 0


def test_a_scanner_averages_a_thin_stroke_where_sampling_loses_it():
    image = np.zeros((1, 28, 28), np.float32)
    image[0, 4:24, 13] = 1.0  # one pixel wide, between the 8x8 grid's samples (at 11.6 and 15.4)
    sampled = corruptions.corrupt(image, "low_resolution", (8, 8), seed=0)
    averaged = corruptions.corrupt(image, "anti_aliased", (8, 8), seed=0)
    assert averaged.sum() > 0.8 * image.sum()  # the ink is kept, spread out
    assert sampled.sum() < 0.5 * averaged.sum()


def test_blur_and_noise_draw_their_strength_per_image_within_the_range():
    images = bars(100)
    noisy = corruptions.corrupt(images, "noise", (0.1, 0.3), seed=0)
    spread = (noisy - images)[:, :, :6].std(axis=(1, 2)) * 2  # half the noise is clipped at 0
    assert spread.min() > 0.05 and spread.max() < 0.4 and spread.std() > 0.02
    peak = corruptions.corrupt(images, "blur", (1.0, 3.0), seed=0).max(axis=(1, 2))
    assert peak.std() > 0.02


def test_training_shifts_only_its_share_and_the_same_way_for_the_same_seed():
    images = bars(1000)[..., None]

    def shifted(share, seed):
        return corruptions.shift_some(images, list(STRENGTHS), share, STRENGTHS, np.random.default_rng(seed))

    changed = np.abs(shifted(0.3, 4) - images).reshape(len(images), -1).max(axis=1) > 1e-6
    assert 0.25 < changed.mean() < 0.35
    assert np.array_equal(shifted(0.3, 4), shifted(0.3, 4)) and not np.array_equal(shifted(0.3, 4), shifted(0.3, 5))
    assert np.array_equal(shifted(0.0, 4), images)


def test_training_prints_its_share_of_digits_in_mnist_form_with_their_labels_and_the_same_for_the_same_seed():
    labels = np.eye(10, dtype=np.float32)[np.arange(400) % 10]

    def printed(share, seed):
        return print_some(np.zeros((400, 28, 28), np.float32), labels, share, np.random.default_rng(seed))

    images = printed(0.25, 3)
    changed = images.reshape(len(images), -1).max(axis=1) > 0
    assert 0.18 < changed.mean() < 0.32
    assert np.array_equal(images, printed(0.25, 3)) and not np.array_equal(images, printed(0.25, 4))
    rows, cols = centre(images[changed])  # brought to MNIST's form, as an upload is: centred by mass
    assert np.all(np.abs(rows - 13.5) < 1.5) and np.all(np.abs(cols - 13.5) < 1.5)
    # each its own label's digit: a printed 1 is ink in the middle, where a printed 0 has its hole
    # (or, in some fonts, a dot or a slash)
    middle = images[:, 12:16, 12:16].mean(axis=(1, 2))
    digit = labels.argmax(1)
    assert middle[changed & (digit == 1)].mean() > 0.6 > 0.3 > middle[changed & (digit == 0)].mean()


def test_no_printed_share_leaves_the_batch_and_the_generator_untouched():
    rng = np.random.default_rng(0)
    images = bars()
    assert np.array_equal(print_some(images.copy(), np.eye(10)[:8], 0.0, rng), images)
    assert rng.random() == np.random.default_rng(0).random()
