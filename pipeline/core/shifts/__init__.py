"""Shifts: the ways real handwriting and scans differ from MNIST, as corrupted copies to measure on
(corruptions, NumPy) and as training-time augmentation (augmentation, Keras layers)."""
