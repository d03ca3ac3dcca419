"""The "not a digit" gate: does a 28x28 MNIST-form image hold one handwritten digit at all?

A classifier trained only on digits answers every input with some digit, often confidently (a
noise image came out "8" at 88 %), so its confidence cannot tell. The gate is a second, small
classifier: gradient-boosted trees (scikit-learn) on what the model sees in the image (its
penultimate-layer features) and on what the pixels look like (how far they are from MNIST's
principal components, the ink's aspect ratio, how much of its box it fills, how grey it is). It
learns digits (MNIST training images) against generated non-digits (pipeline.core.trust.nondigits).

Why boosted trees on both kinds of feature: docs/experiments.md ("Measurements behind the code").
"""

import numpy as np

from pipeline.core.normalize import INK_THRESHOLD
from pipeline.core.trust import nondigits

PIXEL_COMPONENTS = 40
FAINT_BELOW = 0.5  # of full strength: ink fainter than this is faint (a blurred or low-resolution scan has much)
DIGIT, NOT_A_DIGIT = 0, 1  # the trees' two classes


def with_features(model):
    """The Keras model with a second output: its penultimate features, the input of its last Dense
    layer (the `digit` layer, or the logits of a model with its temperature built in)."""
    import keras

    last_dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)][-1]
    return keras.Model(model.inputs, [model.output, last_dense.input])


def to_mnist_forms(raw_images):
    """Raw images -> (n, 28, 28, 1) MNIST form, as uploads are brought to it. Those that
    normalize.to_mnist refuses outright (e.g. blank) are left out: the API never asks the gate
    about them."""
    from pipeline.core import normalize

    forms = []
    for image in raw_images:
        try:
            forms.append(normalize.to_mnist(image))
        except normalize.ImageError:
            pass
    return np.stack(forms)[..., None]


def ink_shape(images):
    """(n, 28, 28[, 1]) -> (n, 3): log aspect ratio of the ink's box, the share of the box that is
    ink, the share of the ink that is faint. Digits are strokes in a box about as wide as tall.
    In Keras ops, so that the exported serving graph computes it too (pipeline/export.py)."""
    from keras import ops

    images = ops.reshape(ops.cast(images, "float32"), (-1, 28, 28))
    ink = ops.cast(images > INK_THRESHOLD, "float32")
    count = ops.sum(ink, axis=(1, 2))

    def extent(any_ink):  # rows (or columns) from the first with ink to the last
        index = ops.cast(ops.arange(28), "float32")
        first = ops.min(ops.where(any_ink > 0, index, 28.0), axis=1)
        last = ops.max(ops.where(any_ink > 0, index, -1.0), axis=1)
        return ops.maximum(last - first + 1, 1.0)

    height, width = extent(ops.max(ink, axis=2)), extent(ops.max(ink, axis=1))
    faint = ops.sum(ink * ops.cast(images < FAINT_BELOW, "float32"), axis=(1, 2))
    blank = count == 0  # no ink at all: a shape no digit has
    return ops.stack(
        [
            ops.where(blank, 0.0, ops.log(width / height)),
            ops.where(blank, 1.0, count / (height * width)),
            ops.where(blank, 1.0, faint / ops.maximum(count, 1.0)),
        ],
        axis=1,
    )


STEEPEST = 20  # steps averaged by steepest_steps: about a stroke's two edges' worth


def steepest_steps(images):
    """(n, 28, 28[, 1]) -> (n,): the mean of the image's 20 steepest steps between neighbouring
    pixels (the gradient's magnitude, by forward differences). A pen stroke rises from paper to full
    ink within a pixel or two; a blurred or low-resolution scan rises gently, however dark or noisy
    its paper (docs/off_mnist.md, rule 4). In Keras ops, for the serving graph, as ink_shape."""
    from keras import ops

    images = ops.reshape(ops.cast(images, "float32"), (-1, 28, 28))
    across = images[:, :27, 1:] - images[:, :27, :27]
    down = images[:, 1:, :27] - images[:, :27, :27]
    steps = ops.reshape(ops.sqrt(ops.square(across) + ops.square(down)), (-1, 27 * 27))
    return ops.mean(ops.top_k(steps, STEEPEST)[0], axis=1)


def tree_inputs(model_features, images, pca_mean, pca_components):
    """What the trees see, in Keras ops (NumPy in, a tensor out; or inside a traced graph): the
    model's penultimate features, the pixels' principal components, what those leave unexplained,
    and the ink's shape."""
    from keras import ops

    pixels = ops.reshape(ops.cast(images, "float32"), (-1, 28 * 28))
    components = ops.matmul(pixels - pca_mean, ops.transpose(pca_components))
    unexplained = ops.sum(ops.square(pixels - (ops.matmul(components, pca_components) + pca_mean)), axis=1)
    return ops.concatenate(
        [ops.cast(model_features, "float32"), components, unexplained[:, None], ink_shape(images)], axis=1
    )


