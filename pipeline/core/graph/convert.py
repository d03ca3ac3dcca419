"""The serving graph: a trained model with its calibration and what its "not a digit" gate reads,
as one traced TensorFlow function, and its conversion to the ONNX graph that serving runs
(pipeline.core.graph.runtime). The predictor's `--runtime tf` runs the traced function as it is; the
export stage and `digits finetune` convert it. One definition, so both runtimes answer alike."""

from contextlib import contextmanager

import numpy as np

from pipeline.core.files import DataError, atomic_path, sha256
from pipeline.core.graph.runtime import READER_KEYS, READER_SOFT_KEYS, SECOND_LOOK, SOFT_KEYS, verifier_file
from pipeline.core.trust import confidence, gate


def serving_function(model, calibration=None, fitted_gate=None):
    """images (n, 28, 28, 1) float32 -> {"probabilities": (n, 10) calibrated, and with a gate
    "tree_inputs": (n, k), the features its trees score}, for any batch size. `calibration`: the
    calibrate stage's temperatures (confidence.temperatures; none: the model's own softmax).

    A plain `model(batch)` runs every Keras layer's Python code on each call; the traced graph
    answers the same numbers many times faster (docs/serving.md)."""
    import keras
    import tensorflow as tf

    # The model up to its logits (its last layer split into logits -> softmax), and its features.
    split = confidence.with_temperature_layers(model, 1.0)
    network = gate.with_features(keras.Model(split.inputs, split.get_layer("digit_logits").output))
    pca_mean, pca_components = fitted_gate.pca_constants() if fitted_gate else (None, None)

    def serve(images):
        logits, penultimate = network(images, training=False)
        if calibration:
            logits = logits / confidence.temperatures(images, calibration)[:, None]
        answers = {"probabilities": tf.nn.softmax(logits)}
        if fitted_gate:
            answers["tree_inputs"] = gate.tree_inputs(penultimate, images, pca_mean, pca_components)
        return answers

    return tf.function(serve, input_signature=[tf.TensorSpec([None, 28, 28, 1], tf.float32, name="images")])


class KerasGraph:
    """The serving function in-process on TensorFlow, answering as runtime.OnnxGraph answers: for
    `--runtime tf`, and for train_reader, which reads numbers before the export stage has made the
    ONNX graph."""

    BATCH = 1000  # images per call: a line's worth of crops, or a validation set's in steps

    def __init__(self, model, calibration=None, fitted_gate=None):
        self.serve = serving_function(model, calibration, fitted_gate)
        self.calibration, self.gate = calibration, fitted_gate

    def predict(self, images):
        """(n, 28, 28) float32 in MNIST form -> (n, 10) calibrated probabilities, and (n,) whether
        the gate says each image is not a digit (all False without a gate)."""
        batch = np.asarray(images, dtype=np.float32).reshape(-1, 28, 28, 1)
        outputs = [self.serve(batch[i : i + self.BATCH]) for i in range(0, max(len(batch), 1), self.BATCH)]
        probabilities = np.concatenate([out["probabilities"].numpy() for out in outputs])
        if self.gate is None:
            return probabilities, np.zeros(len(batch), bool)
        tree_inputs = np.concatenate([out["tree_inputs"].numpy() for out in outputs])
        return probabilities, self.gate.not_a_digit_from(tree_inputs)

    def not_sure(self, probabilities, not_a_digit):
        return confidence.is_not_sure(
            probabilities, not_a_digit, self.calibration["not_sure_below"] if self.calibration else 0.0
        )


OPSET = 17  # the newest that tf2onnx 1.17 converts to; ONNX Runtime runs it everywhere
ATOL = 1e-5  # largest difference in a probability allowed between ONNX Runtime and Keras
# The line reader's answers sum many more float32 terms (a line's width of windows, their context)
# and its temperature sharpens the rounding: it is held to every window's answer, and to this.
READER_ATOL = 1e-4
# The gate's score in float32 (ONNX) and float64 (scikit-learn) differ by rounding: an image this close
# to the "not a digit" threshold may fall on either side (a quantile of validation scores can be one).
GATE_ATOL = 1e-6
# Largest difference allowed between the features the gate's trees read in ONNX Runtime and in
# TensorFlow. The trees are checked on ONNX's own features: a feature that lies on one of a tree's
# split points can take either branch by a rounding, which no conversion can prevent (seen with an
# untrained CNN on a CPU without AVX-512: 1.4e-6 apart, one image of 196 flagged otherwise).
TREE_INPUTS_ATOL = 1e-4
# What the predictor reads from the graph's metadata (calibration.json's keys).
METADATA_KEYS = ("temperature", "not_sure_below", "accepted_accuracy", "not_a_digit_above", "model_sha256")


class ExportError(RuntimeError):
    pass


