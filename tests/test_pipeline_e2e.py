"""The real `dvc repro` of all eleven stages on a tiny configuration, in a copy of the repository
with its own MLflow store, then a `dvc exp run --temp` whose runs must land in the same store."""

import hashlib
import json
import re

import numpy as np
import pytest
import yaml

from pipeline.core.graph.convert import READER_ATOL
from tests.helpers import CHROMIUM, draw_digit_seven, offline_page, run

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def repo(tiny_project):
    return tiny_project


def exported_reader(repo):
    return json.loads((repo / "reports/export.json").read_text())["reader"]


def mlflow_runs(repo):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mnist-digits")
    return client, client.search_runs([experiment.experiment_id])


def test_repro_produces_every_output(repo):
    repo, env, log = repo
    assert "got MNIST from" in log and "checksums verified" in log
    assert "Detected uv project" not in log  # MLflow's INFO line at every logged model
    assert np.load(repo / "data/processed/x_train.npy").shape == (300, 28, 28, 1)
    assert np.load(repo / "data/processed/x_test.npy").shape == (200, 28, 28, 1)
    for kind in ("mlp", "cnn"):
        assert (repo / f"models/{kind}.keras").stat().st_size > 0
        assert len((repo / f"reports/train/{kind}_history.csv").read_text().splitlines()) == 2
        predictions = (repo / f"reports/eval/{kind}_predictions.csv").read_text().splitlines()
        assert predictions[0] == "actual,predicted,confidence,raw_confidence,not_sure" and len(predictions) == 201
        calibration = json.loads((repo / f"models/{kind}.calibration.json").read_text())
        assert calibration["model_sha256"] == hashlib.sha256((repo / f"models/{kind}.keras").read_bytes()).hexdigest()
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    for kind in ("mlp", "cnn"):
        test = metrics[kind]["test"]
        assert 0.0 <= test["accuracy"] <= 1.0 and test["errors"] == round((1 - test["accuracy"]) * 200)
        assert test["images_per_second"] > 0
        # The temperature minimises the validation NLL, and T = 1 (no change) was a candidate.
        val = json.loads((repo / "reports/calibration.json").read_text())[kind]["val"]
        assert val["after"]["nll"] <= val["before"]["nll"] and 0 <= val["coverage"] <= 1
        assert test["calibration"]["temperature"] == val["temperature"]
        assert {"ece_before", "ece_after", "nll_after"} <= set(test["calibration"])
        assert test["not_sure"]["threshold"] == val["not_sure_below"]
        # The coverage's range over calibrations on resamples, for every validation copy.
        assert set(val["coverage_spread"]) == set(val["sure"])
        assert all(0 <= s["low"] <= s["high"] <= 1 for s in val["coverage_spread"].values())
        assert 0 <= test["not_a_digit"]["digits_flagged"] <= 1 and 0 <= test["not_a_digit"]["letters_flagged"] <= 1
        assert (repo / f"models/{kind}.gate.pkl").exists()
        # The ONNX graph answered as Keras did on every validation image.
        exported = json.loads((repo / "reports/export.json").read_text())[kind]
        assert exported["images"] == 100 and exported["max_probability_difference"] <= 1e-5
        assert exported["same_digit"] == exported["same_not_a_digit"] == 1.0
        assert exported["file_bytes"] == (repo / f"models/{kind}.onnx").stat().st_size
    robustness = json.loads((repo / "reports/robustness.json").read_text())
    for kind in ("mlp", "cnn"):
        corrupted = robustness[kind]["corrupted"]
        assert set(corrupted) == {
            "mean_accuracy",
            *yaml.safe_load((repo / "params.yaml").read_text())["shifts"],
        } - {"seed"}
        assert corrupted["mean_accuracy"] == pytest.approx(
            np.mean([v for k, v in corrupted.items() if k != "mean_accuracy"])
        )
        sure = robustness[kind]["sure"]
        assert set(sure) == {"clean", *corrupted} - {"mean_accuracy"}
        assert sure["clean"] == pytest.approx(
            {k: v for k, v in metrics[kind]["test"]["not_sure"].items() if k in sure["clean"]}
        )
    figures = {p.name for p in (repo / "reports/figures").iterdir()}
    assert {
        "training_curves.png",
        "samples.png",
        "confusion_cnn.png",
        "predictions_mlp.png",
        "mistakes_cnn.png",
        "reliability.png",
        "risk_coverage.png",
        "robustness.png",
        "sure_under_shift.png",
        "reading_examples.png",
    } <= figures
    reading = json.loads((repo / "reports/reading.json").read_text())
    assert set(reading["by_kind"]) == {"clear", "tight", "touching", "overlapping"}
    assert set(reading["by_length"]) == {str(n) for n in range(1, 11)}
    assert reading["all"]["strings"] == 4 * 4 + 10 * 2 and 0 <= reading["all"]["string_accuracy"] <= 1
    assert reading["segment"]["all"]["strings"] == reading["all"]["strings"]  # both readers, the same numbers
    reader = json.loads((repo / "reports/train/reader.json").read_text())["reader"]
    assert 0 <= reader["val_exact"] <= 1 and reader["best_epoch"] == 1
    reader_calibration = json.loads((repo / "reports/reader_calibration.json").read_text())["reader"]
    assert 0 < reader_calibration["temperature"] and 0 <= reader_calibration["val_exact_numbers"] <= 1
    served = json.loads((repo / "models/reader.calibration.json").read_text())
    fitted = ("temperature", "second_look", "fitted_for", "sure_from", "soft_sure_from", "soft_from", "smooth_below")
    assert {key: served[key] for key in fitted} == {key: reader_calibration[key] for key in fitted}
    assert exported_reader(repo)["lines"] == 64 and exported_reader(repo)["max_probability_difference"] <= READER_ATOL
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == {
        "fetch",
        "preprocess",
        "train_mlp",
        "train_cnn",
        "train_reader",
        "calibrate_reader",
        "calibrate",
        "export",
        "evaluate",
        "robustness",
        "read_eval",
        "visualize",
    }


