"""Corrupted copies of MNIST-form images, in the style of MNIST-C (Mu & Gilmer, 2019): the ways
real handwriting and real scans differ from MNIST's clean, centred digits. Deterministic from a
seed; each corruption takes (n, 28, 28) images in [0, 1] and a random generator, and returns
images of the same shape. How strong each one is comes from params.yaml's `robustness` section.
"""

import numpy as np
from scipy import ndimage

from pipeline.core.params import SHIFTS

CENTRE = np.array([13.5, 13.5])


def _affine(image, matrix, shift=(0.0, 0.0)):
    """Warp about the image centre: output pixel p samples the input at matrix @ (p - c) + c - shift."""
    offset = CENTRE - matrix @ CENTRE - matrix @ np.asarray(shift)
    return ndimage.affine_transform(image, matrix, offset=offset, order=1, mode="constant")


def _signed(rng, low, high):
    return rng.uniform(low, high) * rng.choice([-1, 1])


def shear(images, rng, strength):
    return np.stack([_affine(i, np.array([[1.0, 0.0], [_signed(rng, *strength), 1.0]])) for i in images])


def rotation(images, rng, degrees):
    def rotate(image):
        a = np.deg2rad(_signed(rng, *degrees))
        return _affine(image, np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]))

    return np.stack([rotate(i) for i in images])


def scale(images, rng, factor):
    """Shrink or enlarge about the centre by a factor drawn from [low, high] (>1 can crop the ends)."""
    return np.stack([_affine(i, np.eye(2) / rng.uniform(*factor)) for i in images])


def translation(images, rng, pixels):
    def move(image):
        angle = rng.uniform(0, 2 * np.pi)
        distance = rng.uniform(*pixels)
        return _affine(image, np.eye(2), shift=(distance * np.sin(angle), distance * np.cos(angle)))

    return np.stack([move(i) for i in images])


def thickness(images, rng, size):
    """Thicker (grey dilation) or thinner (erosion) strokes, half each."""
    return np.stack(
        [(ndimage.grey_dilation if rng.random() < 0.5 else ndimage.grey_erosion)(i, size=(size, size)) for i in images]
    )


def blur(images, rng, sigma):
    return np.stack([ndimage.gaussian_filter(i, sigma=rng.uniform(*sigma)) for i in images])


def noise(images, rng, std):
    return np.clip(images + rng.normal(0.0, 1.0, images.shape) * std, 0.0, 1.0)


def low_resolution(images, rng, size):
    """Down to size x size and back up, as a small or badly scanned digit arrives."""
    return np.stack([ndimage.zoom(ndimage.zoom(i, size / 28, order=1), 28 / size, order=1) for i in images])


# One function per shift, named as params.SHIFTS (the one list of them) names it, in its order.
CORRUPTIONS = {name: globals()[name] for name in SHIFTS}


def corrupt(images, name, strength, seed):
    """(n, 28, 28[, 1]) -> the same shape, float32, every image corrupted by `name`."""
    rng = np.random.default_rng(seed)
    flat = np.asarray(images, np.float64).reshape(-1, 28, 28)
    out = CORRUPTIONS[name](flat, rng, strength)
    return np.clip(out, 0.0, 1.0).astype(np.float32).reshape(np.shape(images))


def corrupted_copies(images, params):
    """{corruption: the images, each corrupted}; corruption i uses seed robustness.seed + i.
    The robustness stage makes them of the test images; sweeps of the validation images, to choose
    recipes by."""
    return {
        name: corrupt(images, name, strength, params.robustness.seed + i)
        for i, (name, strength) in enumerate(params.robustness.corruptions.items())
    }
