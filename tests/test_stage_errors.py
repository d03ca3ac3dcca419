"""Every stage run before its inputs exist ends with `<stage>: <message>` naming what is missing,
a non-zero exit and no traceback, as `dvc repro` shows it."""

import subprocess
import sys

import pytest

CASES = {
    "fetch": (["pipeline.fetch"], "could not get MNIST from any source"),
    "preprocess": (["pipeline.preprocess"], "data/raw/ lacks x_train.npy"),
    "train mlp": (["pipeline.train", "mlp"], "data/processed/ lacks x_train.npy"),
    "calibrate": (["pipeline.calibrate"], "data/processed/ lacks x_train.npy"),
    "export": (["pipeline.export"], "models/mlp.keras, models/mlp.calibration.json, models/mlp.gate.pkl"),
    "evaluate": (["pipeline.evaluate"], "data/processed/ lacks x_test.npy"),
    "robustness": (["pipeline.robustness"], "data/processed/ lacks x_test.npy"),
    "read_eval": (
        ["pipeline.read_eval"],
        "models/cnn.onnx, models/mlp.onnx, models/reader.onnx, models/reader.verifier.onnx not found",
    ),
    "visualize": (["pipeline.visualize"], "data/processed/ lacks x_test.npy"),
}


def run_stage(module_and_args):
    return subprocess.run([sys.executable, "-m", *module_and_args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("stage", CASES)
def test_a_stage_without_its_inputs_names_them_without_a_traceback(project, tmp_path, stage):
    project(fetch__sources=["local"], fetch__local_dir=str(tmp_path / "no-such-folder"))
    command, message = CASES[stage]
    done = run_stage(command)
    assert done.returncode != 0
    assert done.stderr.startswith(f"{stage}: ") and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "stage, missing",
    [
        ("calibrate", "models/mlp.keras, models/cnn.keras not found"),
        ("export", "models/mlp.keras, models/mlp.calibration.json, models/mlp.gate.pkl, models/cnn.keras"),
        (
            "robustness",
            "models/mlp.keras, models/cnn.keras, models/mlp.calibration.json, models/cnn.calibration.json not found",
        ),
        ("evaluate", "models/mlp.keras, models/cnn.keras, models/mlp.calibration.json, models/cnn.calibration.json, "),
        ("visualize", "reports/data_stats.json"),
    ],
)
def test_later_stages_name_the_missing_upstream_outputs(processed_data, stage, missing):
    done = run_stage([f"pipeline.{stage}"])
    assert done.returncode != 0
    assert done.stderr.startswith(f"{stage}: ") and missing in done.stderr and "dvc repro" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
