import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def tiny_images(n, seed=0):
    """Random uint8 'digits' with labels 0-9 in equal shares: enough to exercise the stages' code.
    Never MNIST and never written where the pipeline would take it for MNIST."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), np.arange(n, dtype=np.uint8) % 10


def idx_bytes(array):
    """An array in the IDX format MNIST is published in."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A scratch project folder holding the real params.yaml, as the working directory, with its own
    MLflow store. Returns a function that rewrites params (dotted keys)."""
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)

    def set_params(**changes):
        tree = yaml.safe_load((tmp_path / "params.yaml").read_text())
        for dotted, value in changes.items():
            node = tree
            *parents, leaf = dotted.split("__")
            for key in parents:
                node = node[key]
            node[leaf] = value
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(tree))

    set_params.path = tmp_path
    return set_params


@pytest.fixture
def processed_data(project):
    """data/processed with a few hundred random images, as preprocess would lay them out."""
    from pipeline import preprocess
    from pipeline.files import save_arrays

    arrays = {}
    for split, n in [("train", 200), ("val", 50), ("test", 60)]:
        x, y = tiny_images(n, seed=len(split))
        arrays[f"x_{split}"], arrays[f"y_{split}"] = preprocess.scale(x), preprocess.one_hot(y)
    save_arrays("data/processed", arrays)
    project(epochs=2, mlp__hidden_units=[32], cnn__filters=[8, 16], cnn__dense_units=16,
            mlp__batch_size=64, cnn__batch_size=64)
    return arrays


@pytest.fixture(scope="session")
def model_file(tmp_path_factory):
    """An untrained CNN of the default architecture, saved as the pipeline saves one: the serving
    code's behaviour does not depend on how well the model was trained."""
    import keras

    from pipeline import models, params

    keras.utils.set_random_seed(0)
    path = tmp_path_factory.mktemp("model") / "cnn.keras"
    models.build(params.load(ROOT / "params.yaml").cnn).save(path)
    return path


def draw_digit_seven(width=400, height=300, ink=(20, 20, 20), paper=(250, 248, 240), offset=(40, 30), mode="RGB"):
    """A '7' drawn with thick strokes, off-centre on a large canvas (dark ink on light paper)."""
    from PIL import Image, ImageDraw

    image = Image.new(mode, (width, height), paper)
    draw = ImageDraw.Draw(image)
    x, y = offset
    draw.line([(x, y), (x + 80, y)], fill=ink, width=14)
    draw.line([(x + 80, y), (x + 30, y + 140)], fill=ink, width=14)
    return image