def test_mlflow_has_one_run_per_model_with_training_and_test_results(repo):
    repo, env, log = repo
    client, runs = mlflow_runs(repo)
    assert sorted(r.data.tags["model"] for r in runs) == ["cnn", "mlp", "reader"]
    reader = next(r for r in runs if r.data.tags["model"] == "reader")
    assert reader.info.status == "FINISHED" and {
        "val_exact",
        "loss",
        "calibration_temperature",
        "calibration_sure_from",
    } <= set(reader.data.metrics)
    assert client.get_registered_model("digits-reader").aliases == {"champion": 1}
    for r in runs:
        if r.data.tags["model"] == "reader":
            continue
        assert r.info.status == "FINISHED"
        assert {
            "val_accuracy",
            "loss",
            "test_accuracy",
            "test_f1_macro",
            "test_images_per_second",
            "test_recall_class_7",
            "val_ece_after",
            "test_calibration_ece_after",
            "test_not_sure_coverage",
            "test_not_a_digit_non_digits_flagged",
            "test_corrupted_mean_accuracy",
        } <= set(r.data.metrics)
        assert r.data.metrics["calibration_temperature"] > 0
        assert (
            r.data.metrics["calibration_smooth_below"]
            in yaml.safe_load((repo / "params.yaml").read_text())["calibrate"]["smooth_below"]
        )
        figures = {a.path for a in client.list_artifacts(r.info.run_id, "figures")}
        assert f"figures/confusion_{r.data.tags['model']}.png" in figures
        artifacts = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert {"evaluation", "figures", "model_summary.txt", "calibration.json", "gate", "onnx"} <= artifacts


def test_model_logged_by_calibrate_answers_calibrated_probabilities_with_mlflow_alone(repo):
    import keras
    import mlflow

    from pipeline.core.trust.confidence import with_temperature

    repo, _, _ = repo
    x_val = np.load(repo / "data/processed/x_val.npy")[:50]
    run_id = json.loads((repo / "models/cnn.run.json").read_text())["run_id"]
    temperature = json.loads((repo / "models/cnn.calibration.json").read_text())["temperature"]
    raw = np.asarray(keras.models.load_model(repo / "models/cnn.keras", compile=False)(x_val, training=False))
    # Set, not only in the environment: an earlier test in this process may have set another.
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    try:
        logged = mlflow.pyfunc.load_model(f"runs:/{run_id}/calibrated_model")
    finally:
        mlflow.set_tracking_uri(previous)
    np.testing.assert_allclose(np.asarray(logged.predict(x_val)), with_temperature(raw, temperature), atol=1e-5)


