"""Printed digits, rendered from the fonts matplotlib ships (PyPI): a real domain shift that the
project can make itself (type, where MNIST is handwriting), to test and measure `digits finetune`.
Each image is one digit in one font with light augmentation (size, a small rotation, position,
stroke weight, paper noise), dark ink on white paper at any size, as a user's scan arrives.
Deterministic from a seed.
"""

import csv

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from pipeline.core.layout import DIGITS
from pipeline.core.trust.nondigits import font_path

# Every font matplotlib ships with the ten digits at their usual code points, by family.
FONTS = (
    *(f"DejaVuSans{style}" for style in ("", "-Bold", "-Oblique", "-BoldOblique")),
    *(f"DejaVuSansMono{style}" for style in ("", "-Bold", "-Oblique", "-BoldOblique")),
    *(f"DejaVuSerif{style}" for style in ("", "-Bold", "-Italic", "-BoldItalic")),
    *(f"STIXGeneral{style}" for style in ("", "Bol", "Italic", "BolIta")),
    "cmr10",
    "cmb10",
    "cmss10",
    "cmtt10",
    "cmti10",
)


# Type sizes, in pixels: large print, and small print as a scanner sees it (10-point type is about
# 20 px high at 200 dpi), which MNIST's 20-pixel digits never prepared a model for.
LARGE, SMALL = (40, 90), (12, 30)


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


def write_labelled_folder(folder, fonts, per_digit, seed, sizes=LARGE):
    """`per_digit` images of each digit in each font under folder/, and folder/labels.csv
    (file, label, group = the font). Returns the CSV's path."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for font in fonts:
        for digit in DIGITS:
            for k in range(per_digit):
                name = f"{font}-{digit}-{k}.png"
                Image.fromarray(render(digit, font, rng, sizes)).save(folder / name)
                rows.append((name, digit, font))
    labels = folder / "labels.csv"
    with labels.open("w", newline="") as f:
        csv.writer(f).writerows([("file", "label", "group"), *rows])
    return labels
