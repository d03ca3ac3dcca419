"""The line reader: a number read as a sequence, without cutting it into digits first (CRNN with a
CTC loss, Shi et al. 2015; keras-io's OCR examples show the Keras idiom).

Its eyes are the trained digit CNN, slid along the line: the same layers, made fully
convolutional, answer for a 28-pixel window every 4 columns (the last pooling keeps every
column, and the dense head becomes a 3x3 convolution dilated to match). Three convolutions along
the row of windows give each window its neighbours' view (about two digits either side; a recurrent
layer would see further, but its loops convert poorly to ONNX and cost more on two cores), and a
softmax over the ten digits, a mark that is no digit ("?") and a blank answers each window. CTC
training needs only each line's text, never where its digits are.

Decoding (greedy) keeps the likeliest answer of each window, merges repeats and drops blanks; each
digit's confidence is the highest probability it has in the windows that emit it. The digit model
then looks at each decoded digit's own ink, and each digit is the one both models find likeliest
together (voted). Whether the whole number is right is then judged by a verifier: gradient-boosted
trees that calibrate_reader fitted on validation numbers, weighing the EVIDENCE of one reading (the
path's probability, the digit model's and a second, independent digit model's view of each digit's
ink, and how the boxes cover the ink). The line reader and the digit model look through the same
convolutions, so they share their mistakes; the second look (the MLP) errs elsewhere.
"""

import numpy as np

from pipeline.core import normalize
from pipeline.core.reading import lines, segment

BLANK = 10  # the CTC blank: the windows between and around digits
MARK = 11  # a mark that is no digit (a letter, a dash, a scribble): read as "?"
CLASSES = 12
BLANK_UNTIL = 0.5  # at the start of training, a window is blank where the CNN is less sure than this
MARK_FROM = 0.01  # at the start of training, a window's probability of a mark, before the softmax
HALF_WIDTH = 0.7  # of the line's ink height: a digit's box reaches no further from its window's centre
FIRST_CENTRE = 14  # line column at the centre of window 0 (the CNN's 28-pixel view)
CONTEXT_FILTERS = 128  # of each convolution along the row of windows
CONTEXT_WIDTH = 5  # windows each of them sees
CONTEXT_DILATIONS = (1, 2, 4)  # one convolution each: together they see 29 windows, two digits either side
# What the verifier weighs, in this order (evidence(); docs/reading.md, rule 18).
EVIDENCE = (
    "path_doubt",  # log(1 - p), p the decoded path's probability where the digit model reads each digit alike, else 0
    "path_log",  # log p of the same
    "digit_doubt",  # log(1 - q), q the digit model's lowest probability of a digit the line reader read
    "ink_outside",  # the share of the strokes outside every digit's box: a digit lost
    "lightest_box",  # the lightest box's strokes over the median box's: a digit read where hardly any ink is
    "length",  # digits read
    "soft",  # 1 for a soft scan (lines.is_soft)
    "second_doubt",  # log(1 - r), r the second look's lowest probability of a digit served
    "second_agrees",  # 1 where the second look reads every digit served
    "reader_doubt",  # log(1 - c), c the line reader's lowest probability of a digit served (rule 25)
    "vote_changed",  # digits the vote changed from the line reader's (rule 25)
    "widest_box",  # the widest box's width over the median box's: a box holding two digits (rule 50)
    "pieces_beyond",  # pieces of ink the size of a digit, less the digits read: a digit lost in a gap (rule 50)
)
PIECE_SHARE = 0.25  # a piece of ink counts as a digit's when it holds this share of the ink a digit has on average
TINY = 1e-12  # probabilities are clipped this far from 0 and 1 before their logarithms


def geometry(reader):
    """(stride, lost): the line columns between windows, and the windows a line's width loses at
    its edges, for windows(). With the default CNN (three blocks, a 3x3 map under its dense head):
    a window every 4 columns, and a line `width` wide has width // 4 - 5 windows."""
    from keras import layers

    pools = sum(isinstance(layer, layers.MaxPooling2D) for layer in reader.layers)
    head = next(layer for layer in reader.layers if isinstance(layer, layers.Conv2D) and layer.dilation_rate[1] > 1)
    return 2 ** (pools - 1), 1 + 2 * (head.kernel_size[1] - 1)


