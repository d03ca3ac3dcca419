"""Stage export: each model, its calibration and its "not a digit" gate as one ONNX graph, which
serving runs on ONNX Runtime without importing TensorFlow or scikit-learn.

For each model this stage
  1. traces the serving graph (pipeline.core.graph.convert: the model with its temperature, and the
     features the gate's trees read) and converts it with tf2onnx. (tf2onnx's `from_keras` fails
     on Keras 3 models; a traced function with an input signature converts.)
  2. converts the gate's trees with skl2onnx and joins them to the same graph, so one session run
     answers: images -> calibrated probabilities and the gate's score;
  3. stores the thresholds (and the sha256 of the .keras file it came from) in the graph's
     metadata, so the .onnx file is all serving needs;
  4. checks the graph against Keras and scikit-learn on the validation images: probabilities
     within graph.ATOL, the same "not a digit" answers. A mismatch fails the stage.
The line reader (train_reader) becomes a graph of its own, its temperature inside and its "sure"
thresholds in the metadata, checked against Keras on lines written from validation digits; its
verifier's trees (calibrate_reader) a small graph beside it, checked against scikit-learn.
Writes
  models/<model>.onnx     inputs: images (n, 28, 28, 1) float32 in MNIST form;
                          outputs: probabilities (n, 10), gate_probabilities (n, 2)
  models/reader.onnx      inputs: lines (n, 28, width, 1) float32 (pipeline/core/reading/lines.py);
                          outputs: windows (n, windows, 12), each window's digit, mark and blank probabilities
  models/reader.verifier.onnx  inputs: evidence (n, len(sequence.EVIDENCE)) float32;
                          outputs: label, probabilities (n, 2) that a reading is wrong, right
  reports/export.json     the checks' numbers (dvc metrics)
and logs the .onnx file to the model's MLflow run (artifact onnx/), tagging its registered version,
so that `models:/digits-cnn@champion` serves it too. The test split is not read here.
"""

from pipeline.core import params as params_module
from pipeline.core import tracking
from pipeline.core.files import load_arrays, require, write_json
from pipeline.core.graph import convert
from pipeline.core.graph.convert import ExportError
from pipeline.core.graph.runtime import verifier_file
from pipeline.core.layout import (
    EXPORT_FILE,
    MODELS,
    PROCESSED_DIR,
    READER,
    calibration_file,
    gate_file,
    model_file,
    onnx_file,
)
from pipeline.core.reading import lines

READER_CHECK_LINES = 64


def log_onnx(model, scores, *beside):
    """The .onnx file on the model's MLflow run (with the files `beside` it that serving reads too),
    and its name on the registered version."""
    import mlflow

    run_file = tracking.read_run_file(model)
    with tracking.run(run_id=run_file["run_id"]):
        for file in (onnx_file(model), *beside):
            mlflow.log_artifact(str(file), "onnx")
        mlflow.log_metrics({f"onnx_{k}": v for k, v in scores.items()})
    tracking.tag_model_version(run_file, {"onnx": f"onnx/{onnx_file(model).name}"})


def export_reader(data, params):
    x, y = data["x_val"][..., 0], data["y_val"].argmax(1)
    written = lines.training_lines(x, y, READER_CHECK_LINES, params.read.seed)
    check, _ = lines.padded([line for line, _ in written])
    scores = convert.export_reader(model_file(READER), calibration_file(READER), onnx_file(READER), check)
    log_onnx(READER, scores, verifier_file(onnx_file(READER), ".onnx"))
    print(
        f"export reader: {onnx_file(READER)} ({scores['file_bytes'] / 1e6:.1f} MB); on {scores['lines']} validation "
        f"lines it answers as Keras does (largest probability difference {scores['max_probability_difference']:.1e}); "
        f"its verifier as scikit-learn does ({scores['verifier_max_difference']:.1e})",
        flush=True,
    )
    return scores


def export_models(params):
    require(*(path(model) for model in MODELS for path in (model_file, calibration_file, gate_file)))
    require(model_file(READER), calibration_file(READER), verifier_file(model_file(READER), ".pkl"))
    data = load_arrays(PROCESSED_DIR, ["x_val", "y_val"])
    tracking.use_experiment(params.mlflow.experiment)
    report = {}
    for model in MODELS:
        paths = model_file(model), calibration_file(model), gate_file(model), onnx_file(model)
        scores = report[model] = convert.export(*paths, data["x_val"])
        log_onnx(model, scores)
        print(
            f"export {model}: {onnx_file(model)} ({scores['file_bytes'] / 1e6:.1f} MB); on {scores['images']:,} "
            f"validation images it answers as Keras does (largest probability difference "
            f'{scores["max_probability_difference"]:.1e}, same digit and same "not a digit" for every image)',
            flush=True,
        )
    report[READER] = export_reader(data, params)
    write_json(EXPORT_FILE, report)


def main():
    params_module.run_stage("export", export_models, expected=(ExportError,))


if __name__ == "__main__":
    main()
