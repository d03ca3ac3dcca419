"""Training-time augmentation, run in the tf.data pipeline (pipeline/train.py):
- RandomAffine: small rotations, shifts and zooms, the ways one writer's digit differs from
  another's in pose and size (never flips, which would turn digits into other shapes);
- RandomCorruption: the ways real handwriting and scans differ from MNIST in ink, resolution and
  slant (noise, blur, low resolution, thicker or thinner strokes, tilts beyond RandomAffine's).
The robustness stage measures the same families on corrupted test copies
(pipeline/core/shifts/corruptions.py); the strengths were chosen on corrupted validation copies."""

import keras
import numpy as np
import tensorflow as tf


def _gaussian_kernel(sigma, size=7):
    x = np.arange(size) - size // 2
    kernel = np.exp(-(x[:, None] ** 2 + x[None, :] ** 2) / (2 * sigma**2))
    return tf.constant((kernel / kernel.sum())[:, :, None, None], tf.float32)


def _resized(images, side, align_corners):
    # Both pixel-grid conventions: scipy's zoom aligns corners, most image libraries use half-pixel centres.
    down = tf.compat.v1.image.resize(images, tf.stack([side, side]), align_corners=align_corners)
    return tf.compat.v1.image.resize(down, [28, 28], align_corners=align_corners)


def _warped(images, angle, scale, shift_fraction):
    """Each image rotated by its angle (radians), zoomed by its scale and moved by its shift
    (fractions of the side: y, x), in one bilinear resampling."""
    side = tf.cast(tf.shape(images)[1:3], tf.float32)  # height, width
    shift = shift_fraction * side
    # Each output pixel p reads the input at centre + scale * R(angle) (p - centre) - shift.
    cos, sin = tf.cos(angle) * scale, tf.sin(angle) * scale
    cy, cx = (side[0] - 1) / 2, (side[1] - 1) / 2
    zeros = tf.zeros_like(angle)
    transform = tf.stack(
        [
            cos, -sin, cx - cos * cx + sin * cy - shift[:, 1],
            sin, cos, cy - sin * cx - cos * cy - shift[:, 0],
            zeros, zeros,
        ],
        axis=1,
    )  # fmt: skip
    return keras.ops.image.affine_transform(images, transform, fill_mode="constant")


def _tilted(images, seed_generator, degrees):
    """Each image rotated by its own angle in [low, high] degrees, either way."""
    count = tf.shape(images)[0]
    low, high = np.deg2rad(degrees)
    size = keras.random.uniform([count], low, high, seed=seed_generator)
    sign = tf.where(keras.random.uniform([count], seed=seed_generator) < 0.5, -1.0, 1.0)
    return _warped(images, size * sign, tf.ones([count]), tf.zeros([count, 2]))


class RandomAffine(keras.layers.Layer):
    """Rotates, shifts and zooms each image by its own random amounts in one resampling. (Keras'
    RandomRotation, RandomTranslation and RandomZoom one after another resample three times, and
    each bilinear pass blurs the strokes: three left training digits blurrier than test digits.)

    rotation_degrees: angles uniform in [-r, r]; shift_fraction: each axis uniform in
    [-s, s] of the side; zoom_fraction: one scale for both axes, uniform in [1 - z, 1 + z]."""

    def __init__(self, rotation_degrees, shift_fraction, zoom_fraction, seed, **kwargs):
        super().__init__(**kwargs)
        self.rotation = np.deg2rad(rotation_degrees)
        self.shift = shift_fraction
        self.zoom = zoom_fraction
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=True):
        if not training:
            return images
        batch = tf.shape(images)[0]

        def uniform(shape, spread):
            return keras.random.uniform(shape, -spread, spread, seed=self.seed_generator)

        angle = uniform([batch], self.rotation)
        scale = 1.0 + uniform([batch], self.zoom)
        return _warped(images, angle, scale, uniform([batch, 2], self.shift))


class RandomCorruption(keras.layers.Layer):
    """Replaces a random share of a batch's images with a corrupted copy, one corruption each,
    drawn uniformly, and a further share with a low-resolution copy; the rest pass unchanged, so
    clean digits stay most of what the model sees. Each corruption is computed only for the images
    that drew it. `strength`: a model's params.yaml `augment` section (corruption_share,
    low_resolution_share, and the shifts noise, blur, low_resolution and rotation: tilts beyond
    RandomAffine's, as a slanted hand writes them; thickness is a 2-pixel window either way)."""

    def __init__(self, strength, seed, **kwargs):
        super().__init__(**kwargs)
        self.share, self.low_resolution_share = strength.corruption_share, strength.low_resolution_share
        self.noise_std, self.sides, self.tilt = strength.noise, strength.low_resolution, strength.rotation
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.blur_kernels = [_gaussian_kernel(sigma) for sigma in strength.blur]

    def call(self, images, training=True):
        if not training or not (self.share or self.low_resolution_share):
            return images
        batch = tf.shape(images)[0]
        std = keras.random.uniform([batch, 1, 1, 1], *self.noise_std, seed=self.seed_generator)
        noise = keras.random.normal(tf.shape(images), seed=self.seed_generator) * std
        side = keras.random.randint([], self.sides[0], self.sides[1] + 1, seed=self.seed_generator)
        corruptions = [
            lambda x, noise: tf.clip_by_value(x + noise, 0.0, 1.0),
            *(lambda x, _, k=k: tf.nn.depthwise_conv2d(x, k, [1, 1, 1, 1], "SAME") for k in self.blur_kernels),
            lambda x, _: _resized(x, side, align_corners=True),
            lambda x, _: _resized(x, side, align_corners=False),
            lambda x, _: tf.nn.max_pool2d(x, 2, 1, "SAME"),  # thicker strokes (grey dilation)
            lambda x, _: -tf.nn.max_pool2d(-x, 2, 1, "SAME"),  # thinner strokes (grey erosion)
            lambda x, _: _tilted(x, self.seed_generator, self.tilt),
        ]
        kind = keras.random.randint([batch], 0, len(corruptions), seed=self.seed_generator)
        draw = keras.random.uniform([batch], seed=self.seed_generator)
        if self.low_resolution_share:
            first_resize = 1 + len(self.blur_kernels)  # the two grid conventions, one of them each
            resize = first_resize + keras.random.randint([batch], 0, 2, seed=self.seed_generator)
            kind = tf.where(draw < self.share, kind, resize)
        # Group the images by what they get (the last group: unchanged), then put them back in order.
        group = tf.where(draw < self.share + self.low_resolution_share, kind, len(corruptions))
        parts = len(corruptions) + 1
        positions = tf.dynamic_partition(tf.range(batch), group, parts)
        *to_corrupt, unchanged = tf.dynamic_partition(images, group, parts)
        *their_noise, _ = tf.dynamic_partition(noise, group, parts)
        corrupted = [corrupt(x, n) for corrupt, x, n in zip(corruptions, to_corrupt, their_noise, strict=True)]
        return tf.dynamic_stitch(positions, [*corrupted, unchanged])
