"""A line of handwriting in the line reader's form, and lines to train it on.

The reader sees a line as MNIST sees a digit: white ink on black, the ink's height scaled to
INK_HEIGHT pixels and centred in HEIGHT rows, any width. Training lines are numbers written from
MNIST digits (numbers.make_number) with the variety real forms have on top: any length up to
MAX_LENGTH, every spacing kind, slant, thinner or thicker strokes, scanner blur, anti-aliased low
resolution, paper noise and either polarity; and now and then a mark that is no digit (a letter,
a dash, a scribble), read as "?".
"""

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from pipeline.core import normalize
from pipeline.core.reading import numbers
from pipeline.core.trust import confidence, gate, nondigits

HEIGHT = 28  # rows, as MNIST's digits
INK_HEIGHT = 20  # rows the line's ink spans, as MNIST's digits' larger side
PAD = 8  # columns of background either side: room for the windows that read the first and last digit
MAX_LENGTH = 12  # digits in a training line
WIDTH_STEP = 32  # lines are padded on the right to a multiple of this, in training and in serving alike
MIN_WIDTH = 48  # columns: a narrower line (a lone 1) is padded on the right, so that it has windows
MAX_WIDTH = 512  # columns: a wider line is squeezed to it (about 20 digits with clear gaps)

SLANT = (-0.35, 0.35)  # horizontal shear of the whole line (x moves by this share of y)
BLUR_SHARE, BLUR_RADIUS = 0.25, (0.5, 1.2)  # lines a scanner blurs, and how much (pixels)
LOW_RESOLUTION_SHARE, LOW_RESOLUTION_HEIGHT = 0.2, (10, 16)  # lines scanned small: ink rows
THIN_SHARE = 0.15  # lines written with a thinner pen
INVERTED_SHARE = 0.2  # light ink on dark paper
MARK_SHARE = 0.15  # lines with a mark that is no digit in place of one digit, read as "?"
MARK_KINDS = ("letters", "scribbles", "dash")  # marks a number may hold
DASH_LENGTH, DASH_THICKNESS = (40, 120), (4, 16)  # pixels, before MNIST's form makes it 20 wide


def ink_of(image):
    """A PIL image or array of any size and polarity -> ink in [0, 1] on zero, as for one digit
    (normalize.to_ink); normalize.ImageError for a blank image."""
    return normalize.to_ink(normalize.to_gray(image))


def to_line(ink):
    """The ink of one line of writing (ink_of) -> (the line, (scale, left)): float32 (HEIGHT, width)
    ink in [0, 1] on zero, and how the ink's columns map to it: line column = (ink column - left) *
    scale + PAD."""
    rows, cols = np.nonzero(ink > normalize.INK_THRESHOLD)
    left = cols.min()
    crop = ink[rows.min() : rows.max() + 1, left : cols.max() + 1]
    scale = INK_HEIGHT / crop.shape[0]
    width = max(1, round(crop.shape[1] * scale))
    if width > MAX_WIDTH - 2 * PAD:
        width = MAX_WIDTH - 2 * PAD
    fitted = Image.fromarray((crop * 255).astype(np.uint8)).resize((width, INK_HEIGHT), Image.Resampling.LANCZOS)
    line = np.zeros((HEIGHT, max(width + 2 * PAD, MIN_WIDTH)), np.float32)
    offset = (HEIGHT - INK_HEIGHT) // 2
    line[offset : offset + INK_HEIGHT, PAD : PAD + width] = np.asarray(fitted, np.float32) / 255.0
    return line, (width / crop.shape[1], int(left))


def faint_share(line):
    """The share of a line's ink that is faint (below gate.FAINT_BELOW), as gate.ink_shape measures
    it on a digit: high for a blurred or low-resolution scan."""
    ink = line > normalize.INK_THRESHOLD
    return float((ink & (line < gate.FAINT_BELOW)).sum() / max(int(ink.sum()), 1))


def steepest_steps(line):
    """The mean of the line's gate.STEEPEST steepest steps between neighbouring pixels, as
    gate.steepest_steps measures a digit: high where a pen's strokes are sharp, low on a blurred or
    low-resolution scan, however faint or noisy its paper."""
    across = line[:-1, 1:] - line[:-1, :-1]
    down = line[1:, :-1] - line[:-1, :-1]
    steps = np.sqrt(across**2 + down**2).ravel()
    return float(np.sort(steps)[-gate.STEEPEST :].mean())


def is_soft(line, calibration):
    """Whether a line is a soft scan (blurred or low-resolution), by the digit model's rule
    (confidence.is_soft: faint ink, and smooth strokes where the calibration has `smooth_below`), on
    the whole line's measures."""
    return bool(confidence.is_soft(faint_share(line), steepest_steps(line), calibration))


