import hashlib
import json
import shutil

import pytest
import yaml

from tests.helpers import ROOT, tiny_images

CALIBRATION_TEMPERATURE = 0.5


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
    project(
        epochs=2,
        mlp__hidden_units=[32],
        cnn__filters=[8, 16],
        cnn__convs_per_block=[1, 1],
        cnn__dense_units=16,
        mlp__batch_size=64,
        cnn__batch_size=64,
    )
    return arrays


@pytest.fixture(scope="session")
def model_file(tmp_path_factory):
    """An untrained CNN of the default architecture, saved as the pipeline saves one, with a
    calibration beside it as the calibrate stage writes one: the serving code's behaviour does not
    depend on how well the model was trained. Its answers (~10 % each) are all "not sure"."""
    import keras

    from pipeline import models, params

    keras.utils.set_random_seed(0)
    path = tmp_path_factory.mktemp("model") / "cnn.keras"
    models.build(params.load(ROOT / "params.yaml").cnn).save(path)
    calibration = {
        "temperature": CALIBRATION_TEMPERATURE,
        "not_sure_below": 0.9,
        "accepted_accuracy": 0.999,
        "model_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }
    path.with_name("cnn.calibration.json").write_text(json.dumps(calibration))
    return path
