"""MNIST digit recognition as a DVC pipeline: fetch, preprocess, train, evaluate, visualize
(one module each, mapped by dvc.yaml), plus the serving side that uses the trained models:
normalize, predictor, api and cli (`digits`)."""

from pipeline.core import quiet_tensorflow  # noqa: F401  (must run before anything imports TensorFlow)