def test_second_repro_does_nothing_and_metrics_show(repo):
    repo, env, log = repo
    again = run(["dvc", "repro"], repo, env)
    assert "Data and pipelines are up to date" in again
    shown = run(["dvc", "metrics", "show", "--json"], repo, env)
    assert "cnn" in shown and "accuracy" in shown


def test_temp_experiment_logs_into_the_checkout_store(repo):
    repo, env, log = repo
    # Only the line reader's training reruns: a training stage's run from a temporary folder, which
    # must still land in the checkout's store.
    run(["dvc", "exp", "run", "--temp", "-S", "read.epochs=2", "-n", "two-epochs", "train_reader"], repo, env)
    _, runs = mlflow_runs(repo)
    from_experiment = [r for r in runs if r.data.tags.get("dvc.exp_name") == "two-epochs"]
    assert [(r.data.tags["model"], r.data.params["read.epochs"]) for r in from_experiment] == [("reader", "2")]
    assert not list((repo / ".dvc" / "tmp").rglob("mlflow.db"))
    shown = run(["dvc", "exp", "show", "--no-pager", "--csv"], repo, env)
    assert "two-epochs" in shown


def test_runs_log_their_datasets_and_register_the_champion(repo):
    repo, env, log = repo
    client, runs = mlflow_runs(repo)
    experiment = client.get_experiment_by_name("mnist-digits")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    for r in runs:
        contexts = {i.tags[0].value: i.dataset for i in r.inputs.dataset_inputs}
        expected = {"training", "validation"} | ({"test"} if r.data.tags["model"] != "reader" else set())
        assert set(contexts) == expected and all(d.digest for d in contexts.values())
    for kind in ("mlp", "cnn"):
        assert f"registered digits-{kind} v1; digits-{kind} v1 is the first champion" in log
        run_file = json.loads((repo / f"models/{kind}.run.json").read_text())
        version = client.get_model_version(f"digits-{kind}", str(run_file["model_version"]))
        assert version.run_id == run_file["run_id"]
        assert {"git_commit", "dvc_exp_name", "val_accuracy", "test_accuracy"} <= set(version.tags)
        assert version.tags["onnx"] == f"onnx/{kind}.onnx"
        # Later experiments in this module register more versions; the champion is never a worse one.
        champion = client.get_model_version_by_alias(f"digits-{kind}", "champion")
        assert float(champion.tags["val_accuracy"]) >= float(version.tags["val_accuracy"])


def test_pushed_outputs_pull_into_a_fresh_clone_that_needs_no_training(repo, tmp_path):
    repo, env, log = repo
    remote = tmp_path / "remote"
    run(["dvc", "remote", "add", "--default", "shared", str(remote)], repo, env)
    run(["dvc", "push"], repo, env)
    run(["git", "add", "-A"], repo, env)  # dvc.lock, reports and the remote, as after any run
    run(["git", "commit", "-qm", "run, shared remote"], repo, env)

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path, env)
    run(["dvc", "pull"], clone, env)
    assert "Data and pipelines are up to date" in run(["dvc", "status"], clone, env)
    assert "Data and pipelines are up to date" in run(["dvc", "repro"], clone, env)
    for out in ("models/cnn.keras", "models/mlp.keras", "data/processed/x_train.npy"):
        assert (clone / out).read_bytes() == (repo / out).read_bytes(), out

    # What `./dev repro` runs when a default remote is set: restore what was pushed, train nothing.
    other = tmp_path / "other-clone"
    run(["git", "clone", "-q", str(repo), str(other)], tmp_path, env)
    log = run(["dvc", "repro", "--pull"], other, env)
    assert (
        "Running stage" not in log
        and (other / "models/cnn.keras").read_bytes() == (repo / "models/cnn.keras").read_bytes()
    )

    image = clone / "seven.png"
    draw_digit_seven().save(image)
    answer = json.loads(run(["digits", "predict", str(image), "--format", "json"], clone, env))
    pushed = "sha256:" + hashlib.sha256((repo / "models/cnn.keras").read_bytes()).hexdigest()[:16]
    assert answer["model"] == pushed and 0 <= answer["predictions"][0]["digit"] <= 9


