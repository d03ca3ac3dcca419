"""The exported serving graph (pipeline/export.py) on ONNX Runtime: the model, its calibration and
its "not a digit" gate in one file, with the thresholds in its metadata. Neither TensorFlow nor
scikit-learn is imported. Serving's Predictor and the read_eval stage both answer through it."""

import numpy as np

from pipeline.core.trust.confidence import is_not_sure

CALIBRATION_KEYS = ("temperature", "not_sure_below", "accepted_accuracy", "not_a_digit_above")
SOFT_KEYS = ("soft_from", "soft_temperature")  # only in graphs whose calibration has the soft rule


class OnnxGraph:
    def __init__(self, path, threads=None):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1  # the graph is one chain of operations
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        metadata = self.session.get_modelmeta().custom_metadata_map
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
