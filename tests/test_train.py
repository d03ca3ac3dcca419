import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline import train
from pipeline.core import layout, models, params, tracking, training
from pipeline.serving.predictor import Predictor
from tests.helpers import ROOT, tiny_images


def mlflow_client():
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])


def only_run(experiment="mnist-digits"):
    client = mlflow_client()
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1
    return runs[0]


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_builders_give_ten_probabilities(project, kind):
    model = models.build(params.load().model(kind))
    assert model.input_shape == (None, 28, 28, 1) and model.output_shape == (None, 10)
    probabilities = model.predict(np.zeros((3, 28, 28, 1), np.float32), verbose=0)
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


def test_schedule_warms_up_then_decays_to_zero_over_any_epoch_count(project):
    p = params.load().cnn
    for epochs in (3, 20):
        schedule = training.learning_rate_schedule(p, epochs, epoch_steps=10)
        assert float(schedule(0)) == 0.0
        assert float(schedule(10)) == pytest.approx(p.learning_rate)
        assert float(schedule(epochs * 10)) == pytest.approx(0.0, abs=1e-9)


def test_training_batches_each_get_their_own_augmentation_and_repeat_the_same_way(project):
    """One image, copied: every batch is then the same images in another order, so two equal
    batches would mean repeated random draws. Parallel map calls racing for the seed generators
    made a second run give other batches."""
    images, _ = tiny_images(1)
    one_image = np.repeat(images[..., None].astype(np.float32) / 255, 96, axis=0)
    labels = np.repeat(np.eye(10, dtype=np.float32)[:1], 96, axis=0)
    cnn = dataclasses.replace(params.load().cnn, batch_size=16)
    steps = training.steps_per_epoch(len(one_image), cnn)

    def two_epochs():
        dataset = training.training_dataset(one_image, labels, cnn, 5, params.load().shifts.strengths)
        return [np.sort(x.numpy().reshape(len(x), -1), axis=0) for x, _ in dataset.take(2 * steps)]

    batches = two_epochs()
    assert len(batches) == 12
    assert all(not np.allclose(a, b) for i, a in enumerate(batches) for b in batches[i + 1 :])
    assert all(np.array_equal(a, b) for a, b in zip(batches, two_epochs(), strict=True))


def upright_bars(count):
    bar = np.zeros((28, 28), np.float32)
    bar[8:20, 12:16] = 1.0  # upright, well inside the frame at any draw
    return np.repeat(bar[None, :, :, None], count, axis=0)


def moments(batch):
    """Per image: ink, centre (y, x) and tilt in degrees from upright, by its second moments."""
    a = np.asarray(batch)[..., 0]
    rows, cols = np.mgrid[:28, :28]
    ink = a.sum(axis=(1, 2))
    y, x = (a * rows).sum(axis=(1, 2)) / ink, (a * cols).sum(axis=(1, 2)) / ink
    dy, dx = rows - y[:, None, None], cols - x[:, None, None]
    mu20, mu02, mu11 = (a * dx**2).sum(axis=(1, 2)), (a * dy**2).sum(axis=(1, 2)), (a * dx * dy).sum(axis=(1, 2))
    tilt = np.degrees(0.5 * np.arctan2(2 * mu11, mu02 - mu20))  # 0 for an upright bar
    return ink, y, x, tilt


def test_affine_augmentation_keeps_each_image_within_its_ranges_in_one_resampling():
    import keras

    from pipeline.core.shifts.augmentation import RandomAffine

    images = upright_bars(400)
    ink0, y0, x0, _ = moments(images)
    assert np.array_equal(RandomAffine(10, 0.1, 0.1, seed=1)(images, training=False), images)
    assert np.array_equal(RandomAffine(0, 0, 0, seed=1)(images, training=True), images)

    _, y, x, _ = moments(RandomAffine(0, 0.1, 0, seed=1)(images, training=True))
    shift = np.stack([y - y0, x - x0])
    assert np.abs(shift).max() <= 2.8 + 0.05 and (shift.std(axis=1) > 1.3).all()  # uniform: sd 1.62

    ink, y, x, tilt = moments(RandomAffine(10, 0, 0, seed=1)(images, training=True))
    assert np.abs(tilt).max() <= 10.5 and np.abs(tilt).max() > 9 and tilt.std() > 4  # uniform: sd 5.8
    assert np.allclose(ink, ink0, rtol=0.02) and np.allclose(y, y0, atol=0.05) and np.allclose(x, x0, atol=0.05)

    ink, _, _, tilt = moments(RandomAffine(0, 0, 0.1, seed=1)(images, training=True))
    scale = np.sqrt(ink0 / ink)  # ink scales with the area
    assert scale.min() > 0.9 - 0.02 and scale.max() < 1.1 + 0.02 and scale.std() > 0.04 and np.abs(tilt).max() < 0.5

    def sharpness(batch):
        a = np.asarray(batch)[..., 0]
        laplacian = 4 * a[:, 1:-1, 1:-1] - a[:, :-2, 1:-1] - a[:, 2:, 1:-1] - a[:, 1:-1, :-2] - a[:, 1:-1, 2:]
        return (laplacian**2).sum(axis=(1, 2)).mean()

    three_passes = keras.Sequential(
        [
            keras.layers.RandomRotation(10 / 360, fill_mode="constant", seed=1),
            keras.layers.RandomTranslation(0.1, 0.1, fill_mode="constant", seed=2),
            keras.layers.RandomZoom(0.1, fill_mode="constant", seed=3),
        ]
    )
    one_pass = RandomAffine(10, 0.1, 0.1, seed=1)
    assert sharpness(one_pass(images, training=True)) > 1.5 * sharpness(three_passes(images, training=True))