def save(fitted, path):
    """The gate at `path` (joblib), for load()."""
    import joblib

    joblib.dump(fitted, path)


def load(path):
    """A gate the calibrate stage or `digits finetune` saved (save()): a pickle, so load only this
    project's own."""
    import joblib

    return joblib.load(path)


class Gate:
    def __init__(self, seed=0):
        from sklearn.decomposition import PCA
        from sklearn.ensemble import HistGradientBoostingClassifier

        self.pca = PCA(PIXEL_COMPONENTS, random_state=seed)
        self.trees = HistGradientBoostingClassifier(random_state=seed)
        self.threshold = None

    def _features(self, model_features, images):
        from keras import ops

        return ops.convert_to_numpy(tree_inputs(model_features, images, *self.pca_constants()))

    def pca_constants(self):
        """The fitted principal components as float32 constants: (mean, components)."""
        return self.pca.mean_.astype(np.float32), self.pca.components_.astype(np.float32)

    def fit(self, digit_features, digits, other_features, others):
        self.pca.fit(digits.reshape(len(digits), -1))  # whiten=False: a shift and a rotation
        x = np.concatenate([self._features(digit_features, digits), self._features(other_features, others)])
        y = np.r_[np.full(len(digits), DIGIT), np.full(len(others), NOT_A_DIGIT)]
        # Both classes weigh the same: the rarer one's rows repeated until it is as many, rather than
        # class_weight="balanced". scikit-learn 1.8+ bins weighted rows one quantile at a time, far
        # slower (scikit-learn PR #34248; docs/experiments.md); repeated rows bin as weighted ones do.
        rarer = np.flatnonzero(y == (NOT_A_DIGIT if len(others) < len(digits) else DIGIT))
        repeated = np.resize(rarer, abs(len(digits) - len(others)))
        self.trees.fit(np.concatenate([x, x[repeated]]), np.concatenate([y, y[repeated]]))
        return self

    def scores(self, model_features, images):
        """Probability-like score that each image is not a digit."""
        return self.trees.predict_proba(self._features(model_features, images))[:, NOT_A_DIGIT]

    def set_threshold(self, digit_scores, flag_rate):
        """Flag no more than `flag_rate` of these (validation) digits."""
        self.threshold = float(np.quantile(digit_scores, 1 - flag_rate))
        return self

    def not_a_digit(self, model_features, images):
        return self.scores(model_features, images) > self.threshold

    def not_a_digit_from(self, tree_inputs):
        """not_a_digit() from tree_inputs() already computed (the serving graph's output)."""
        return self.trees.predict_proba(tree_inputs)[:, NOT_A_DIGIT] > self.threshold


GATE_TRAINING_DIGITS = 20000  # of the 55,000 training digits; half as MNIST has them, half as uploads


def both_forms(digits):
    """Digits as MNIST has them, and as an upload of each reaches the model (normalize.to_mnist):
    the non-digits go through to_mnist, so the digits must too, or the gate learns to flag what
    normalisation does rather than what is not a digit."""
    return np.concatenate([digits, to_mnist_forms(list(digits[..., 0]))])


def fit(model, x_train, x_val, seed, nondigits_per_kind, digit_flag_rate, own_digits=None):
    """The "not a digit" gate for this model, learned from training digits (a sample of x_train,
    and every one of `own_digits`: a user's images in `digits finetune`) against generated
    non-digits, and thresholded to flag at most `digit_flag_rate` of the validation digits; and how
    many non-digits it learned from. Used by the calibrate stage and by `digits finetune`."""
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(x_train), min(GATE_TRAINING_DIGITS, len(x_train)) // 2, replace=False)
    digits = both_forms(x_train[chosen] if own_digits is None else np.concatenate([x_train[chosen], own_digits]))
    generated = nondigits.generate(nondigits_per_kind, seed, x_train)
    others = to_mnist_forms([image for images in generated.values() for image in images])
    features = with_features(model)
    digit_features = features.predict(digits, batch_size=1000, verbose=0)[1]
    other_features = features.predict(others, batch_size=1000, verbose=0)[1]
    fitted = Gate(seed).fit(digit_features, digits, other_features, others)
    val_digits = both_forms(x_val)
    val_scores = fitted.scores(features.predict(val_digits, batch_size=1000, verbose=0)[1], val_digits)
    return fitted.set_threshold(val_scores, digit_flag_rate), len(others)
