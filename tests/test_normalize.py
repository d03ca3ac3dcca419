import io

import numpy as np
import pytest
from PIL import Image

from pipeline.core import normalize
from tests.helpers import draw_digit_seven


def centre_of_mass(image):
    rows, cols = np.indices(image.shape)
    return (rows * image).sum() / image.sum(), (cols * image).sum() / image.sum()


def encode(image, fmt):
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def test_off_centre_digit_on_white_canvas_comes_out_centred_in_mnist_polarity():
    digit = normalize.to_mnist(draw_digit_seven(offset=(20, 10)))
    assert digit.shape == (28, 28) and digit.dtype == np.float32
    assert 0.0 <= digit.min() and digit.max() <= 1.0
    assert digit[0].max() == 0 and digit[:, 0].max() == 0  # background is black (0), ink bright
    r, c = centre_of_mass(digit)
    assert abs(r - 13.5) <= 1.0 and abs(c - 13.5) <= 1.0
    rows, cols = np.nonzero(digit > 0.1)
    assert max(rows.max() - rows.min(), cols.max() - cols.min()) + 1 in (19, 20, 21)  # fitted into 20x20


def test_centring_by_mass_moves_the_ink_as_a_block_and_never_off_the_field():
    digit = np.zeros((20, 20))
    digit[0, 0], digit[19, 19] = 1.0, 0.01  # the mass at one corner would push the other corner off
    centred = normalize.centre_by_mass(digit)
    # Pasted at (4, 4); its centre of mass asks for about 9 rows and columns down and right, and
    # the light corner allows 4.
    assert centred.sum() == pytest.approx(digit.sum())
    assert centred[8, 8] == 1.0 and centred[27, 27] == 0.01
    assert np.count_nonzero(centred) == 2


def test_polarity_colour_and_alpha_give_the_same_digit():
    reference = normalize.to_mnist(draw_digit_seven())
    inverted = normalize.to_mnist(draw_digit_seven(ink=(235, 235, 235), paper=(10, 10, 10)))
    grey = normalize.to_mnist(draw_digit_seven(ink=30, paper=250, mode="L"))
    transparent = normalize.to_mnist(draw_digit_seven(ink=(0, 0, 0, 255), paper=(0, 0, 0, 0), mode="RGBA"))
    for other in (inverted, grey, transparent):
        assert np.abs(other - reference).mean() < 0.03


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "GIF", "WEBP"])
def test_every_format_decodes_to_the_same_digit(fmt):
    reference = normalize.to_mnist(draw_digit_seven())
    decoded = normalize.to_mnist(normalize.decode(encode(draw_digit_seven(), fmt), f"seven.{fmt.lower()}"))
    assert np.abs(decoded - reference).mean() < 0.05


def test_mnist_digit_survives_normalisation():
    square = np.zeros((28, 28), np.uint8)
    square[6:22, 9:19] = 255
    out = normalize.to_mnist(square)
    r, c = centre_of_mass(out)
    assert abs(r - 13.5) <= 0.6 and abs(c - 13.5) <= 0.6


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty file"),
        (b"GIF89a but not really", "not an image"),
        (encode(draw_digit_seven(), "PNG")[:200], "corrupt or truncated"),
    ],
)
def test_bad_files_give_clear_errors(data, message):
    with pytest.raises(normalize.ImageError, match=message):
        normalize.decode(data, "upload.png")


def test_blank_image_and_bad_arrays():
    with pytest.raises(normalize.ImageError, match="blank"):
        normalize.to_mnist(Image.new("RGB", (100, 100), "white"))
    with pytest.raises(normalize.ImageError, match=r"expected \(28, 28\)"):
        normalize.from_array(np.zeros((28, 27)))
    with pytest.raises(normalize.ImageError, match="finite"):
        normalize.from_array(np.full((28, 28), np.nan))
    assert normalize.from_array(np.full((28, 28), 255)).max() == 1.0


def test_decompression_bomb_is_refused_before_decoding():
    bomb = encode(Image.new("L", (8000, 6000), 255), "PNG")  # ~60 kB that decodes to 48 megapixels
    assert len(bomb) < normalize.MAX_BYTES
    with pytest.raises(normalize.ImageError, match="pixel limit"):
        normalize.decode(bomb, "bomb.png")
