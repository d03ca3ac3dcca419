"""The exported graphs (pipeline/export.py) on ONNX Runtime, with the thresholds in their metadata:
a digit model with its calibration and "not a digit" gate (OnnxGraph), and the line reader with its
temperature (ReaderGraph). Neither TensorFlow nor scikit-learn is imported. Serving and the
read_eval stage answer through them."""

import numpy as np

from pipeline.core.trust.confidence import is_not_sure

CALIBRATION_KEYS = ("temperature", "not_sure_below", "accepted_accuracy", "not_a_digit_above")
SOFT_KEYS = ("soft_from", "soft_temperature", "smooth_below")  # only in graphs whose calibration has them


READER_KEYS = ("temperature", "sure_from", "soft_from", "soft_sure_from", "accepted_accuracy", "stride", "lost")
READER_SOFT_KEYS = ("smooth_below",)  # only in readers calibrated since the smoothness rule (docs/reading.md, rule 12)
READER_RULE = "confidence"  # the name of the number's confidence (pipeline.core.reading.sequence.CONFIDENCES)


def session(path, threads=None):
    """An ONNX Runtime session on the CPU, and the graph's metadata."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1  # the graph is one chain of operations
    opened = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return opened, opened.get_modelmeta().custom_metadata_map


class OnnxGraph:
    def __init__(self, path, threads=None):
        self.session, metadata = session(path, threads)
        self.model_sha256 = metadata["model_sha256"]  # of the .keras file it was exported from
        self.calibration = {key: float(metadata[key]) for key in CALIBRATION_KEYS + SOFT_KEYS if key in metadata}

    def predict(self, images):
        """(n, 28, 28) float32 in MNIST form -> (n, 10) calibrated probabilities, and (n,) whether
        the gate says each image is not a digit."""
        batch = np.asarray(images, dtype=np.float32).reshape(-1, 28, 28, 1)
        probabilities, gate_probabilities = self.session.run(None, {"images": batch})
        return probabilities, gate_probabilities[:, 1] > self.calibration["not_a_digit_above"]

    def not_sure(self, probabilities, not_a_digit):
        return is_not_sure(probabilities, not_a_digit, self.calibration["not_sure_below"])


class ReaderGraph:
    """The line reader: lines in its form (pipeline.core.reading.lines) -> each window's calibrated
    probabilities of the ten digits and the blank. Its calibration holds the temperature, the "sure"
    threshold, and the windows' geometry (stride, lost: pipeline.core.reading.sequence.geometry)."""

    def __init__(self, path, threads=None):
        self.session, metadata = session(path, threads)
        self.model_sha256 = metadata["model_sha256"]
        keys = READER_KEYS + tuple(key for key in READER_SOFT_KEYS if key in metadata)
        self.calibration = {key: float(metadata[key]) for key in keys} | {READER_RULE: metadata[READER_RULE]}

    def windows(self, lines):
        """(n, 28, width, 1) float32 -> (n, windows, classes): the ten digits, a mark, the blank."""
        (probabilities,) = self.session.run(None, {"lines": np.asarray(lines, np.float32)})
        return probabilities
