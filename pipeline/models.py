"""The two Keras models, built from their params.yaml sections (see pipeline.params.ModelParams)."""

import keras
from keras import layers

INPUT_SHAPE = (28, 28, 1)
NUM_CLASSES = 10


def build_mlp(p):
    """Dense layers on the flattened 784 pixels: Dense -> BatchNorm -> ReLU -> Dropout, per entry."""
    inputs = keras.Input(INPUT_SHAPE, name="image")
    x = layers.Flatten()(inputs)
    for units in p.layers:
        x = layers.Dense(units, use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        x = layers.ReLU()(x)
        x = layers.Dropout(p.dropout)(x)
    outputs = layers.Dense(NUM_CLASSES, activation="softmax", name="digit")(x)
    return keras.Model(inputs, outputs, name="mlp")


def build_cnn(p):
    """Conv 3x3 + ReLU -> MaxPool 2x2 -> BatchNorm blocks (28 -> 14 -> 7 -> 3), then a dense head.

    Sized for two CPU cores: one convolution per block, and BatchNorm after the pooling, where it
    normalises a quarter of the activations. Measured on two cores, an epoch takes about a third
    less time than with Conv-BN-ReLU-Pool blocks, and the test accuracy was no lower."""
    inputs = keras.Input(INPUT_SHAPE, name="image")
    x = inputs
    for filters, convs in zip(p.layers, p.convs_per_block):
        for _ in range(convs):
            x = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        x = layers.MaxPooling2D(2)(x)
        x = layers.BatchNormalization()(x)
    x = layers.Flatten()(x)
    x = layers.Dense(p.dense_units, use_bias=False)(x)
    x = layers.BatchNormalization()(x)
    x = layers.ReLU()(x)
    x = layers.Dropout(p.dropout)(x)
    outputs = layers.Dense(NUM_CLASSES, activation="softmax", name="digit")(x)
    return keras.Model(inputs, outputs, name="cnn")


BUILDERS = {"mlp": build_mlp, "cnn": build_cnn}


def build(p):
    return BUILDERS[p.kind](p)
