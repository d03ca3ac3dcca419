"""Where the pipeline's files live and what its data looks like: the one place the stages, the
benchmark and the tests take paths and shapes from. Paths are relative to the project root,
where DVC runs every stage; dvc.yaml names the same paths as deps and outs."""

from pathlib import Path

RAW_DIR = Path("data/raw")  # fetch: MNIST as published, as .npy
PROCESSED_DIR = Path("data/processed")  # preprocess: x_/y_ train, val, test, ready for Keras
DATA_STATS_FILE = Path("reports/data_stats.json")
MODELS_DIR = Path("models")  # train: <model>.keras, .run.json; calibrate: .calibration.json, .gate.pkl; export: .onnx
TRAIN_REPORTS_DIR = Path("reports/train")
CALIBRATION_FILE = Path("reports/calibration.json")  # calibrate: validation scores before and after
EXPORT_FILE = Path("reports/export.json")  # export: how closely ONNX Runtime answers as Keras does
EVAL_DIR = Path("reports/eval")  # evaluate: per-model report and predictions
METRICS_FILE = Path("reports/metrics.json")
ROBUSTNESS_FILE = Path("reports/robustness.json")  # robustness: accuracy on corrupted test copies
READER_CALIBRATION_FILE = Path("reports/reader_calibration.json")  # calibrate_reader: validation scores
READING_FILE = Path("reports/reading.json")  # read_eval: how well whole numbers are read
READING_EXAMPLES_DIR = Path("data/reading_examples")  # read_eval: a few numbers, boxes and readings
FIGURES_DIR = Path("reports/figures")  # visualize

# The models, by the name their params.yaml section, files, stages and registry entries use, with
# the name figures show: the one list that params, models (BUILDERS) and visualize read.
MODELS = {"mlp": "MLP", "cnn": "CNN"}
READER = "reader"  # the line reader's files, stage and registry entry (models/reader.keras, digits-reader)

IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10
DIGITS = tuple(range(NUM_CLASSES))


# The files of one model, side by side: models/cnn.keras, models/cnn.run.json, ... (train writes the
# first two, calibrate the next two, export the last; `digits finetune` writes all but the run).
SIDE_FILES = {
    "keras": ".keras",
    "run": ".run.json",
    "calibration": ".calibration.json",
    "gate": ".gate.pkl",
    "onnx": ".onnx",
}


def beside(model_path, part):
    """The file `part` (a key of SIDE_FILES) of the model whose file is `model_path`."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.stem + SIDE_FILES[part])


def model_file(model):
    return MODELS_DIR / f"{model}.keras"


def run_file(model):
    return beside(model_file(model), "run")


def calibration_file(model):
    return beside(model_file(model), "calibration")


def gate_file(model):
    return beside(model_file(model), "gate")


def onnx_file(model):
    return beside(model_file(model), "onnx")
