"""Images of handwritten numbers made from MNIST digits, for measuring the reader (read_eval) and
for choosing its method (bench/reading.py). Test digits measure; training digits tune.

A number is 1-10 digits written on a line: each digit cropped to its ink, scaled a little (sizes
vary between digits), moved up or down off the baseline, and placed after the previous one with a
gap that depends on the spacing kind:
  clear        a gap of 4-8 pixels between the digits' ink
  tight        1-2 pixels: the ink does not touch, but boxes almost meet
  touching     at least one pair of neighbours whose ink touches
  overlapping  at least one pair pushed 1-2 pixels past touching
Strokes are sometimes thickened, and the page gets paper-like noise. Dark ink on light paper, as a
scan: the reader must undo that as it does for uploads.
"""

import numpy as np
from PIL import Image

from pipeline.core.normalize import INK_THRESHOLD

KINDS = ("clear", "tight", "touching", "overlapping")
SPACED_LENGTH = 5  # digits in the numbers of each spacing kind that are measured
LENGTHS = range(1, 11)  # the lengths measured, with clear gaps
CLEAR_GAP = (4, 8)  # pixels between neighbours' ink
TIGHT_GAP = (1, 2)
OVERLAP = (1, 2)  # pixels past touching
MAX_REACH = 4  # columns a digit may be pushed past its neighbour's ink box to touch it
SCALE = (0.85, 1.15)  # of each digit's 28x28 size
BASELINE_JITTER = 2  # pixels up or down
MARGIN = 6  # paper around the number
THICKEN_SHARE = 0.25  # of numbers written with a thicker pen
NOISE_STD = (0.0, 0.06)  # paper noise, as a share of the ink's contrast


def _crop(digit):
    rows, cols = np.nonzero(digit > INK_THRESHOLD)
    return digit[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]


def _scaled(digit, scale):
    h, w = digit.shape
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    image = Image.fromarray((digit * 255).astype(np.uint8)).resize(size, Image.Resampling.BILINEAR)
    return np.asarray(image, np.float32) / 255.0


def _thicker(digit):
    """A pen about half a pixel wider: a 2x2 grey dilation, blended half way."""
    padded = np.pad(digit, ((0, 1), (0, 1)))
    dilated = np.maximum.reduce([padded[:-1, :-1], padded[1:, :-1], padded[:-1, 1:], padded[1:, 1:]])
    return np.maximum(padded[:-1, :-1], 0.5 * (padded[:-1, :-1] + dilated))


def _grown(mask):
    """The mask grown by one pixel in all eight directions."""
    padded = np.pad(mask, 1)
    h, w = mask.shape
    return np.logical_or.reduce([padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)])


def _contact_offset(left, right, top_left, top_right):
    """How many columns `right` moves left from just after `left`'s ink until their ink touches."""
    height = max(top_left + left.shape[0], top_right + right.shape[0])
    for offset in range(min(left.shape[1], right.shape[1]) + 1):
        start = left.shape[1] - offset
        a = np.zeros((height, start + right.shape[1]), bool)
        b = np.zeros_like(a)
        a[top_left : top_left + left.shape[0], : left.shape[1]] = left > INK_THRESHOLD
        b[top_right : top_right + right.shape[0], start:] = right > INK_THRESHOLD
        if (_grown(a) & b).any():
            return offset
    return min(left.shape[1], right.shape[1])


def make_number(digits, kind, rng):
    """(uint8 image, dark ink on light paper; per-digit ink boxes (x0, y0, x1, y1)) for `digits`,
    a sequence of 28x28 MNIST images (ink in [0, 1]), written with spacing `kind`."""
    if kind not in KINDS:
        raise ValueError(f"spacing kind {kind!r}: expected one of {', '.join(KINDS)}")
    thick = rng.random() < THICKEN_SHARE
    pieces = []
    for digit in digits:
        piece = _scaled(_crop(np.asarray(digit, np.float32).reshape(28, 28)), rng.uniform(*SCALE))
        pieces.append(_thicker(piece) if thick else piece)
    tallest = max(p.shape[0] for p in pieces)
    tops = [
        (tallest - p.shape[0]) // 2 + BASELINE_JITTER + int(rng.integers(-BASELINE_JITTER, BASELINE_JITTER + 1))
        for p in pieces
    ]
    # Which neighbours touch (or overlap): at least one pair in those kinds, others now and then.
    # Pen strokes meet at their edges: a pair that only touches when pushed deep into each other
    # (a 3's hollow facing an 8) is not chosen while another can be.
    pairs = len(pieces) - 1
    reach = [_contact_offset(pieces[i], pieces[i + 1], tops[i], tops[i + 1]) for i in range(pairs)]
    close = np.zeros(pairs, bool)
    if kind in ("touching", "overlapping") and pairs:
        shallow = [i for i in range(pairs) if reach[i] <= MAX_REACH] or [int(np.argmin(reach))]
        close[rng.choice(shallow)] = True
        close |= (rng.random(pairs) < 0.3) & (np.array(reach) <= MAX_REACH)
    lefts = [0]
    for i, previous in enumerate(pieces[:-1]):
        if close[i]:
            step = previous.shape[1] - reach[i]
            if kind == "overlapping":
                step -= int(rng.integers(OVERLAP[0], OVERLAP[1] + 1))
        else:
            low, high = TIGHT_GAP if kind == "tight" else CLEAR_GAP
            step = previous.shape[1] + int(rng.integers(low, high + 1))
        lefts.append(lefts[-1] + step)
    height = tallest + 2 * BASELINE_JITTER + 2 * MARGIN
    width = lefts[-1] + pieces[-1].shape[1] + 2 * MARGIN
    ink = np.zeros((height, width), np.float32)
    boxes = []
    for piece, left, top in zip(pieces, lefts, tops, strict=True):
        y, x = top + MARGIN, left + MARGIN
        region = ink[y : y + piece.shape[0], x : x + piece.shape[1]]
        np.maximum(region, piece, out=region)
        boxes.append((x, y, x + piece.shape[1], y + piece.shape[0]))
    ink += rng.normal(0.0, rng.uniform(*NOISE_STD), ink.shape).astype(np.float32)
    paper = 1.0 - np.clip(ink, 0.0, 1.0) * 0.9  # dark grey ink on white paper
    return (paper * 255).round().astype(np.uint8), boxes


def evaluation_sets(per_kind, per_length):
    """The numbers a reader is measured on, {"kind/K" or "length/N": (lengths, kind, count)}:
    `per_kind` of SPACED_LENGTH digits in each spacing kind, and `per_length` with clear gaps of each
    of LENGTHS. read_eval writes them from test digits; train_reader's calibration from validation
    digits."""
    sets = {f"kind/{kind}": ([SPACED_LENGTH], kind, per_kind) for kind in KINDS}
    return sets | {f"length/{n}": ([n], "clear", per_length) for n in LENGTHS}


def sample(x, y, lengths, kind, count, rng):
    """`count` numbers of random length from `lengths`, digits drawn from images x with labels y
    (one-hot or integer): a list of (image, text, boxes)."""
    labels = y.argmax(axis=1) if y.ndim == 2 else y
    numbers = []
    for _ in range(count):
        length = int(rng.choice(lengths))
        chosen = rng.integers(len(x), size=length)
        image, boxes = make_number(x[chosen], kind, rng)
        numbers.append((image, "".join(str(int(d)) for d in labels[chosen]), boxes))
    return numbers
