"""A trained model ready to answer: loaded once from models/cnn.keras or from MLflow."""

import hashlib
from pathlib import Path

import numpy as np

DEFAULT_MODEL = "models/cnn.keras"


class Predictor:
    def __init__(self, source=DEFAULT_MODEL):
        """`source`: a .keras file, or an MLflow model URI (runs:/<run id>/model, models:/<name>/<version>)."""
        import keras

        self.source = str(source)
        if "://" in self.source or self.source.startswith(("runs:/", "models:/")):
            import mlflow

            from pipeline import tracking

            mlflow.set_tracking_uri(tracking.tracking_uri())
            local = mlflow.artifacts.download_artifacts(self.source)
            path = next(Path(local).rglob("*.keras"))
            self.identity = self.source
        else:
            path = Path(self.source)
            if not path.exists():
                raise FileNotFoundError(f"{path}: no such model file (train one with `./dev repro`)")
            self.identity = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        self.model = keras.models.load_model(path, compile=False)

    def probabilities(self, images):
        """(n, 28, 28) float32 in MNIST form -> (n, 10) probabilities."""
        batch = np.asarray(images, dtype=np.float32).reshape(-1, 28, 28, 1)
        # Calling the model directly skips predict()'s per-call set-up: faster for small batches.
        return np.asarray(self.model(batch, training=False))