def windows(width, stride_and_lost):
    """How many windows the reader answers for a line `width` columns wide."""
    stride, lost = stride_and_lost
    return max(0, width // stride - lost)


def build(digit_model):
    """The line reader, (batch, 28, width, 1) lines -> (batch, windows, CLASSES) logits, its eyes
    initialised from `digit_model` (a trained digit CNN of pipeline.core.models)."""
    import keras
    from keras import layers

    pools = [layer for layer in digit_model.layers if isinstance(layer, layers.MaxPooling2D)]
    flatten = next(layer for layer in digit_model.layers if isinstance(layer, layers.Flatten))
    dense, answer_layer = [layer for layer in digit_model.layers if isinstance(layer, layers.Dense)][:2]
    map_size = flatten.input.shape[1:3]  # what the dense head reads: 3x3 with the default CNN

    def slid(layer):
        """The digit CNN's layer as it works along a line."""
        if layer is pools[-1]:  # keep every column: windows half as far apart
            return layers.MaxPooling2D(2, strides=(2, 1), name=layer.name)
        if layer is flatten:
            return layers.Identity(name=layer.name)
        if layer is dense:  # the dense head over the last map, as a convolution over every window
            return layers.Conv2D(dense.units, map_size, dilation_rate=(1, 2), use_bias=False, name=layer.name)
        if layer is answer_layer:  # its logits: the softmax follows as a layer Keras can save
            return layers.Dense(layer.units, name=layer.name)
        return layer.__class__.from_config(layer.get_config())

    line = keras.Input((28, None, 1), name="line")
    eyes = keras.models.clone_model(digit_model, input_tensors=line, clone_function=slid)
    for original, copy in zip(digit_model.layers, eyes.layers, strict=True):
        weights = original.get_weights()
        if original is dense:
            weights = [weights[0].reshape(copy.get_weights()[0].shape)]
        copy.set_weights(weights)
        # Batch statistics of lines (mostly background, padded to the batch's width) are not a
        # digit's: the CNN's own normalisation stays, in training too (Keras runs a BatchNorm
        # layer that does not train in inference mode).
        if isinstance(copy, layers.BatchNormalization):
            copy.trainable = False
    features = [layer for layer in eyes.layers if isinstance(layer, layers.ReLU)][-1].output  # the head's
    digit_log_probabilities = layers.Activation("log_softmax", name="digit_log_probabilities")(eyes.output)
    x = layers.Concatenate()([features, digit_log_probabilities])
    x = layers.Reshape((-1, x.shape[-1]))(x)  # one row of windows
    context = x
    for dilation in CONTEXT_DILATIONS:
        context = layers.Conv1D(
            CONTEXT_FILTERS, CONTEXT_WIDTH, padding="same", dilation_rate=dilation, activation="relu"
        )(context)
    answer = layers.Dense(CLASSES, name="windows")
    logits = answer(layers.Concatenate()([x, context]))
    # Start from the digit CNN's own answers: each window's digit logits are its log-probabilities,
    # and the blank wins where the CNN is less sure than BLANK_UNTIL (between digits). CTC then
    # only has to refine a reading that is roughly right from the first step.
    kernel = np.zeros(answer.kernel.shape, np.float32)
    first_digit = features.shape[-1]
    kernel[first_digit : first_digit + BLANK, :BLANK] = np.eye(BLANK)
    bias = np.zeros(CLASSES, np.float32)
    bias[BLANK], bias[MARK] = np.log(BLANK_UNTIL), np.log(MARK_FROM)
    answer.set_weights([kernel, bias])
    return keras.Model(line, logits, name="reader")


def targets(texts, window_counts, max_length):
    """CTC targets as one array: the text's length, the line's own windows (those of a batch's
    padding are not the line's: a digit must be read where the line is), then the digits ("?": a
    mark)."""
    y = np.zeros((len(texts), max_length + 2), np.int32)
    for i, (text, count) in enumerate(zip(texts, window_counts, strict=True)):
        y[i, :2] = len(text), count
        y[i, 2 : 2 + len(text)] = [MARK if c == "?" else int(c) for c in text]
    return y


def ctc_loss(y_true, logits):
    from keras import ops

    y_true = ops.cast(y_true, "int32")
    return ops.ctc_loss(y_true[:, 2:], logits, y_true[:, 0], y_true[:, 1], mask_index=BLANK)


def batches(written, batch_size, shape, rng=None):
    """[(x, y, indices)] of lines [(line, text)]: lines of similar width together (lines.padded),
    with their CTC targets; shuffled within and between widths when `rng` is given, in order
    otherwise. `shape`: the reader's geometry()."""
    order = np.argsort([line.shape[1] for line, _ in written], kind="stable")
    if rng is not None:  # shuffle, then sort by width in coarse steps: similar widths, new company
        order = rng.permutation(len(written))
        order = order[np.argsort([written[i][0].shape[1] // lines.WIDTH_STEP for i in order], kind="stable")]
    groups = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if rng is not None:
        rng.shuffle(groups)
    out = []
    for group in groups:
        x, widths = lines.padded([written[i][0] for i in group])
        counts = [windows(w, shape) for w in widths]
        out.append((x, targets([written[i][1] for i in group], counts, lines.MAX_LENGTH), group))
    return out


def window_logits(reader, written, batch_size=256):
    """Each line's window logits by the Keras `reader`, [(windows, CLASSES)], cut to the windows of
    its own width."""
    found, shape = [None] * len(written), geometry(reader)
    for x, _, group in batches(written, batch_size, shape):
        logits = reader(x, training=False).numpy()
        for row, i in zip(logits, group, strict=True):
            found[i] = row[: windows(written[i][0].shape[1], shape)]
    return found


def judged(logits, texts, temperature=1.0):
    """(each reading's path confidence, whether it is right) at this temperature."""
    readings = [decode(softmax(z, temperature)) for z in logits]
    right = [text_of(digits) == text for (digits, _), text in zip(readings, texts, strict=True)]
    return np.array([c for _, c in readings]), np.array(right)


def exact(reader, written):
    """The share of lines [(line, text)] the Keras `reader` reads exactly (greedy, no vote)."""
    _, right = judged(window_logits(reader, written), [text for _, text in written])
    return float(right.mean())


def softmax(logits, temperature=1.0):
    scaled = np.asarray(logits, np.float64) / temperature
    scaled -= scaled.max(axis=-1, keepdims=True)
    e = np.exp(scaled)
    return e / e.sum(axis=-1, keepdims=True)


def decode(probabilities):
    """One line's window probabilities (windows, CLASSES) -> (digits, path confidence): each digit as
    (digit, confidence, first window, last window)."""
    best = probabilities.argmax(axis=1)
    top = probabilities.max(axis=1)
    digits = []
    for t, label in enumerate(best):
        if label == BLANK:
            continue
        if digits and t > 0 and best[t - 1] == label:  # the same digit, still
            d, confidence, first, _ = digits[-1]
            digits[-1] = (d, max(confidence, float(top[t])), first, t)
        else:
            digits.append((int(label), float(top[t]), t, t))
    return digits, float(np.exp(np.log(np.maximum(top, 1e-30)).sum()))


def text_of(digits):
    return "".join("?" if d == MARK else str(d) for d, *_ in digits)


def centre_column(window, stride):
    """The line column at the centre of a window's view."""
    return FIRST_CENTRE + stride * window


def digit_ink(ink, found, scale, left, stride):
    """Each decoded digit's box and its ink in MNIST's form, for the digit model to look at. A box is
    the pen's strokes between the midpoints to its neighbours' windows, and within HALF_WIDTH of its
    own window, less the ends of the neighbours' strokes (_own_ink). `scale`, `left`: how the ink's
    columns map to the line (lines.to_line)."""
    centres = [(centre_column((first + last) / 2, stride) - lines.PAD) / scale + left for _, _, first, last in found]
    edges = [0, *((a + b) / 2 for a, b in zip(centres, centres[1:], strict=False)), ink.shape[1]]
    reach = HALF_WIDTH * lines.INK_HEIGHT / scale  # in the ink's pixels
    spans = [(max(a, c - reach), min(b, c + reach)) for a, b, c in zip(edges, edges[1:], centres, strict=False)]
    strokes = np.where(ink > segment.INK_LEVEL, ink, 0.0)  # the pen's strokes, without the paper's grain
    boxes, crops = [], []
    for a, b in spans:
        piece = _own_ink(strokes, round(a), round(b))
        x0, top, x1, bottom = _ink_box(piece)
        boxes.append((round(a) + x0, top, round(a) + x1, bottom))
        crops.append(_digit_form(piece[top:bottom, x0:x1]))
    return boxes, np.stack(crops) if crops else np.zeros((0, 28, 28), np.float32)


def agree(found, digit_probabilities):
    """Whether the digit model, looking at each digit's ink, reads the digit the line reader read
    (never a mark's)."""
    return all(int(np.argmax(p)) == d for (d, *_), p in zip(found, digit_probabilities, strict=True))


def voted(found, probabilities, digit_probabilities):
    """The decoded digits, each now the digit with the highest sum of the two models' log-
    probabilities: the line reader's (each digit's highest probability in the windows that emit it,
    made to sum to one) and the digit model's, looking at its ink. Where the two agree nothing
    changes; where they differ, the surer one wins. A mark stays a mark."""
    chosen = []
    for (d, c, first, last), p in zip(found, digit_probabilities, strict=True):
        if d == MARK:  # no digit to vote on
            chosen.append((d, c, first, last))
            continue
        line = probabilities[first : last + 1, :BLANK].max(axis=0)
        line = line / line.sum()
        digit = int(np.argmax(np.log(np.maximum(line, 1e-30)) + np.log(np.maximum(p, 1e-30))))
        chosen.append((digit, float(line[digit]), first, last))
    return chosen


def evidence(path, found, served, digit_probabilities, second_probabilities, boxes, ink, soft):
    """One reading's EVIDENCE, for the verifier: the line reader's `found` digits and `path`
    probability (decode), the `served` digits (voted), the digit model's and the second look's
    probabilities for each digit's ink, the digits' `boxes` on the number's `ink`, and whether the
    line is soft."""
    digits = [d for d, *_ in found]
    agreed = bool(found) and MARK not in digits and agree(found, digit_probabilities)
    p = path if agreed else 0.0
    chosen = [d for d, *_ in served]
    second_agrees = bool(found) and all(
        int(np.argmax(r)) == d for d, r in zip(chosen, second_probabilities, strict=True)
    )
    strokes = np.where(ink > segment.INK_LEVEL, ink, 0.0)
    covered = np.zeros(ink.shape, bool)
    for x0, y0, x1, y1 in boxes:
        covered[y0:y1, x0:x1] = True
    masses = [strokes[y0:y1, x0:x1].sum() for x0, y0, x1, y1 in boxes] or [0.0]
    widths = [x1 - x0 for x0, _, x1, _ in boxes] or [1]
    return np.array(
        [
            _doubt(p),
            np.log(max(p, TINY)),
            _doubt(_lowest(digits, digit_probabilities)),
            strokes[~covered].sum() / max(strokes.sum(), TINY),
            min(masses) / max(float(np.median(masses)), TINY),
            len(found),
            float(soft),
            _doubt(_lowest(chosen, second_probabilities)),
            float(second_agrees),
            _doubt(min((c for _, c, *_ in served), default=0.0)),
            sum(d != v for d, v in zip(digits, chosen, strict=True)),
            max(widths) / max(float(np.median(widths)), TINY),
            _pieces(strokes, len(found)) - len(found),
        ],
        np.float32,
    )


def _pieces(strokes, digits):
    """How many connected pieces of the strokes hold at least PIECE_SHARE of the ink each of
    `digits` digits would have: on a line with gaps, one per digit written."""
    from scipy import ndimage

    labels, count = ndimage.label(strokes > 0, structure=np.ones((3, 3)))
    if not count:
        return 0
    masses = ndimage.sum(strokes, labels, range(1, count + 1))
    return int((masses >= PIECE_SHARE * strokes.sum() / max(digits, 1)).sum())


def _doubt(p):
    """log(1 - p), p clipped TINY short of 1: how far a probability is from certain."""
    return np.log1p(-min(p, 1 - TINY))


def _lowest(digits, probabilities):
    """A model's lowest probability of the digits read (0 for a mark, and for none)."""
    return min((q[d] if d < BLANK else 0.0 for d, q in zip(digits, probabilities, strict=True)), default=0.0)


def sure_from(calibration, line):
    """The number's "sure" threshold for this line: soft lines (a blurred or low-resolution scan,
    lines.is_soft) have their own, as calibration fitted them (docs/reading.md, rules 11 and 12)."""
    return calibration["soft_sure_from" if lines.is_soft(line, calibration) else "sure_from"]


def line_of(image):
    """A number's image as the reader takes it: (its line, its ink, (scale, left)): lines.to_line
    of lines.ink_of, with the ink and how its columns map to the line's, for digit_ink."""
    ink = lines.ink_of(image)
    line, placed = lines.to_line(ink)
    return line, ink, placed


def read(image, graph, digits):
    """A PIL image or array of a number -> segment.Reading, by the line reader `graph` (a
    ReaderGraph, with its verifier and second look) with the digit model `digits` (a Predictor or
    OnnxGraph) looking at each digit's ink (digit_ink), each digit voted. A mark the line reader reads
    as no digit is "?" (the digit model's gate is not asked: on validation numbers it refused more
    real digits than the line reader's own mark, and caught fewer marks; docs/reading.md). The
    number's confidence is the verifier's, 0 with a mark; it is sure when that reaches the line's
    calibrated threshold (sure_from). normalize.ImageError when nothing can be read."""
    line, ink, (scale, left) = line_of(image)
    batch, _ = lines.padded([line])
    calibration = graph.calibration
    shape = int(calibration["stride"]), int(calibration["lost"])
    probabilities = graph.windows(batch)[0][: windows(line.shape[1], shape)]
    found, path = decode(probabilities)
    if not found:
        return segment.Reading([], confidence=0.0, confident=False)
    if len(found) > segment.MAX_PIECES:
        raise segment.TooManyPieces(f"{len(found)} digits found: at most {segment.MAX_PIECES} are read in one image")
    boxes, crops = digit_ink(ink, found, scale, left, shape[0])
    digit_probabilities, _ = digits.predict(crops)
    second_probabilities, _ = graph.second_look.predict(crops)
    not_a_digit = [d == MARK for d, *_ in found]
    served = voted(found, probabilities, digit_probabilities)
    soft = lines.is_soft(line, calibration)
    seen = evidence(path, found, served, digit_probabilities, second_probabilities, boxes, ink, soft)
    number = 0.0 if any(not_a_digit) else float(graph.verify(seen[None])[0])
    confident = number >= sure_from(calibration, line)
    return segment.Reading(
        [  # a mark's digit is the digit model's guess, as the segmenter's is
            segment.Digit(box, int(np.argmax(p)) if d == MARK else d, c, not confident, flag, p)
            for (d, c, _, _), box, p, flag in zip(served, boxes, digit_probabilities, not_a_digit, strict=True)
        ],
        confidence=number,
        confident=confident,
    )


def _digit_form(piece):
    """A digit's ink in MNIST's form; an empty box (a digit read where no ink is) as a blank."""
    if not (piece > normalize.INK_THRESHOLD).any():
        return np.zeros((28, 28), np.float32)
    return segment.mnist_form(piece)


def _own_ink(strokes, x0, x1):
    """The strokes between columns x0 and x1, less the pieces that the span's edges cut and that are
    lighter than its heaviest piece: those are the ends of the neighbours' strokes, which would
    make the digit model (and its gate) see two digits in one box."""
    from scipy import ndimage

    part = strokes[:, x0:x1]
    labels, count = ndimage.label(part > normalize.INK_THRESHOLD, structure=np.ones((3, 3)))
    if count < 2:
        return part
    mass = ndimage.sum(part, labels, range(1, count + 1))
    cut = np.union1d(labels[:, 0], labels[:, -1])
    neighbours = [label for label in cut[cut > 0] if mass[label - 1] < mass.max()]
    return np.where(np.isin(labels, neighbours), 0.0, part)


def _ink_box(piece):
    """(left, top, right, bottom) of a piece's ink (the whole piece if it has none)."""
    rows, cols = np.nonzero(piece > normalize.INK_THRESHOLD)
    if not len(rows):
        return (0, 0, max(piece.shape[1], 1), piece.shape[0])
    return (int(cols.min()), int(rows.min()), int(cols.max() + 1), int(rows.max() + 1))
