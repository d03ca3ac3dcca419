"""The shifts, in the style of MNIST-C (Mu & Gilmer, 2019): the ways real handwriting, paper and
scanners differ from MNIST's clean, centred digits. One function per name of params.SHIFTS, each
taking (n, 28, 28) images in [0, 1], a random generator and a [low, high] strength (params.yaml's
`shifts` section), and drawing each image's strength on its own. The robustness stage measures
copies of the test images, calibrate copies of the validation images, and training draws them as
augmentation (`augment.shifts`): one function and one range per shift for all three.
"""

import io

import numpy as np
from PIL import Image
from scipy import ndimage

from pipeline.core.params import SHIFTS

CENTRE = np.array([13.5, 13.5])
FINE = 4  # stroke width is changed at 4x resolution, where a pixel is a quarter of MNIST's
ELASTIC_SMOOTHING = 4.0  # pixels: the displacement field's Gaussian (Simard et al. 2003)


def _affine(image, matrix, shift=(0.0, 0.0)):
    """Warp about the image centre: output pixel p samples the input at matrix @ (p - c) + c - shift."""
    offset = CENTRE - matrix @ CENTRE - matrix @ np.asarray(shift)
    return ndimage.affine_transform(image, matrix, offset=offset, order=1, mode="constant")


def _signed(rng, low, high):
    return rng.uniform(low, high) * rng.choice([-1, 1])


def _side(rng, low, high):
    return int(rng.integers(low, high + 1))


def shear(images, rng, strength):
    return np.stack([_affine(i, np.array([[1.0, 0.0], [_signed(rng, *strength), 1.0]])) for i in images])


def rotation(images, rng, degrees):
    def rotate(image):
        a = np.deg2rad(_signed(rng, *degrees))
        return _affine(image, np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]))

    return np.stack([rotate(i) for i in images])


def elastic(images, rng, alpha):
    """Each pixel moved along a smooth random field (uniform noise, Gaussian-smoothed, times alpha)."""
    grid = np.mgrid[0:28, 0:28].astype(np.float64)

    def warp(image):
        field = ndimage.gaussian_filter(rng.uniform(-1, 1, (2, 28, 28)), (0, ELASTIC_SMOOTHING, ELASTIC_SMOOTHING))
        return ndimage.map_coordinates(image, grid + field * rng.uniform(*alpha), order=1, mode="constant")

    return np.stack([warp(i) for i in images])


def scale(images, rng, factor):
    """Shrink or enlarge about the centre by a factor drawn from [low, high] (>1 can crop the ends)."""
    return np.stack([_affine(i, np.eye(2) / rng.uniform(*factor)) for i in images])


def translation(images, rng, pixels):
    def move(image):
        angle = rng.uniform(0, 2 * np.pi)
        distance = rng.uniform(*pixels)
        return _affine(image, np.eye(2), shift=(distance * np.sin(angle), distance * np.cos(angle)))

    return np.stack([move(i) for i in images])


def cut(images, rng, pixels):
    """Moved toward one edge (up, down, left or right) so that the frame cuts the digit's far side."""

    def move(image):
        shift = np.zeros(2)
        shift[rng.integers(2)] = _signed(rng, *pixels)
        return _affine(image, np.eye(2), shift=shift)

    return np.stack([move(i) for i in images])


def _restroked(images, rng, pixels, morphology):
    def change(image):
        fine = ndimage.zoom(image, FINE, order=1)
        radius = rng.uniform(*pixels) * FINE / 2
        r = int(np.ceil(radius))
        y, x = np.mgrid[-r : r + 1, -r : r + 1]
        fine = morphology(fine, footprint=x**2 + y**2 <= radius**2)
        return fine.reshape(28, FINE, 28, FINE).mean(axis=(1, 3))

    return np.stack([change(i) for i in images])


def thick(images, rng, pixels):
    return _restroked(images, rng, pixels, ndimage.grey_dilation)


def thin(images, rng, pixels):
    return _restroked(images, rng, pixels, ndimage.grey_erosion)