def test_a_model_served_from_the_registry_by_alias(repo, monkeypatch):
    from fastapi.testclient import TestClient
    from mlflow.tracking import MlflowClient

    from pipeline.serving.api import create_app
    from pipeline.serving.predictor import Predictor

    repo, env, log = repo
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{repo / 'mlflow.db'}")
    predictor = Predictor("models:/digits-cnn@champion")
    health = TestClient(create_app(predictor)).get("/health").json()
    assert health["registered_model"]["name"] == "digits-cnn" and health["registered_model"]["alias"] == "champion"
    assert "champion" in health["registered_model"]["aliases"] and health["registered_model"]["version"] >= 1
    # The champion's training run carries the calibrate stage's temperature and threshold.
    champion_run = MlflowClient().get_model_version_by_alias("digits-cnn", "champion").run_id
    assert health["calibration"]["temperature"] == pytest.approx(
        MlflowClient().get_run(champion_run).data.metrics["calibration_temperature"], rel=1e-3
    )

    image = repo / "seven.png"
    draw_digit_seven().save(image)
    env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}"}
    out = run(
        ["digits", "predict", str(image), "--model", "models:/digits-cnn@champion", "--format", "json"], repo, env
    )
    assert json.loads(out)["model"] == "models:/digits-cnn@champion"
    promoted = run(["digits", "promote", "digits-mlp", "1"], repo, env)
    assert re.search(r"digits-mlp@champion moved from v\d+ to v1 \(val accuracy 0\.\d+", promoted)
    client, _ = mlflow_runs(repo)
    assert str(client.get_model_version_by_alias("digits-mlp", "champion").version) == "1"


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium)")
def test_dvc_plots_render_without_internet(repo, tmp_path):
    """.dvc/config's html_template carries Vega itself (scripts/offline-plots), so the curves and
    confusion matrices draw with every request outside the page's own folder refused."""
    from playwright.sync_api import sync_playwright

    repo, env, _ = repo
    run(["dvc", "plots", "show", "-o", str(tmp_path / "plots")], repo, env)
    with sync_playwright() as p:
        browser, page, refused = offline_page(p, [(tmp_path / "plots").as_uri()])
        page.goto((tmp_path / "plots" / "index.html").as_uri())
        page.wait_for_function(
            "document.querySelectorAll('.vega-embed canvas, .vega-embed svg').length >= 4", timeout=30000
        )
        drawn = page.locator(".vega-embed canvas, .vega-embed svg").count()
        images = page.eval_on_selector_all("img", "all => all.filter(i => i.complete && i.naturalWidth > 0).length")
        page.screenshot(path=tmp_path / "plots.png", full_page=True)
        browser.close()
    assert drawn >= 4 and images >= 3
    assert refused == []


@pytest.mark.parametrize("runtime", ["onnx", "tf"])
def test_serving_graph_answers_as_the_keras_model(repo, runtime):
    """The graph that serves (API, CLI), exported or traced, gives the Keras model's probabilities
    with the calibrate stage's temperature, on real test images."""
    import keras

    from pipeline.core.trust.confidence import with_temperature
    from pipeline.serving.predictor import Predictor

    repo, _, _ = repo
    x_test = np.load(repo / "data/processed/x_test.npy")
    own = np.asarray(keras.models.load_model(repo / "models/cnn.keras", compile=False)(x_test, training=False))
    predictor = Predictor(repo / "models/cnn.keras", runtime)
    assert predictor.temperature == json.loads((repo / "models/cnn.calibration.json").read_text())["temperature"]
    expected = with_temperature(own, predictor.temperature)
    np.testing.assert_allclose(predictor.probabilities(x_test[..., 0]), expected, atol=1e-5)
    one_at_a_time = np.concatenate([predictor.probabilities(x_test[i : i + 1, ..., 0]) for i in range(20)])
    np.testing.assert_allclose(one_at_a_time, expected[:20], atol=1e-5)
