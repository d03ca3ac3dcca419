"""Printed digits in labelled folders, as a user's scans arrive: the rendering is the core's
(pipeline/core/shifts/printed.py), which training draws from too (its DejaVu fonts only)."""

import csv

import numpy as np
from PIL import Image

from pipeline.core.layout import DIGITS
from pipeline.core.shifts.printed import FONTS, HELD_OUT_FONTS, LARGE, SMALL, TRAINING_FONTS, render

__all__ = ["FONTS", "HELD_OUT_FONTS", "LARGE", "SMALL", "TRAINING_FONTS", "render", "write_labelled_folder"]


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
