"""Read a handwritten number (a ZIP code, an amount, a form field): the ink split into digits, each
brought to MNIST's form and answered by the served model, with its box and its own "not sure".

1. The image becomes ink on a dark background, as for one digit (normalize.to_ink): any size,
   either polarity, the same limits and the same error for a blank image.
2. Connected pieces of ink are found. Pieces that share most of their columns are one digit
   written in several strokes (a 5's separate bar, a 4 in two strokes); specks are dropped.
3. A piece the model is not sure of, or that is wider than a digit, may be several touching
   digits. Cuts at the columns with the least ink are tried, and the model itself scores each way
   of cutting: the split is kept when its pieces together are more likely than the piece whole,
   by more than SPLIT_COST per extra digit (chosen on training-split numbers: bench/reading.py).
4. Each digit gets the model's calibrated answer and its flags; the number is "sure" only when
   every digit is. A piece that is not a digit (a letter, a dash, a currency sign) is "?", not a
   guess.

`predictor` is anything with predict(images) -> (probabilities, not_a_digit) and not_sure(p, flag):
pipeline.serving.predictor.Predictor on either runtime.
"""

from dataclasses import dataclass

import numpy as np

from pipeline.core import normalize

INK_LEVEL = 0.25  # of the ink's range: above it, a pixel belongs to a stroke
SPECK_SHARE = 0.02  # a piece with less ink than this share of the largest piece is a speck
SAME_DIGIT_OVERLAP = 0.5  # pieces sharing this share of the narrower one's columns are one digit
FLAT_MARK = 0.4  # of the line height: a flatter piece (a 5's bar) joins the digit it overlaps
# Measured on numbers of training digits: 95 % of single digits are narrower than WIDE_FROM line
# heights and have less ink than HEAVY_FROM squared line heights; most pairs of touching digits
# read as one piece are wider, or heavier. Such a piece is tried as several digits, and is never
# "sure" as one. (Chosen with SPLIT_COST by bench/reading.py; docs/reading.md.)
WIDE_FROM = 0.95
HEAVY_FROM = 0.45
WIDE_COST = 10.0  # log-likelihood taken off a piece per line height of width beyond WIDE_FROM
HEAVY_COST = 10.0  # and per squared line height of ink beyond HEAVY_FROM
CUT_COST = 5.0  # log-likelihood a cut costs per line height of ink it crosses (a touch is thin)
WIDEST_DIGIT = 1.6  # of the line height: no digit is wider
NARROWEST_DIGIT = 0.12  # of the line height: no cut leaves a piece narrower than this
CUTS_TRIED = 8  # candidate cut columns per piece, the least inked
NOT_A_DIGIT_COST = 5.0  # log-likelihood taken off a piece the gate calls not a digit
SPLIT_COST = 0.5  # log-likelihood a split must gain per extra digit
MAX_PIECES = 20  # digits in one image: more is refused (at most 10 are expected)


class TooManyPieces(normalize.ImageError):
    pass


@dataclass
class Digit:
    box: tuple  # (left, top, right, bottom) in the image's pixels, right and bottom exclusive
    digit: int
    confidence: float
    not_sure: bool
    not_a_digit: bool
    probabilities: np.ndarray

    @property
    def text(self):
        return "?" if self.not_a_digit else str(self.digit)


@dataclass
class Reading:
    digits: list
    # The whole number's confidence, where the reader has one (the line reader's verifier: sequence.read),
    # and whether it reaches the reader's threshold; otherwise the number is sure when every digit is.
    confidence: float | None = None
    confident: bool | None = None

    @property
    def text(self):
        return "".join(d.text for d in self.digits)

    @property
    def sure(self):
        whole = all(not d.not_sure for d in self.digits) if self.confident is None else self.confident
        return whole and not any(d.not_a_digit for d in self.digits)

    def as_dict(self):
        """What the CLI's JSON and the API answer."""
        return {
            "number": self.text,
            "sure": self.sure,
            "confidence": None if self.confidence is None else round(self.confidence, 6),
            "digits": [
                {
                    "box": list(d.box),
                    "digit": d.digit,
                    "confidence": round(d.confidence, 6),
                    "not_sure": d.not_sure,
                    "not_a_digit": d.not_a_digit,
                }
                for d in self.digits
            ],
        }