def test_training_stage_writes_outputs_and_tracks_the_run(processed_data):
    import mlflow

    train.train("cnn", params.load())

    assert layout.model_file("cnn").stat().st_size > 0
    with open("reports/train/cnn_history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert set(training.HISTORY_COLUMNS) == set(rows[0])
    summary = json.loads((layout.TRAIN_REPORTS_DIR / "cnn.json").read_text())["cnn"]
    assert summary["epochs"] == 2 and 0.0 <= summary["best_val_accuracy"] <= 1.0

    run = only_run()
    assert run.info.status == "FINISHED"
    assert json.loads(layout.run_file("cnn").read_text())["run_id"] == run.info.run_id
    assert run.data.params["cnn.filters"] == "[8, 16]" and run.data.params["epochs"] == "2"
    augment = params.load().cnn.augment
    assert run.data.params["cnn.augment.rotation_degrees"] == str(augment.rotation_degrees)
    assert run.data.params["cnn.augment.shift_share"] == str(augment.shift_share)
    assert "cnn.dense_units" in run.data.params
    assert int(run.data.params["param_count"]) > 0 and run.data.params["train_size"] == "200"
    assert run.data.tags["model"] == "cnn" and run.data.tags["stage"] == "train_cnn"
    history = mlflow_client().get_metric_history(run.info.run_id, "val_accuracy")
    assert sorted(m.step for m in history) == [1, 2]
    assert {"learning_rate", "seconds", "loss"} <= set(run.data.metrics)
    artifacts = {a.path for a in mlflow_client().list_artifacts(run.info.run_id)}
    assert {"cnn_history.csv", "model_summary.txt"} <= artifacts

    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    predictions = np.asarray(model.predict(np.zeros((4, 28, 28, 1), np.float32)))
    assert predictions.shape == (4, 10) and np.allclose(predictions.sum(axis=1), 1.0, atol=1e-5)

    # The CLI and API can serve the same model straight from the MLflow run (on TensorFlow: the
    # export stage has not run, so there is no ONNX graph yet).
    served = Predictor(f"runs:/{run.info.run_id}/model", "tf")
    assert served.identity == f"runs:/{run.info.run_id}/model"
    assert np.allclose(served.probabilities(np.zeros((4, 28, 28))), predictions, atol=1e-5)


def test_same_params_give_same_metrics(processed_data):
    p = params.load()
    first = train.train("mlp", p)
    second = train.train("mlp", p)
    for key in ("val_accuracy", "val_loss", "best_val_loss"):
        assert first[key] == second[key], key


def long_training_in_a_subprocess(until_line):
    """`python -m pipeline.train mlp` for 500 epochs in this project, once it has printed `until_line`."""
    params_path = Path.cwd() / "params.yaml"
    params_path.write_text(params_path.read_text().replace("epochs: 2", "epochs: 500"))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline.train", "mlp"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    deadline = time.time() + 120
    for line in process.stdout:
        if line.startswith(until_line) or time.time() > deadline:
            break
    return process


def test_interrupted_training_ends_killed(processed_data):
    process = long_training_in_a_subprocess("Epoch 3/")
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)
    assert process.returncode != 0
    assert only_run().info.status == "KILLED"


def test_next_training_ends_the_run_of_a_process_killed_without_a_word(processed_data, capsys):
    process = long_training_in_a_subprocess("Epoch 2/")
    process.kill()  # SIGKILL: no handler runs, the run stays RUNNING
    process.wait(timeout=60)
    orphan = only_run()
    assert orphan.info.status == "RUNNING" and orphan.data.tags["pid"] == str(process.pid)

    params_path = Path.cwd() / "params.yaml"
    params_path.write_text(params_path.read_text().replace("epochs: 500", "epochs: 1"))
    train.main(["mlp"])
    assert f"was left RUNNING by process {process.pid}, which is gone; ended it FAILED" in capsys.readouterr().out
    client = mlflow_client()
    assert client.get_run(orphan.info.run_id).info.status == "FAILED"
    runs = client.search_runs([orphan.info.experiment_id])
    assert sorted(r.info.status for r in runs) == ["FAILED", "FINISHED"]


def test_a_live_run_is_not_taken_for_an_orphan(project):
    experiment = tracking.use_experiment("mnist-digits")
    with tracking.run(run_name="alive") as active:
        assert tracking.end_orphaned_runs(experiment.experiment_id) == []
        assert mlflow_client().get_run(active.info.run_id).info.status == "RUNNING"


def test_crash_ends_failed(project):
    tracking.use_experiment("mnist-digits")
    with pytest.raises(ZeroDivisionError):
        with tracking.run(run_name="boom"):
            raise ZeroDivisionError("boom")
    assert only_run().info.status == "FAILED"


def test_missing_data_gives_a_clear_error(project):
    with pytest.raises(SystemExit, match=r"data/processed/ lacks x_train.npy.*run `dvc repro`"):
        train.main(["mlp"])


def test_wrong_shapes_give_a_clear_error(processed_data):
    np.save("data/processed/x_val.npy", np.zeros((5, 784), np.float32))
    with pytest.raises(SystemExit, match=r"x_val.npy.*expected \(N, 28, 28, 1\)"):
        train.main(["mlp"])


def test_runs_from_dvc_temp_copies_land_in_the_checkout(tmp_path, monkeypatch):
    copy = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpab12cd"
    assert tracking.project_root(copy) == tmp_path / "repo"
    assert tracking.project_root(tmp_path / "repo") == tmp_path / "repo"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking.tracking_uri(tracking.project_root(copy)) == f"sqlite:///{tmp_path / 'repo' / 'mlflow.db'}"
