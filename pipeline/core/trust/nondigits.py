"""Images that are not one handwritten digit, made deterministically from a seed: what the "not a
digit" gate is fitted on (calibrate) and measured on (evaluate). Each comes out as a raw image
(uint8, dark ink on white paper, any size), to be brought to MNIST form like any upload.

Kinds:
  noise       random pixels, any size
  near_blank  paper with a faint speck or two
  scribbles   3-8 random straight strokes
  lines       one long horizontal bar (a vertical one would be a fair "1")
  letters     printed letters, from the fonts matplotlib ships (PyPI), leaving out the ones people
              also write as digits (O o D Q: 0; I l i j: 1; Z z: 2; S s: 5; G b: 6; B: 8; g q: 9)
  strips      2-4 MNIST digits side by side, from the digit images given
"""

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

KINDS = ("noise", "near_blank", "scribbles", "lines", "letters", "strips")
LETTERS = "ACEFHKLMNPRTUVWXYacdefhkmnprtuvwxy"
# Font families by which split may use them: the gate is fitted on DejaVu only, so the evaluation
# also shows how it does on type it never saw (STIX, Computer Modern).
FIT_FONTS = (
    "DejaVuSans",
    "DejaVuSans-Bold",
    "DejaVuSans-Oblique",
    "DejaVuSerif",
    "DejaVuSerif-Italic",
    "DejaVuSansMono",
)
EVAL_FONTS = FIT_FONTS + ("STIXGeneral", "STIXGeneralBol", "STIXGeneralItalic", "cmr10", "cmss10", "cmtt10", "cmti10")


def font_path(name):
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf" / f"{name}.ttf"


def noise(rng):
    height, width = rng.integers(16, 400, size=2)
    return rng.integers(0, 256, size=(height, width), dtype=np.uint8)


def near_blank(rng):
    page = rng.normal(245, 3, size=(120, 120))
    for _ in range(rng.integers(1, 3)):
        row, col = rng.integers(5, 110, size=2)
        page[row : row + rng.integers(1, 4), col : col + rng.integers(1, 4)] = rng.integers(0, 180)
    return page.clip(0, 255).astype(np.uint8)


def scribbles(rng):
    image = Image.new("L", (200, 200), 255)
    pen = ImageDraw.Draw(image)
    for _ in range(rng.integers(3, 9)):
        pen.line(
            [tuple(p) for p in rng.integers(10, 190, size=(2, 2)).tolist()], fill=0, width=int(rng.integers(4, 16))
        )
    return np.asarray(image)


def lines(rng):
    length, thickness = int(rng.integers(150, 5000)), int(rng.integers(1, 6))
    return np.pad(np.zeros((thickness, length), np.uint8), 4, constant_values=255)


def letters(rng, fonts):
    font = ImageFont.truetype(str(font_path(fonts[rng.integers(len(fonts))])), int(rng.integers(48, 100)))
    image = Image.new("L", (160, 160), 255)
    ImageDraw.Draw(image).text((80, 80), LETTERS[rng.integers(len(LETTERS))], font=font, fill=0, anchor="mm")
    return np.asarray(image)


def strips(rng, digits):
    """digits: (N, 28, 28[, 1]) MNIST-form images (white ink on black, 0-1)."""
    chosen = digits[rng.integers(len(digits), size=rng.integers(2, 5))].reshape(-1, 28, 28)
    gap = np.zeros((28, int(rng.integers(0, 6))))
    row = np.concatenate([part for digit in chosen for part in (digit, gap)][:-1], axis=1)
    return (255 - row * 255).astype(np.uint8)  # dark ink on paper, like the rest


def generate(count_per_kind, seed, digits, fonts=FIT_FONTS):
    """{kind: [raw image, ...]}, the same for the same arguments."""
    rng = np.random.default_rng(seed)
    make = {
        "noise": noise,
        "near_blank": near_blank,
        "scribbles": scribbles,
        "lines": lines,
        "letters": lambda r: letters(r, fonts),
        "strips": lambda r: strips(r, digits),
    }
    return {kind: [make[kind](rng) for _ in range(count_per_kind)] for kind in KINDS}
