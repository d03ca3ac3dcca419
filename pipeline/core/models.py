"""The two Keras models, built from their params.yaml sections (pipeline.core.params.MLPParams, CNNParams)."""

import keras
from keras import layers

from pipeline.core.layout import IMAGE_SHAPE, MODELS, NUM_CLASSES


def build_mlp(mlp_params):
    """Dense layers on the flattened 784 pixels: Dense -> BatchNorm -> ReLU -> Dropout, per entry."""
    inputs = keras.Input(IMAGE_SHAPE, name="image")
    x = layers.Flatten()(inputs)
    for units in mlp_params.hidden_units:
        x = layers.Dense(units, use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        x = layers.ReLU()(x)
        x = layers.Dropout(mlp_params.dropout)(x)
    outputs = layers.Dense(NUM_CLASSES, activation="softmax", name="digit")(x)
    return keras.Model(inputs, outputs, name="mlp")


def build_cnn(cnn_params):
    """(Conv 3x3 + ReLU) x convs_per_block -> MaxPool 2x2 -> BatchNorm blocks (28 -> 14 -> 7 -> 3),
    then a dense head. With `arch: resnet`, each convolution after a block's first one is a
    residual unit (x + conv(x)).

    Sized for two CPU cores: BatchNorm after the pooling, where it normalises a quarter of the
    activations (the cost against Conv-BN-ReLU-Pool blocks: docs/experiments.md)."""
    inputs = keras.Input(IMAGE_SHAPE, name="image")
    x = inputs
    for filters, convs in zip(cnn_params.filters, cnn_params.convs_per_block, strict=True):
        x = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        for _ in range(convs - 1):
            branch = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
            # resnet: the extra convolutions learn a change to their input (an identity shortcut),
            # at the same cost as the plain stack; the gradient reaches the first layers unchanged.
            x = layers.Add()([x, branch]) if cnn_params.arch == "resnet" else branch
        x = layers.MaxPooling2D(2)(x)
        x = layers.BatchNormalization()(x)
    x = layers.Flatten()(x)
    x = layers.Dense(cnn_params.dense_units, use_bias=False)(x)
    x = layers.BatchNormalization()(x)
    x = layers.ReLU()(x)
    x = layers.Dropout(cnn_params.dropout)(x)
    outputs = layers.Dense(NUM_CLASSES, activation="softmax", name="digit")(x)
    return keras.Model(inputs, outputs, name="cnn")


BUILDERS = {"mlp": build_mlp, "cnn": build_cnn}
assert BUILDERS.keys() == MODELS.keys(), "a model in layout.MODELS needs a builder here"


def build(model_params):
    return BUILDERS[model_params.name](model_params)
