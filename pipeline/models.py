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
    """Conv 3x3 -> BatchNorm -> ReLU -> MaxPool 2x2 blocks (28 -> 14 -> 7 -> 3), then a dense head.

    One convolution per block: on two CPU cores a second one at full resolution costs more time
    than the accuracy it buys; BatchNorm and augmentation do more for it."""
    inputs = keras.Input(INPUT_SHAPE, name="image")
    x = inputs
    for filters in p.layers:
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        x = layers.ReLU()(x)
        x = layers.MaxPooling2D(2)(x)
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