def to_onnx(serve, fitted_gate, metadata):
    """One ONNX model: the traced serving function, then the gate's trees on its tree_inputs."""
    import onnx
    import tf2onnx

    network, _ = tf2onnx.convert.from_function(serve, input_signature=serve.input_signature, opset=OPSET)
    width = serve.get_concrete_function().structured_outputs["tree_inputs"].shape[1]
    trees = onnx.compose.add_prefix(trees_graph(fitted_gate.trees, "tree_inputs", width), "gate_")
    # merge_models wants one version of each operator set: the newer of the two (each converter
    # declares the oldest that its own operators need).
    versions = {}
    for part in (network, trees):
        for opset in part.opset_import:
            versions[opset.domain] = max(versions.get(opset.domain, 0), opset.version)
    for part in (network, trees):
        del part.opset_import[:]
        part.opset_import.extend(onnx.helper.make_opsetid(domain, v) for domain, v in versions.items())
    trees.ir_version = network.ir_version
    joined = onnx.compose.merge_models(
        network,
        trees,
        io_map=[("tree_inputs", "gate_tree_inputs")],
        outputs=["probabilities", "gate_probabilities"],
    )
    keys = METADATA_KEYS + tuple(key for key in SOFT_KEYS if key in metadata)
    onnx.helper.set_model_props(joined, {key: str(metadata[key]) for key in keys})
    onnx.checker.check_model(joined)
    return joined


