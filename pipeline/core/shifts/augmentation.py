"""Training-time augmentation, run in the tf.data pipeline (pipeline/core/training.py):
- RandomAffine: small rotations, shifts and zooms, the ways one writer's digit differs from
  another's in pose and size (never flips, which would turn digits into other shapes);
- with_shifts: the ways real handwriting and capture differ from MNIST (pipeline/core/shifts/
  corruptions.py: the same functions and strengths the robustness stage measures on test copies),
  and printed type (pipeline/core/shifts/printed.py)."""

import keras
import numpy as np
import tensorflow as tf


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


def with_shifts(batches, augment, strengths, seed):
    """tf.data batches of (images, one-hot labels) -> the same, `augment.shift_share` of each batch's
    images given one of `augment.shifts` (pipeline/core/shifts/corruptions.py, the functions and
    strengths the robustness stage measures), then `augment.printed_share` replaced by their digit
    in print (pipeline/core/shifts/printed.py). Batch k draws from a generator seeded by (seed, k),
    so a run repeats its batches exactly."""
    from pipeline.core.shifts.corruptions import shift_some
    from pipeline.core.shifts.printed import print_some

    def shift(images, labels, step):
        rng = np.random.default_rng([seed, int(step)])
        shifted = shift_some(images, augment.shifts, augment.shift_share, strengths, rng)
        print_some(shifted.reshape(-1, 28, 28), labels, augment.printed_share, rng)
        return shifted

    def mapped(step, batch):
        images, labels = batch
        shifted = tf.numpy_function(shift, [images, labels, step], tf.float32, stateful=False)
        return tf.ensure_shape(shifted, images.shape), labels

    return batches.enumerate().map(mapped, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