def ink_pieces(ink):
    """Boxes (top, bottom, left, right) and masks of the connected pieces of ink, strokes of one
    digit merged, specks dropped, left to right."""
    from scipy import ndimage  # imported here: serving one digit does not need it

    # normalize.to_ink has refused a blank image and scaled the ink to a maximum of 1: count >= 1.
    labels, count = ndimage.label(ink > INK_LEVEL, structure=np.ones((3, 3)))
    amounts = ndimage.sum_labels(ink, labels, index=np.arange(1, count + 1))
    slices = ndimage.find_objects(labels)
    kept = [i for i in range(count) if amounts[i] >= SPECK_SHARE * amounts.max()]
    kept.sort(key=lambda i: slices[i][1].start)
    groups = []  # [left, right, [labels]]
    for i in kept:
        left, right = slices[i][1].start, slices[i][1].stop
        if groups:
            g_left, g_right, members = groups[-1]
            shared = min(right, g_right) - max(left, g_left)
            if shared >= SAME_DIGIT_OVERLAP * min(right - left, g_right - g_left):
                groups[-1] = [min(left, g_left), max(right, g_right), members + [i + 1]]
                continue
        groups.append([left, right, [i + 1]])
    groups = _with_flat_marks_joined(groups, slices)
    if len(groups) > MAX_PIECES:
        raise TooManyPieces(f"{len(groups)} separate marks found: at most {MAX_PIECES} digits are read in one image")
    pieces = []
    for left, right, members in groups:
        # The stroke's soft edge (below INK_LEVEL) belongs to it too, as in MNIST's anti-aliasing.
        mask = ndimage.binary_dilation(np.isin(labels[:, left:right], members), np.ones((3, 3)))
        rows = np.nonzero(mask.any(axis=1))[0]
        top, bottom = rows[0], rows[-1] + 1
        pieces.append(((top, bottom, left, right), np.where(mask, ink[:, left:right], 0.0)[top:bottom]))
    return pieces


def _with_flat_marks_joined(groups, slices):
    """A flat mark (a 5's bar written apart) joins the group whose columns it shares most."""
    heights = [max(slices[i - 1][0].stop for i in m) - min(slices[i - 1][0].start for i in m) for _, _, m in groups]
    line_height = float(np.median(heights))
    flat = [k for k, h in enumerate(heights) if h < FLAT_MARK * line_height and len(groups) > 1]
    for k in flat:
        left, right, members = groups[k]
        shared = [
            (min(right, g[1]) - max(left, g[0]), j) for j, g in enumerate(groups) if j != k and j not in flat and g[2]
        ]
        overlap, j = max(shared, default=(0, None))
        if overlap > 0:
            groups[j] = [min(left, groups[j][0]), max(right, groups[j][1]), groups[j][2] + members]
            groups[k] = [left, right, []]
    return [g for g in groups if g[2]]


def mnist_form(piece):
    """A piece's ink (zero background) -> 28x28 in MNIST's form, as normalize does for an upload."""
    return normalize.ink_to_mnist(normalize.to_ink(piece.astype(np.float32), background=0.0))


def candidate_cuts(piece, narrowest):
    """Up to CUTS_TRIED columns with the least ink, each leaving at least `narrowest` columns."""
    width = piece.shape[1]
    inside = np.arange(narrowest, width - narrowest + 1)
    if len(inside) == 0:
        return []
    column_ink = piece.sum(axis=0)
    cuts = []
    for column in inside[np.argsort(column_ink[inside - 1] + column_ink[np.minimum(inside, width - 1)], kind="stable")]:
        if all(abs(column - c) >= 2 for c in cuts):
            cuts.append(int(column))
        if len(cuts) == CUTS_TRIED:
            break
    return sorted(cuts)


def oversize(piece, line_height):
    """How far a piece is wider, and heavier, than one digit is: (line heights, squared line heights)."""
    return (
        max(0.0, piece.shape[1] / line_height - WIDE_FROM),
        max(0.0, piece.sum() / line_height**2 - HEAVY_FROM),
    )


