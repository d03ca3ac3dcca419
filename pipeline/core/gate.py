"""The "not a digit" gate: does a 28x28 MNIST-form image hold one handwritten digit at all?

A classifier trained only on digits answers every input with some digit, often confidently (a
noise image came out "8" at 88 %), so its confidence cannot tell. The gate is a second, small
classifier: gradient-boosted trees (scikit-learn) on what the model sees in the image (its
penultimate-layer features) and on what the pixels look like (how far they are from MNIST's
principal components, the ink's aspect ratio, how much of its box it fills, how grey it is). It
learns digits (MNIST training images) against generated non-digits (pipeline.core.nondigits).

Measured before choosing, on validation digits and on non-digits from fonts the gate never saw:
the model's features alone flagged 78 % of non-digits with a linear classifier (letters 40 %);
these features with boosted trees flagged 98 % (letters 94 %).
"""

import numpy as np

PIXEL_COMPONENTS = 40


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
    """(n, 28, 28) -> (n, 3): log aspect ratio of the ink's box, the share of the box that is ink,
    the share of the ink that is faint. Digits are strokes in a box about as wide as tall."""
    images = images.reshape(-1, 28, 28)
    ink = images > 0.1
    count = ink.sum(axis=(1, 2))

    def extent(any_ink):  # rows (or columns) from the first with ink to the last
        return np.maximum(28 - any_ink[:, ::-1].argmax(axis=1) - any_ink.argmax(axis=1), 1)

    height, width = extent(ink.any(axis=2)), extent(ink.any(axis=1))
    faint = (ink & (images < 0.5)).sum(axis=(1, 2))
    blank = count == 0  # no ink at all: a shape no digit has
    return np.stack(
        [
            np.where(blank, 0.0, np.log(width / height)),
            np.where(blank, 1.0, count / (height * width)),
            np.where(blank, 1.0, faint / np.maximum(count, 1)),
        ],
        axis=1,
    ).astype(np.float32)


class Gate:
    def __init__(self, seed=0):
        from sklearn.decomposition import PCA
        from sklearn.ensemble import HistGradientBoostingClassifier

        self.pca = PCA(PIXEL_COMPONENTS, random_state=seed)
        self.trees = HistGradientBoostingClassifier(random_state=seed, class_weight="balanced")
        self.threshold = None

    def _features(self, model_features, images):
        pixels = images.reshape(len(images), -1)
        components = self.pca.transform(pixels)
        unexplained = ((pixels - self.pca.inverse_transform(components)) ** 2).sum(axis=1, keepdims=True)
        return np.concatenate([model_features, components, unexplained, ink_shape(images)], axis=1)

    def fit(self, digit_features, digits, other_features, others):
        self.pca.fit(digits.reshape(len(digits), -1))
        x = np.concatenate([self._features(digit_features, digits), self._features(other_features, others)])
        self.trees.fit(x, np.r_[np.zeros(len(digits)), np.ones(len(others))])
        return self

    def scores(self, model_features, images):
        """Probability-like score that each image is not a digit."""
        return self.trees.predict_proba(self._features(model_features, images))[:, 1]

    def set_threshold(self, digit_scores, flag_rate):
        """Flag no more than `flag_rate` of these (validation) digits."""
        self.threshold = float(np.quantile(digit_scores, 1 - flag_rate))
        return self

    def not_a_digit(self, model_features, images):
        return self.scores(model_features, images) > self.threshold
