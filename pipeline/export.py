"""Stage export: each model, its calibration and its "not a digit" gate as one ONNX graph, which
serving runs on ONNX Runtime without importing TensorFlow or scikit-learn.

For each model this stage
  1. traces the serving graph (pipeline.core.graph: the model with its temperature, and the
     features the gate's trees read) and converts it with tf2onnx. (tf2onnx's `from_keras` fails
     on Keras 3 models; a traced function with an input signature converts.)
  2. converts the gate's trees with skl2onnx and joins them to the same graph, so one session run
     answers: images -> calibrated probabilities and the gate's score;
  3. stores the thresholds (and the sha256 of the .keras file it came from) in the graph's
     metadata, so the .onnx file is all serving needs;
  4. checks the graph against Keras and scikit-learn on the validation images: probabilities
     within ATOL, the same "not a digit" answers. A mismatch fails the stage.
Writes
  models/<model>.onnx     inputs: images (n, 28, 28, 1) float32 in MNIST form;
                          outputs: probabilities (n, 10), gate_probabilities (n, 2)
  reports/export.json     the check's numbers (dvc metrics)
and logs the .onnx file to the model's MLflow run (artifact onnx/), tagging its registered version,
so that `models:/digits-cnn@champion` serves it too. The test split is not read here.
"""

from contextlib import contextmanager

import numpy as np

from pipeline.core import confidence, graph, tracking
from pipeline.core import params as params_module
from pipeline.core.files import DataError, atomic_path, load_arrays, require, sha256, write_json
from pipeline.core.layout import EXPORT_FILE, PROCESSED_DIR, calibration_file, gate_file, model_file, onnx_file

OPSET = 17  # the newest that tf2onnx 1.17 converts to; ONNX Runtime runs it everywhere
ATOL = 1e-5  # largest difference in a probability allowed between ONNX Runtime and Keras
# What the predictor reads from the graph's metadata (calibration.json's keys).
METADATA_KEYS = ("temperature", "not_sure_below", "accepted_accuracy", "not_a_digit_above", "model_sha256")


class ExportError(RuntimeError):
    pass


def to_onnx(serve, fitted_gate, metadata):
    """One ONNX model: the traced serving function, then the gate's trees on its tree_inputs."""
    import onnx
    import tf2onnx
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    network, _ = tf2onnx.convert.from_function(serve, input_signature=serve.input_signature, opset=OPSET)
    width = serve.get_concrete_function().structured_outputs["tree_inputs"].shape[1]
    with _tree_flags_as_ints():
        trees = convert_sklearn(
            fitted_gate.trees,
            initial_types=[("tree_inputs", FloatTensorType([None, width]))],
            options={"zipmap": False},  # probabilities as one (n, 2) tensor, not a list of dicts
            target_opset={"": OPSET, "ai.onnx.ml": 3},
        )
    trees = onnx.compose.add_prefix(trees, "gate_")
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
    onnx.helper.set_model_props(joined, {key: str(metadata[key]) for key in METADATA_KEYS})
    onnx.checker.check_model(joined)
    return joined


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
    """ONNX Runtime against Keras and scikit-learn on the validation images."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    probabilities, gate_probabilities = session.run(None, {"images": x_val})
    expected = {name: tensor.numpy() for name, tensor in serve(x_val).items()}
    onnx_flags = gate_probabilities[:, 1] > fitted_gate.threshold
    keras_flags = fitted_gate.not_a_digit_from(expected["tree_inputs"])
    scores = {
        "images": len(x_val),
        "max_probability_difference": float(np.abs(probabilities - expected["probabilities"]).max()),
        "same_digit": float(np.mean(probabilities.argmax(1) == expected["probabilities"].argmax(1))),
        "same_not_a_digit": float(np.mean(onnx_flags == keras_flags)),
        "file_bytes": path.stat().st_size,
    }
    if scores["max_probability_difference"] > ATOL or scores["same_digit"] < 1 or scores["same_not_a_digit"] < 1:
        raise ExportError(f"{path} does not answer as Keras does on the validation images: {scores}")
    return scores


def export(model_path, calibration_path, gate_path, onnx_path, x_val):
    """Write and check one model's ONNX graph; returns the check's numbers."""
    import joblib
    import keras

    calibration = confidence.read_calibration(calibration_path)
    model_sha256 = sha256(model_path)
    if calibration["model_sha256"] != model_sha256:
        raise DataError(f"{calibration_path} was fitted to another {model_path}: run `dvc repro calibrate`")
    model = keras.models.load_model(model_path, compile=False)
    fitted_gate = joblib.load(gate_path)
    serve = graph.serving_function(model, calibration["temperature"], fitted_gate)
    joined = to_onnx(serve, fitted_gate, {**calibration, "model_sha256": model_sha256})
    with atomic_path(onnx_path) as tmp:
        tmp.write_bytes(joined.SerializeToString())
        scores = check(tmp, serve, fitted_gate, x_val)
    return scores


def export_models(params):
    import mlflow

    require(*(path(kind) for kind in params_module.MODELS for path in (model_file, calibration_file, gate_file)))
    x_val = load_arrays(PROCESSED_DIR, ["x_val"])["x_val"]
    tracking.use_experiment(params.mlflow.experiment)
    report = {}
    for kind in params_module.MODELS:
        paths = model_file(kind), calibration_file(kind), gate_file(kind), onnx_file(kind)
        scores = report[kind] = export(*paths, x_val)
        run_file = tracking.read_run_file(kind)
        with tracking.run(run_id=run_file["run_id"]):
            mlflow.log_artifact(str(onnx_file(kind)), "onnx")
            mlflow.log_metrics({f"onnx_{k}": v for k, v in scores.items()})
        tracking.tag_model_version(run_file, {"onnx": f"onnx/{onnx_file(kind).name}"})
        print(
            f"export {kind}: {onnx_file(kind)} ({scores['file_bytes'] / 1e6:.1f} MB); on {scores['images']:,} "
            f"validation images it answers as Keras does (largest probability difference "
            f'{scores["max_probability_difference"]:.1e}, same digit and same "not a digit" for every image)',
            flush=True,
        )
    write_json(EXPORT_FILE, report)


def main():
    params = params_module.load_or_exit("export")
    try:
        export_models(params)
    except (DataError, ExportError) as e:
        raise SystemExit(f"export: {e}") from None


if __name__ == "__main__":
    main()
