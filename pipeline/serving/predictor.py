"""A trained model ready to answer: loaded once from a .keras file or from MLflow, with what the
calibrate stage fitted for it: a temperature, a "not sure" threshold and a "not a digit" gate."""

import hashlib
import os
import re
import sys
from pathlib import Path

import numpy as np

from pipeline.core.confidence import read_calibration

DEFAULT_MODEL = "models/cnn.keras"
REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


class Predictor:
    def __init__(self, source=DEFAULT_MODEL):
        """`source`: a .keras file, or an MLflow model URI (runs:/<run id>/model,
        models:/<name>/<version>, models:/<name>@<alias>)."""
        import keras

        self.source = str(source)
        self.registered = None  # name, version and alias when the model comes from the Model Registry
        if "://" in self.source or self.source.startswith(("runs:/", "models:/")):
            path, calibration_path, gate_path = self._download(self.source)
            self.identity = self.source
            self.calibration = read_calibration(calibration_path) if calibration_path else None
        else:
            path = Path(self.source)
            if not path.exists():
                raise FileNotFoundError(f"{path}: no such model file (train one with `./dev repro`, or `dvc pull`)")
            sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
            self.identity = "sha256:" + sha256[:16]
            self.calibration, gate_path = self._calibration_beside(path, sha256)
        if self.calibration is None:
            print(f"{self.source}: no calibration found; confidences are the model's own", file=sys.stderr)
        self.temperature = self.calibration["temperature"] if self.calibration else 1.0
        # Answers less confident than this are marked "not sure" (0: no calibration, never).
        self.not_sure_below = self.calibration["not_sure_below"] if self.calibration else 0.0
        self.gate = _load_gate(gate_path) if gate_path else None
        self.model = keras.models.load_model(path, compile=False)
        self._infer = traced(self.model, self.temperature, with_features=self.gate is not None)
        self.predict(np.zeros((1, 28, 28), np.float32))  # trace now, not in the first request

    @staticmethod
    def _calibration_beside(path, sha256):
        """models/cnn.keras -> models/cnn.calibration.json and models/cnn.gate.pkl, if they were
        fitted to this very file."""
        calibration_path = path.with_name(f"{path.stem}.calibration.json")
        gate_path = path.with_name(f"{path.stem}.gate.pkl")
        if not calibration_path.exists():
            return None, None
        calibration = read_calibration(calibration_path)
        if calibration.get("model_sha256") != sha256:
            raise ValueError(
                f"{calibration_path} was fitted to another {path.name}; run `dvc repro calibrate` (or `dvc pull`)"
            )
        if not gate_path.exists():
            return calibration, None
        if calibration.get("gate_sha256") != hashlib.sha256(gate_path.read_bytes()).hexdigest():
            raise ValueError(f"{gate_path} is not the gate {calibration_path} names; run `dvc repro calibrate`")
        return calibration, gate_path

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
            local = mlflow.artifacts.download_artifacts(uri)
        except MlflowException as e:
            raise FileNotFoundError(f"{self.source}: {e.message}") from None
        found = sorted(Path(local).rglob("*.keras"))
        if not found:
            raise FileNotFoundError(f"{self.source}: no .keras file in the MLflow model")
        # The calibrate stage adds calibration.json and gate/ to the model's training run. (A
        # progress bar for one small file would only clutter the CLI's output.)
        extras = []
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        for artifact in ("calibration.json", "gate"):
            try:
                extras.append(Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact)))
            except (MlflowException, OSError):
                extras.append(None)
        calibration, gate_folder = extras
        gate = next(iter(sorted(gate_folder.glob("*.gate.pkl"))), None) if gate_folder else None
        return found[0], calibration, gate

    def predict(self, images):
        """(n, 28, 28) float32 in MNIST form -> (n, 10) calibrated probabilities, and (n,) whether
        the gate says each image is not a digit (all False without a gate)."""
        batch = np.asarray(images, dtype=np.float32).reshape(-1, 28, 28, 1)
        if self.gate is None:
            return self._infer(batch).numpy(), np.zeros(len(batch), bool)
        probabilities, features = (t.numpy() for t in self._infer(batch))
        return probabilities, self.gate.not_a_digit(features, batch)

    def probabilities(self, images):
        return self.predict(images)[0]

    def not_sure(self, probabilities, not_a_digit):
        """Whether one answer is "not sure": below the calibrated threshold, or not a digit at all."""
        return bool(not_a_digit or np.max(probabilities) < self.not_sure_below)


def _load_gate(path):
    import joblib

    return joblib.load(path)  # a pickle: only load gates this project's calibrate stage wrote


def traced(model, temperature=1.0, with_features=False):
    """The model's forward pass, with its temperature built in (confidence.with_temperature_layers),
    as one TensorFlow graph for any batch size; with_features, it also returns the penultimate
    features for the gate. A plain `model(batch)` runs every Keras layer's Python code on each call
    (~10 ms for one image on two cores); the graph answers one image in well under a millisecond,
    with the same numbers."""
    import tensorflow as tf

    from pipeline.core.confidence import with_temperature_layers
    from pipeline.core.gate import with_features as add_features

    network = with_temperature_layers(model, temperature) if temperature != 1.0 else model
    network = add_features(network) if with_features else network
    return tf.function(
        lambda batch: network(batch, training=False), input_signature=[tf.TensorSpec([None, 28, 28, 1], tf.float32)]
    )
