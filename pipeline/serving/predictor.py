"""A trained model ready to answer, loaded once. By default its ONNX graph (pipeline/export.py:
the model, its calibration and its "not a digit" gate in one) runs on ONNX Runtime, and neither
TensorFlow nor scikit-learn is imported. `runtime="tf"` runs the .keras file on TensorFlow with the
calibration and pickled gate that the calibrate stage fitted for it: for comparison, and for a model
without an .onnx file."""

import os
import re
import sys
from pathlib import Path

import numpy as np

from pipeline.core.files import sha256
from pipeline.core.graph.runtime import OnnxGraph
from pipeline.core.layout import beside
from pipeline.core.trust.confidence import read_calibration

DEFAULT_MODEL = "models/cnn.keras"
RUNTIMES = ("onnx", "tf")
REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


def is_remote(source):
    """Whether a model source is an MLflow URI (runs:/, models:/, or any scheme://), not a file."""
    return "://" in str(source) or str(source).startswith(("runs:/", "models:/"))


def check_source(source):
    """Refuses a model file that does not exist, before any worker or actor tries to load it."""
    if not (is_remote(source) or Path(source).exists()):
        raise FileNotFoundError(f"{source}: no such model file (train one with `./dev repro`, or `dvc pull`)")


def threads_from_environment():
    """Threads for the model: DIGITS_THREADS (`digits serve --workers N` gives each worker its share
    of the cores), else the runtime's default (every core)."""
    value = os.environ.get("DIGITS_THREADS", "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"DIGITS_THREADS={value!r}: expected a whole number of threads, 1 or more")
    return int(value)


class Predictor:
    def __init__(self, source=DEFAULT_MODEL, runtime="onnx", threads=None):
        """`source`: a .keras or .onnx file, or an MLflow model URI (runs:/<run id>/model,
        models:/<name>/<version>, models:/<name>@<alias>). `threads`: for the model's operations
        (default: threads_from_environment())."""
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime {runtime!r}: expected one of {', '.join(RUNTIMES)}")
        self.source, self.runtime = str(source), runtime
        self.registered = None  # name, version and alias when the model comes from the Model Registry
        threads = threads or threads_from_environment()
        self.remote = is_remote(self.source)
        if self.remote:
            files = self._download(self.source)
        else:
            files = self._local(Path(self.source))
        if runtime == "onnx":
            self._load_onnx(files, threads)
        else:
            self._load_tf(files, threads)
        self.temperature = self.calibration["temperature"] if self.calibration else 1.0
        self.predict(np.zeros((1, 28, 28), np.float32))  # warm up now, not in the first request

    def _local(self, path):
        """The files of a local model: models/cnn.keras or models/cnn.onnx, and beside it the rest."""
        if not path.exists():
            hint = "run `dvc repro export`, or use --runtime tf" if path.suffix == ".onnx" else "train one"
            raise FileNotFoundError(f"{path}: no such model file ({hint}; or `./dev repro`, or `dvc pull`)")
        files = {part: beside(path, part) for part in ("keras", "onnx", "calibration", "gate")}
        return {**files, "keras": files["keras"] if files["keras"].exists() else None}

    def _load_onnx(self, files, threads):
        path = files["onnx"]
        if path is None or not path.exists():
            raise FileNotFoundError(
                f"{path or self.source}: no ONNX export of this model (run `dvc repro export`, or use --runtime tf)"
            )
        self.graph = OnnxGraph(path, threads)
        if files["keras"] is not None and self.graph.model_sha256 != sha256(files["keras"]):
            raise ValueError(f"{path} was exported from another {files['keras'].name}; run `dvc repro export`")
        # As the tf runtime names the same model: the URI, or the .keras file's sha256.
        self.identity = self.source if self.remote else "sha256:" + self.graph.model_sha256[:16]
        self.calibration = self.graph.calibration

    def _load_tf(self, files, threads):
        import keras
        import tensorflow as tf

        from pipeline.core.graph.convert import KerasGraph
        from pipeline.core.trust import gate

        path = files["keras"]
        if path is None:
            raise FileNotFoundError(f"{self.source}: the tf runtime needs the .keras file beside it")
        if threads and tf.config.threading.get_intra_op_parallelism_threads() != threads:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
        self.keras_path = path
        model_sha256 = sha256(path)
        if self.remote:
            self.identity = self.source
            calibration_path, gate_path = files["calibration"], files["gate"]
        else:
            self.identity = "sha256:" + model_sha256[:16]
            calibration_path, gate_path = self._calibration_beside(files, model_sha256)
        self.calibration = read_calibration(calibration_path) if calibration_path else None
        if self.calibration is None:
            print(f"{self.source}: no calibration found; confidences are the model's own", file=sys.stderr)
        fitted_gate = gate.load(gate_path) if gate_path else None
        self.graph = KerasGraph(keras.models.load_model(path, compile=False), self.calibration, fitted_gate)

    @staticmethod
    def _calibration_beside(files, model_sha256):
        """models/cnn.calibration.json and models/cnn.gate.pkl beside models/cnn.keras, if they
        were fitted to this very file."""
        calibration_path, gate_path = files["calibration"], files["gate"]
        if not calibration_path.exists():
            return None, None
        calibration = read_calibration(calibration_path)
        if calibration.get("model_sha256") != model_sha256:
            raise ValueError(
                f"{calibration_path} was fitted to another {files['keras'].name}; "
                "run `dvc repro calibrate` (or `dvc pull`)"
            )
        if not gate_path.exists():
            return calibration_path, None
        if calibration.get("gate_sha256") != sha256(gate_path):
            raise ValueError(f"{gate_path} is not the gate {calibration_path} names; run `dvc repro calibrate`")
        return calibration_path, gate_path

    def _download(self, uri):
        import mlflow
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        from pipeline.core import tracking

        mlflow.set_tracking_uri(tracking.tracking_uri())
        registry = REGISTRY_URI.match(uri)
        run_id = uri.split("/")[1] if uri.startswith("runs:/") else None
        try:
            if registry:
                name, alias = registry["name"], registry["alias"]
                client = MlflowClient()
                version = (
                    client.get_model_version_by_alias(name, alias)
                    if alias
                    else client.get_model_version(name, registry["version"])
                )
                self.registered = {
                    "name": name,
                    "version": int(version.version),
                    "alias": alias,
                    "aliases": list(version.aliases),
                }
                # Pin the version: an alias that moves while we serve must not change what answers.
                uri = f"models:/{name}/{version.version}"
                run_id = version.run_id
            else:
                MlflowClient().get_run(run_id)  # an unknown run is named here, not as a missing file
        except MlflowException as e:
            raise FileNotFoundError(f"{self.source}: {e.message}") from None
        # The calibrate stage adds calibration.json and gate/ to the model's training run, and
        # the export stage onnx/. (A progress bar for small files would only clutter the output.)
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        files = {}
        artifacts = [
            ("onnx", "onnx", "*.onnx"),
            ("calibration", "calibration.json", None),
            ("gate", "gate", "*.gate.pkl"),
        ]
        for key, artifact, pattern in artifacts:
            try:
                found = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact))
            except (MlflowException, OSError):
                found = None
            files[key] = next(iter(sorted(found.glob(pattern))), None) if found and pattern else found
        files["keras"] = None
        if self.runtime == "tf":
            try:
                model_folder = Path(mlflow.artifacts.download_artifacts(uri))
            except MlflowException as e:
                raise FileNotFoundError(f"{self.source}: {e.message}") from None
            files["keras"] = next(iter(sorted(model_folder.rglob("*.keras"))), None)
            if files["keras"] is None:
                raise FileNotFoundError(f"{self.source}: no .keras file in the MLflow model")
        return files

    def predict(self, images):
        """(n, 28, 28) float32 in MNIST form -> (n, 10) calibrated probabilities, and (n,) whether
        the gate says each image is not a digit (all False without a gate)."""
        return self.graph.predict(images)

    def probabilities(self, images):
        return self.predict(images)[0]

    def not_sure(self, probabilities, not_a_digit):
        """Whether each answer is "not sure": by the calibrated threshold (never without a calibration)."""
        return self.graph.not_sure(probabilities, not_a_digit)
