"""MNIST digit recognition as a DVC pipeline: fetch, preprocess, train, evaluate, visualize."""

import os

# TensorFlow prints pages of C++ start-up logs (oneDNN notices, CPU feature flags) before
# anything useful; silence them for every entry point unless the user asked for them.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
