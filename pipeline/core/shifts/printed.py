"""Printed digits, rendered from the fonts matplotlib ships (PyPI): type, where MNIST is
handwriting, the one off-MNIST family that corruptions of handwriting cannot make. Training draws
them from the DejaVu fonts only (TRAINING_FONTS), so the others measure type no model saw.
Each image is one digit in one font with light augmentation (size, a small rotation, position,
stroke weight, paper noise), dark ink on white paper at any size, as a user's scan arrives.
Deterministic from the generator given."""

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from pipeline.core import normalize
from pipeline.core.trust.nondigits import font_path

# Every font matplotlib ships with the ten digits at their usual code points, by family.
TRAINING_FONTS = (
    *(f"DejaVuSans{style}" for style in ("", "-Bold", "-Oblique", "-BoldOblique")),
    *(f"DejaVuSansMono{style}" for style in ("", "-Bold", "-Oblique", "-BoldOblique")),
    *(f"DejaVuSerif{style}" for style in ("", "-Bold", "-Italic", "-BoldItalic")),
)
HELD_OUT_FONTS = (
    *(f"STIXGeneral{style}" for style in ("", "Bol", "Italic", "BolIta")),
    "cmr10",
    "cmb10",
    "cmss10",
    "cmtt10",
    "cmti10",
)
FONTS = TRAINING_FONTS + HELD_OUT_FONTS

# Type sizes, in pixels: large print, and small print as a scanner sees it (10-point type is about
# 20 px high at 200 dpi), which MNIST's 20-pixel digits never prepared a model for.
LARGE, SMALL = (40, 90), (12, 30)
SMALL_SHARE = 0.7  # of the printed digits training draws: small type is the harder, rarer one in MNIST


def render(digit, font, rng, sizes=LARGE):
    """One printed digit as a uint8 image (dark on light), its font size drawn from `sizes`."""
    size = int(rng.integers(*sizes))
    image = Image.new("L", (2 * size, 2 * size), 255)
    centre = size + rng.integers(-size // 8, size // 8 + 1, size=2)
    ImageDraw.Draw(image).text(
        tuple(int(c) for c in centre),
        str(digit),
        font=ImageFont.truetype(str(font_path(font)), size),
        fill=0,
        anchor="mm",
    )
    image = image.rotate(float(rng.uniform(-5, 5)), resample=Image.BILINEAR, fillcolor=255)
    if rng.random() < 0.5:  # a heavier print (thinning erased the strokes of light type)
        image = image.filter(ImageFilter.MinFilter(3))
    pixels = np.asarray(image, np.float32) + rng.normal(0, 3, (2 * size, 2 * size))
    return pixels.clip(0, 255).astype(np.uint8)


def print_some(images, labels, share, rng):
    """Training's augmentation: `share` of the images (N x 28 x 28, in place) replaced by their
    label's digit printed in a training font, brought to MNIST's form as an upload is."""
    if not share:
        return images
    for i in np.flatnonzero(rng.random(len(images)) < share):
        sizes = SMALL if rng.random() < SMALL_SHARE else LARGE
        font = TRAINING_FONTS[rng.integers(len(TRAINING_FONTS))]
        images[i] = normalize.to_mnist(render(int(labels[i].argmax()), font, rng, sizes))
    return images
