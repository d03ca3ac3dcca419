"""The exported graphs (pipeline/export.py) on ONNX Runtime, with the thresholds in their metadata:
a digit model with its calibration and "not a digit" gate (OnnxGraph), and the line reader with its
temperature, its verifier and its second look (ReaderGraph). Neither TensorFlow nor scikit-learn is
imported. Serving and the read_eval stage answer through them."""

from pathlib import Path

import numpy as np

from pipeline.core.trust.confidence import is_not_sure

CALIBRATION_KEYS = ("temperature", "not_sure_below", "accepted_accuracy", "not_a_digit_above")
SOFT_KEYS = ("soft_from", "soft_temperature", "smooth_below")  # only in graphs whose calibration has them


READER_KEYS = ("temperature", "sure_from", "soft_from", "soft_sure_from", "accepted_accuracy", "stride", "lost")
READER_SOFT_KEYS = ("smooth_below",)  # only in readers calibrated since the smoothness rule (docs/reading.md, rule 12)
SECOND_LOOK = "second_look"  # the reader's metadata: the file, beside it, of the digit model that looks again


def verifier_file(reader_path, suffix):
    """The line reader's verifier, beside the reader's file: its trees (".pkl", written by
    calibrate_reader) or their ONNX graph (".onnx", by export)."""
    reader_path = Path(reader_path)
    return reader_path.with_name(f"{reader_path.stem}.verifier{suffix}")


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
    probabilities of the ten digits, a mark and the blank. Its calibration holds the temperature, the
    "sure" thresholds, and the windows' geometry (stride, lost: pipeline.core.reading.sequence.geometry).
    Beside its file: the verifier that judges a whole reading (<reader>.verifier.onnx), and the
    digit model its metadata names as the second look (an OnnxGraph)."""

    def __init__(self, path, threads=None):
        self.session, metadata = session(path, threads)
        self.model_sha256 = metadata["model_sha256"]
        keys = READER_KEYS + tuple(key for key in READER_SOFT_KEYS if key in metadata)
        self.calibration = {key: float(metadata[key]) for key in keys}
        verifier, second_look = verifier_file(path, ".onnx"), Path(path).with_name(metadata[SECOND_LOOK])
        missing = [str(file) for file in (verifier, second_look) if not file.exists()]
        if missing:
            raise FileNotFoundError(f"{', '.join(missing)} not found: the line reader {path} reads with them")
        self.verifier, _ = session(verifier, threads)
        self.second_look = OnnxGraph(second_look, threads)

    def windows(self, lines):
        """(n, 28, width, 1) float32 -> (n, windows, classes): the ten digits, a mark, the blank."""
        (probabilities,) = self.session.run(None, {"lines": np.asarray(lines, np.float32)})
        return probabilities

    def verify(self, evidence):
        """(n, len(sequence.EVIDENCE)) -> (n,): each reading's probability of being right."""
        _, probabilities = self.verifier.run(None, {"evidence": np.asarray(evidence, np.float32)})
        return probabilities[:, 1]