def padded(lines):
    """Lines of any widths -> (n, HEIGHT, width, 1) float32, zero on the right up to the widest's next
    multiple of WIDTH_STEP (so that the reader sees a line's right end as it did in training), and
    their widths."""
    widths = np.array([line.shape[1] for line in lines])
    width = -(-int(widths.max()) // WIDTH_STEP) * WIDTH_STEP
    batch = np.zeros((len(lines), HEIGHT, width, 1), np.float32)
    for i, line in enumerate(lines):
        batch[i, :, : line.shape[1], 0] = line
    return batch, widths


def varied(image, rng):
    """A written number (uint8, dark ink on light paper) as a scan might deliver it."""
    picture = Image.fromarray(image)
    slant = rng.uniform(*SLANT)
    if abs(slant) > 0.02:
        w, h = picture.size
        grow = int(abs(slant) * h) + 1
        picture = picture.transform(
            (w + grow, h), Image.Transform.AFFINE, (1, slant, -grow if slant > 0 else 0, 0, 1, 0), fillcolor=255
        )
    if rng.random() < THIN_SHARE:
        picture = picture.filter(ImageFilter.MaxFilter(3))  # light paper: the max thins dark ink
    if rng.random() < BLUR_SHARE:
        picture = picture.filter(ImageFilter.GaussianBlur(rng.uniform(*BLUR_RADIUS)))
    if rng.random() < LOW_RESOLUTION_SHARE:
        w, h = picture.size
        small = rng.integers(*LOW_RESOLUTION_HEIGHT, endpoint=True) / h
        picture = picture.resize((max(1, round(w * small)), max(1, round(h * small))), Image.Resampling.BOX)
        picture = picture.resize((w, h), Image.Resampling.BICUBIC)
    array = np.asarray(picture)
    return 255 - array if rng.random() < INVERTED_SHARE else array


def mark(rng):
    """A mark that is no digit, in MNIST's form: a letter of the fonts the gate is fitted on or a
    scribble (pipeline.core.trust.nondigits), or a dash of any thickness, a little askew."""
    kind = MARK_KINDS[rng.integers(len(MARK_KINDS))]
    if kind == "letters":
        return normalize.to_mnist(nondigits.letters(rng, nondigits.FIT_FONTS))
    if kind == "scribbles":
        return normalize.to_mnist(nondigits.scribbles(rng))
    length, thickness = rng.integers(*DASH_LENGTH), rng.integers(*DASH_THICKNESS)
    dash = Image.new("L", (160, 160), 255)
    rise = int(rng.integers(-length // 8, length // 8 + 1))
    ImageDraw.Draw(dash).line(
        [(80 - length // 2, 80 + rise), (80 + length // 2, 80 - rise)], fill=0, width=int(thickness)
    )
    return normalize.to_mnist(np.asarray(dash))


def training_line(x, labels, rng, max_length=MAX_LENGTH):
    """One training line: (the line in the reader's form, its text: digits, and "?" for a mark that
    is no digit). A draw whose ink the variety washed out (a faint 1 scanned small) is drawn again."""
    while True:
        length = int(rng.integers(1, max_length + 1))
        chosen = rng.integers(len(x), size=length)
        written, text = x[chosen], [str(int(d)) for d in labels[chosen]]
        if rng.random() < MARK_SHARE:
            at = int(rng.integers(length))
            written, text[at] = written.copy(), "?"
            written[at] = mark(rng)
        image, _ = numbers.make_number(written, numbers.KINDS[rng.integers(len(numbers.KINDS))], rng)
        try:
            line, _ = to_line(ink_of(varied(image, rng)))
        except normalize.ImageError:
            continue
        return line, "".join(text)


def training_lines(x, labels, count, seed, max_length=MAX_LENGTH):
    """`count` training lines from digit images x with integer labels, seeded: [(line, text)]."""
    rng = np.random.default_rng(seed)
    return [training_line(x, labels, rng, max_length) for _ in range(count)]


# The read stages' lines, by split: the seed of each chunk of CHUNK lines is the stage's seed plus
# the split's offset plus the chunk's number, so train_reader and calibrate_reader write the same
# validation lines, however many processes write them.
SPLIT_SEEDS = {"train": 0, "val": 10_000}
CHUNK = 2000


def line_sets(data, counts, seed):
    """{split: [(line, text)]}: counts[split] lines (training_lines) written from the digits of each
    split of `data` (data/processed's arrays), in two processes."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    jobs = [
        (split, seed + SPLIT_SEEDS[split] + i, min(CHUNK, count - start))
        for split, count in counts.items()
        for i, start in enumerate(range(0, count, CHUNK))
    ]
    digits = {split: (data[f"x_{split}"][..., 0], data[f"y_{split}"].argmax(1)) for split in counts}
    # spawn, not fork: the workers need NumPy and PIL, not a copy of the caller's TensorFlow.
    with ProcessPoolExecutor(2, multiprocessing.get_context("spawn"), _share, (digits,)) as pool:
        made = list(pool.map(_written, jobs))
    return {
        split: [line for (s, _, _), part in zip(jobs, made, strict=True) if s == split for line in part]
        for split in counts
    }


_digits = {}


def _share(digits):
    _digits.update(digits)


def _written(job):
    split, seed, count = job
    return training_lines(*_digits[split], count, seed)