def score(probabilities, not_a_digit, piece, line_height):
    """How likely a piece is one digit: the model's log confidence, less a cost if the gate says it
    is not a digit, and a cost for a piece wider or heavier than digits are (the model sees
    two touching digits squeezed into one)."""
    wide, heavy = oversize(piece, line_height)
    confidence = float(np.log(max(probabilities.max(), 1e-12)))
    return confidence - NOT_A_DIGIT_COST * bool(not_a_digit) - WIDE_COST * wide - HEAVY_COST * heavy


def best_split(piece, whole, line_height, predictor):
    """The most likely way to cut `piece` into digits: [(start column, stop column, probabilities,
    not a digit)]; `whole` is the piece's own answer, kept unless a split wins by more than
    SPLIT_COST per extra digit."""
    width = piece.shape[1]
    bounds = [0, *candidate_cuts(piece, max(2, round(NARROWEST_DIGIT * line_height))), width]
    spans = [
        (a, b)
        for i, a in enumerate(bounds)
        for b in bounds[i + 1 :]
        if (a, b) != (0, width) and b - a <= WIDEST_DIGIT * line_height and piece[:, a:b].max() > INK_LEVEL
    ]
    if not spans:
        return [(0, width, *whole)]
    probabilities, not_a_digit = predictor.predict(np.stack([mnist_form(piece[:, a:b]) for a, b in spans]))
    answers = {span: (p, flag) for span, p, flag in zip(spans, probabilities, not_a_digit, strict=True)}
    column_ink = piece.sum(axis=0)
    cut_cost = {b: CUT_COST * column_ink[b - 1 : b + 1].mean() / line_height for b in bounds[1:-1]}
    cut_cost[width] = 0.0
    # Best chain of spans from column 0 to each bound, by dynamic programming over the bounds.
    best = {0: (0.0, [])}
    for b in bounds[1:]:
        options = [
            (
                best[a][0] + score(*answers[(a, b)], piece[:, a:b], line_height) - SPLIT_COST - cut_cost[b],
                best[a][1] + [(a, b)],
            )
            for a in best
            if (a, b) in answers
        ]
        if options:
            best[b] = max(options, key=lambda option: option[0])
    # Each digit of a split pays SPLIT_COST, the whole piece once: the same footing.
    if width not in best or best[width][0] <= score(*whole, piece, line_height) - SPLIT_COST:
        return [(0, width, *whole)]
    return [(a, b, *answers[(a, b)]) for a, b in best[width][1]]


def read(image, predictor):
    """A PIL image or array of a number -> Reading; normalize.ImageError when nothing can be read."""
    ink = normalize.to_ink(normalize.to_gray(image))
    pieces = ink_pieces(ink)
    line_height = float(np.median([bottom - top for (top, bottom, _, _), _ in pieces]))
    probabilities, not_a_digit = predictor.predict(np.stack([mnist_form(piece) for _, piece in pieces]))
    digits = []
    for ((top, _, left, _), piece), p, flag in zip(pieces, probabilities, not_a_digit, strict=True):
        doubtful = predictor.not_sure(p, flag) or any(oversize(piece, line_height))
        parts = best_split(piece, (p, flag), line_height, predictor) if doubtful else [(0, piece.shape[1], p, flag)]
        for a, b, q, part_flag in parts:
            rows = np.nonzero(piece[:, a:b].max(axis=1) > 0)[0]
            digits.append(
                Digit(
                    box=(int(left + a), int(top + rows[0]), int(left + b), int(top + rows[-1] + 1)),
                    digit=int(np.argmax(q)),
                    confidence=float(np.max(q)),
                    not_sure=predictor.not_sure(q, part_flag) or any(oversize(piece[:, a:b], line_height)),
                    not_a_digit=bool(part_flag),
                    probabilities=q,
                )
            )
    if len(digits) > MAX_PIECES:
        raise TooManyPieces(f"{len(digits)} digits found: at most {MAX_PIECES} are read in one image")
    return Reading(digits)