def blur(images, rng, sigma):
    return np.stack([ndimage.gaussian_filter(i, sigma=rng.uniform(*sigma)) for i in images])


def noise(images, rng, std):
    return np.clip(images + rng.normal(0.0, 1.0, images.shape) * rng.uniform(*std, (len(images), 1, 1)), 0.0, 1.0)


def lighting(images, rng, level):
    """Uneven paper: a brightness gradient in a random direction, up to `level` at its lit edge, with
    a smooth paper texture; the ink stays the brightest (MNIST's polarity: ink 1, paper 0)."""
    y, x = (np.mgrid[0:28, 0:28] - 13.5) / 27

    def light(image):
        angle = rng.uniform(0, 2 * np.pi)
        gradient = 0.5 + np.cos(angle) * x + np.sin(angle) * y
        texture = ndimage.gaussian_filter(rng.normal(0, 1, (28, 28)), 1.5) * 3
        paper = np.clip(rng.uniform(*level) * (gradient + 0.15 * texture), 0.0, 1.0)
        return 1 - (1 - image) * (1 - paper)  # ink over lit paper ("screen")

    return np.stack([light(i) for i in images])


def jpeg(images, rng, quality):
    def compress(image):
        buffer = io.BytesIO()
        Image.fromarray(np.round(image * 255).astype(np.uint8)).save(buffer, "JPEG", quality=_side(rng, *quality))
        return np.asarray(Image.open(buffer), np.float64) / 255

    return np.stack([compress(i) for i in images])


def low_resolution(images, rng, sides):
    """Sampled down to a side x side grid and enlarged again: thin strokes between samples vanish."""

    def resample(image):
        side = _side(rng, *sides)
        return ndimage.zoom(ndimage.zoom(image, side / 28, order=1), 28 / side, order=1)

    return np.stack([resample(i) for i in images])


def anti_aliased(images, rng, sides):
    """Area-averaged down to side x side, as a scanner's or camera's pixel integrates its area, and
    enlarged by bicubic interpolation, as viewers and upload paths do."""

    def rescan(image):
        side = _side(rng, *sides)
        small = Image.fromarray(image.astype(np.float32), "F").resize((side, side), Image.Resampling.BOX)
        return np.asarray(small.resize((28, 28), Image.Resampling.BICUBIC), np.float64)

    return np.stack([rescan(i) for i in images])


# One function per shift, named as params.SHIFTS (the one list of them) names it, in its order.
CORRUPTIONS = {name: globals()[name] for name in SHIFTS}


def corrupt(images, name, strength, seed):
    """(n, 28, 28[, 1]) -> the same shape, float32, every image shifted by `name`."""
    rng = np.random.default_rng(seed)
    flat = np.asarray(images, np.float64).reshape(-1, 28, 28)
    out = CORRUPTIONS[name](flat, rng, strength)
    return np.clip(out, 0.0, 1.0).astype(np.float32).reshape(np.shape(images))


def corrupted_copies(images, params):
    """{shift: the images, each shifted}; shift i uses seed shifts.seed + i. The robustness stage
    makes them of the test images, calibrate and sweeps of the validation images."""
    return {
        name: corrupt(images, name, strength, params.shifts.seed + i)
        for i, (name, strength) in enumerate(params.shifts.strengths.items())
    }


def shift_some(images, names, share, strengths, rng):
    """Training's augmentation: `share` of the images, each given one of `names` (drawn uniformly)
    at the same strengths as the copies above; the rest unchanged."""
    out = np.array(images, np.float32)
    flat = out.reshape(-1, 28, 28)
    chosen = np.flatnonzero(rng.random(len(flat)) < share)
    drawn = rng.integers(len(names), size=len(chosen))
    for k, name in enumerate(names):
        which = chosen[drawn == k]
        if len(which):
            flat[which] = np.clip(CORRUPTIONS[name](flat[which].astype(np.float64), rng, strengths[name]), 0, 1)
    return out