def trees_graph(trees, input_name, width):
    """Gradient-boosted trees (scikit-learn) as an ONNX graph: `input_name` (n, width) float32 ->
    label, and probabilities as one (n, classes) tensor (not a list of dicts)."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    with _tree_flags_as_ints():
        return convert_sklearn(
            trees,
            initial_types=[(input_name, FloatTensorType([None, width]))],
            options={"zipmap": False},
            target_opset={"": OPSET, "ai.onnx.ml": 3},
        )


@contextmanager
def _tree_flags_as_ints():
    """skl2onnx 1.20 gives a HistGradientBoosting tree's leaves the Python boolean False for the
    integer attribute nodes_missing_value_tracks_true, which protobuf 7 refuses ("Expected an int,
    got a boolean"). The same values as ints, for the duration of one conversion."""
    from skl2onnx.common import tree_ensemble

    add_node = tree_ensemble.add_node

    def add_node_with_int_flag(*args, nodes_missing_value_tracks_true=0, **kwargs):
        return add_node(*args, nodes_missing_value_tracks_true=int(nodes_missing_value_tracks_true), **kwargs)

    tree_ensemble.add_node = add_node_with_int_flag
    try:
        yield
    finally:
        tree_ensemble.add_node = add_node


def check(path, serve, fitted_gate, x_val):
    """ONNX Runtime against Keras on the validation images, and the gate's trees against scikit-learn's on
    the same features."""
    import onnx
    import onnxruntime

    graph = onnx.load(str(path))  # with the trees' inputs as an output too, for this check only
    graph.graph.output.append(onnx.helper.make_tensor_value_info("tree_inputs", onnx.TensorProto.FLOAT, None))
    session = onnxruntime.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    probabilities, gate_probabilities, tree_inputs = session.run(None, {"images": x_val})
    expected = {name: tensor.numpy() for name, tensor in serve(x_val).items()}
    onnx_flags = gate_probabilities[:, 1] > fitted_gate.threshold
    sklearn_flags = fitted_gate.not_a_digit_from(tree_inputs)
    tree_inputs_difference = float(np.abs(tree_inputs - expected["tree_inputs"]).max())
    scores = {
        "images": len(x_val),
        "max_probability_difference": float(np.abs(probabilities - expected["probabilities"]).max()),
        "same_digit": float(np.mean(probabilities.argmax(1) == expected["probabilities"].argmax(1))),
        "same_not_a_digit": float(
            np.mean((onnx_flags == sklearn_flags)[np.abs(gate_probabilities[:, 1] - fitted_gate.threshold) > GATE_ATOL])
        ),
        "file_bytes": path.stat().st_size,
    }
    if (
        scores["max_probability_difference"] > ATOL
        or scores["same_digit"] < 1
        or scores["same_not_a_digit"] < 1
        or tree_inputs_difference > TREE_INPUTS_ATOL
    ):
        raise ExportError(
            f"{path} does not answer as Keras does on the validation images: {scores}, "
            f"the gate's features {tree_inputs_difference:.2g} apart"
        )
    return scores


def export(model_path, calibration_path, gate_path, onnx_path, x_val):
    """Write and check one model's ONNX graph; returns the check's numbers."""
    import keras

    calibration = confidence.read_calibration(calibration_path)
    model_sha256 = sha256(model_path)
    if calibration["model_sha256"] != model_sha256:
        raise DataError(f"{calibration_path} was fitted to another {model_path}: run `dvc repro calibrate`")
    model = keras.models.load_model(model_path, compile=False)
    fitted_gate = gate.load(gate_path)
    serve = serving_function(model, calibration, fitted_gate)
    joined = to_onnx(serve, fitted_gate, {**calibration, "model_sha256": model_sha256})
    with atomic_path(onnx_path) as tmp:
        tmp.write_bytes(joined.SerializeToString())
        scores = check(tmp, serve, fitted_gate, x_val)
    return scores


def reader_function(reader, temperature):
    """lines (n, 28, width, 1) float32 -> {"windows": (n, windows, classes)}: each window's
    probabilities of the ten digits, a mark and the blank (pipeline.core.reading.sequence.CLASSES),
    at the calibrated temperature. Decoding stays outside."""
    import tensorflow as tf

    def serve(lines):
        return {"windows": tf.nn.softmax(reader(lines, training=False) / temperature)}

    return tf.function(serve, input_signature=[tf.TensorSpec([None, 28, None, 1], tf.float32, name="lines")])


def export_reader(model_path, calibration_path, onnx_path, check_lines):
    """Write and check the line reader's ONNX graph (its temperature inside, its thresholds in the
    metadata) against Keras on `check_lines` ((n, 28, width, 1)), and its verifier's trees as a graph
    of their own, checked against scikit-learn on the evidence they were fitted on; returns the
    checks' numbers."""
    import json

    import joblib
    import keras
    import onnx
    import onnxruntime
    import tf2onnx

    calibration = json.loads(calibration_path.read_text())
    model_sha256 = sha256(model_path)
    if calibration.get("model_sha256") != model_sha256:
        raise DataError(f"{calibration_path} was fitted to another {model_path}: run `dvc repro calibrate_reader`")
    serve = reader_function(keras.models.load_model(model_path, compile=False), calibration["temperature"])
    graph, _ = tf2onnx.convert.from_function(serve, input_signature=serve.input_signature, opset=OPSET)
    # Numbers, as ReaderGraph reads them back, the second look's file and the model's hash.
    metadata = {key: str(float(calibration[key])) for key in READER_KEYS} | {SECOND_LOOK: calibration[SECOND_LOOK]}
    metadata |= {key: str(float(calibration[key])) for key in READER_SOFT_KEYS if key in calibration}
    onnx.helper.set_model_props(graph, {**metadata, "model_sha256": model_sha256})
    onnx.checker.check_model(graph)
    # calibrate_reader's own file (a pickle: load only your own): the trees and the evidence they learnt from
    verifier = joblib.load(verifier_file(model_path, ".pkl"))
    trees = verifier_graph(verifier["trees"], verifier["evidence"].shape[1])
    with atomic_path(onnx_path) as tmp, atomic_path(verifier_file(onnx_path, ".onnx")) as tmp_trees:
        tmp.write_bytes(graph.SerializeToString())
        tmp_trees.write_bytes(trees.SerializeToString())
        session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        (answered,) = session.run(None, {"lines": check_lines})
        expected = serve(check_lines)["windows"].numpy()
        judged = onnxruntime.InferenceSession(str(tmp_trees), providers=["CPUExecutionProvider"])
        _, verified = judged.run(None, {"evidence": verifier["evidence"]})
        scores = {
            "lines": len(check_lines),
            "max_probability_difference": float(np.abs(answered - expected).max()),
            "same_windows": float(np.mean(answered.argmax(-1) == expected.argmax(-1))),
            "file_bytes": tmp.stat().st_size,
            "verifier_readings": len(verifier["evidence"]),
            "verifier_max_difference": float(np.abs(verified - verdicts(**verifier)).max()),
        }
        if scores["max_probability_difference"] > READER_ATOL or scores["same_windows"] < 1:
            raise ExportError(f"{onnx_path} does not answer as Keras does on the validation lines: {scores}")
        if scores["verifier_max_difference"] > ATOL:
            raise ExportError(f"the verifier's graph does not answer as scikit-learn does: {scores}")
    return scores


def verdicts(trees, evidence):
    """(n, 2) probabilities that each reading is wrong, right, by calibrate_reader's verifier: its
    trees, or the one share right that it answers when it had nothing to learn from."""
    if isinstance(trees, float):
        return np.tile(np.array([1 - trees, trees], np.float32), (len(evidence), 1))
    return trees.predict_proba(evidence)


def verifier_graph(trees, width):
    """The verifier as an ONNX graph: evidence (n, width) float32 -> label, probabilities (n, 2) that
    each reading is wrong, right."""
    from onnx import TensorProto, helper, numpy_helper

    if isinstance(trees, float):  # the same verdict for every reading: evidence x 0 + [1 - share, share]
        nodes = [
            helper.make_node("MatMul", ["evidence", "zeros"], ["nothing"]),
            helper.make_node("Add", ["nothing", "share"], ["probabilities"]),
            helper.make_node("ArgMax", ["probabilities"], ["label"], axis=1, keepdims=0),
        ]
        constants = [
            numpy_helper.from_array(np.zeros((width, 2), np.float32), "zeros"),
            numpy_helper.from_array(np.array([1 - trees, trees], np.float32), "share"),
        ]
        graph = helper.make_graph(
            nodes,
            "verifier",
            [helper.make_tensor_value_info("evidence", TensorProto.FLOAT, [None, width])],
            [
                helper.make_tensor_value_info("label", TensorProto.INT64, [None]),
                helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 2]),
            ],
            constants,
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    return trees_graph(trees, "evidence", width)
