"""Team mode against real servers: scripts/team-server starts PostgreSQL and an MLflow tracking
server with basic-auth, and two queued experiments of the tiny pipeline's training stages (`-j 2`)
log into it."""

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.helpers import CHROMIUM, CHROMIUM_ARGS, HAS_POSTGRES, run, team_server, tiny_repo

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server():
    if not HAS_POSTGRES:
        pytest.skip("no PostgreSQL server binaries (Debian: apt-get install postgresql; .ci/run installs it)")
    with team_server() as url_and_password:
        yield url_and_password


@contextlib.contextmanager
def signed_in_as(username, password):
    """MLflow's clients in this process read the credentials from the standard variables."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_USERNAME", username)
        env.setenv("MLFLOW_TRACKING_PASSWORD", password)
        yield


@pytest.fixture(scope="module")
def teammate(server):
    """A user added the way the README says, signed in through the standard variables."""
    from mlflow.server import get_app_client

    url, admin_password = server
    with signed_in_as("admin", admin_password):
        get_app_client("basic-auth", tracking_uri=url).create_user(username="alice", password="alice-secret-42")
    return {
        "MLFLOW_TRACKING_URI": url,
        "MLFLOW_TRACKING_USERNAME": "alice",
        "MLFLOW_TRACKING_PASSWORD": "alice-secret-42",
    }


@pytest.fixture
def as_teammate(teammate, monkeypatch):
    """This process talks to the server as alice. The URI is also set process-wide: an earlier test
    may have called mlflow.set_tracking_uri, which outranks MLFLOW_TRACKING_URI."""
    import mlflow

    previous = mlflow.get_tracking_uri()
    for key, value in teammate.items():
        monkeypatch.setenv(key, value)
    mlflow.set_tracking_uri(teammate["MLFLOW_TRACKING_URI"])
    yield teammate
    mlflow.set_tracking_uri(previous)


def run_all_in_parallel(repo, env, names, log_path, timeout=900):
    """`dvc exp run --run-all -j 2`, waited for through `dvc queue status`. Once in CI the command
    stayed up after both experiments had succeeded (a queue worker left behind), so it is stopped
    once the queue says all is done, instead of hanging the suite."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            ["dvc", "exp", "run", "--run-all", "-j", "2"],
            cwd=repo,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.time() + timeout
    while True:
        status = run(["dvc", "queue", "status"], repo, env)
        done = {
            line.split()[1]
            for line in status.splitlines()[1:]
            if len(line.split()) > 1 and line.split()[-1] in ("Success", "Failed")
        }
        if set(names) <= done or time.time() > deadline:
            break
        time.sleep(5)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        print("dvc exp run --run-all stayed up after its experiments ended; stopping it")
        subprocess.run(["dvc", "queue", "stop", "--kill"], cwd=repo, env=env, capture_output=True, timeout=60)
        os.killpg(process.pid, signal.SIGKILL)
    assert set(names) <= done, f"experiments not done in {timeout} s:\n{status}\n{log_path.read_text()[-3000:]}"
    assert "Failed" not in status, status
    return log_path.read_text() + status


def test_nobody_gets_in_without_credentials(server, teammate):
    url, _ = server
    search = f"{url}/api/2.0/mlflow/experiments/search?max_results=5"
    with httpx.Client(timeout=60) as client:  # generous: a loaded 2-core machine is slow, not wrong
        assert client.get(search).status_code == 401
        assert client.get(search, auth=("alice", "wrong password")).status_code == 401
        assert client.get(search, auth=("alice", "alice-secret-42")).status_code == 200


def crown_behind(barrier, version, verdicts, errors):
    """One training stage's crowning, started with the other's behind `barrier`."""
    from pipeline.core import registry

    barrier.wait()
    try:
        verdicts[version.version] = registry.crown_if_better(version)
    except Exception as error:  # any error: the assertion below shows it
        errors.append(error)


def test_stages_crowning_at_once_leave_the_better_version_champion(as_teammate):
    """Two training stages of parallel experiments judge and move `champion` at the same moment."""
    import threading

    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    assert client.tracking_uri == as_teammate["MLFLOW_TRACKING_URI"]
    source_run = client.create_run(client.create_experiment("crowning-race"))
    client.set_terminated(source_run.info.run_id)
    for trial in range(3):
        name = f"race-{trial}"
        client.create_registered_model(name)
        versions = [
            client.create_model_version(
                name,
                f"{source_run.info.artifact_uri}/model-{trial}-{i}",
                run_id=source_run.info.run_id,
                tags={"val_accuracy": str(accuracy), "val_digest": "same-images"},
            )
            for i, accuracy in enumerate((0.91, 0.93))
        ]
        start, verdicts, errors = threading.Barrier(2), {}, []
        threads = [threading.Thread(target=crown_behind, args=(start, v, verdicts, errors)) for v in versions]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not errors and len(verdicts) == 2
        assert client.get_model_version_by_alias(name, "champion").version == versions[1].version, verdicts


def test_pipeline_and_two_parallel_experiments_log_into_the_server(as_teammate, tmp_path):
    import mlflow
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    repo = tmp_path / "repo"
    env = tiny_repo(repo, **as_teammate)
    # Each experiment runs the CNN's training stage (params, per-epoch metrics, datasets, artifacts,
    # the registry; the MLP's is the same code): what later stages add to a run, the end-to-end tests check.
    logs = [
        run(["dvc", "exp", "run", "--queue", "-S", change, "-n", name, "train_cnn"], repo, env)
        for name, change in [("two-epochs", "epochs=2"), ("seed-7", "seed=7")]
    ]
    started = time.perf_counter()
    logs.append(run_all_in_parallel(repo, env, ["two-epochs", "seed-7"], tmp_path / "run-all.log"))
    print(f"dvc exp run --run-all -j 2 against the server: {time.perf_counter() - started:.0f} s")
    logs += [run(["dvc", "queue", "logs", name], repo, env) for name in ("two-epochs", "seed-7")]
    assert not any("database is locked" in log for log in logs)

    client = MlflowClient()
    experiment = client.get_experiment_by_name("mnist-digits")
    runs = client.search_runs([experiment.experiment_id], run_view_type=ViewType.ALL)
    runs = [r for r in runs if r.data.tags["model"] != "reader"]  # the line reader's runs: its own params
    # Both experiments, each with its own params.
    assert sorted((r.data.tags["model"], r.data.params["seed"], r.data.params["epochs"]) for r in runs) == [
        ("cnn", "42", "2"),
        ("cnn", "7", "1"),
    ], "\n".join(
        f"{r.info.run_name} {r.info.run_id} {r.info.status} {r.info.lifecycle_stage} {r.data.params}" for r in runs
    )
    for r in runs:
        assert r.info.status == "FINISHED", r.info.run_name
        assert {"val_accuracy", "val_loss"} <= set(r.data.metrics)
        assert r.info.artifact_uri.startswith("mlflow-artifacts:")  # served by the tracking server
        kind = r.data.tags["model"]
        history = mlflow.artifacts.download_artifacts(
            run_id=r.info.run_id, artifact_path=f"{kind}_history.csv", dst_path=str(tmp_path / r.info.run_id)
        )
        assert len(Path(history).read_text().splitlines()) == 1 + int(r.data.params["epochs"])
    # Both experiments registered a first version at about the same time; one of them is champion.
    assert len(client.search_model_versions("name='digits-cnn'")) == 2
    assert client.get_model_version_by_alias("digits-cnn", "champion")
    model = mlflow.pyfunc.load_model("models:/digits-cnn@champion")
    assert model.predict(np.zeros((2, 28, 28, 1), "float32")).shape == (2, 10)


@pytest.mark.browser
@pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium); .ci/run installs it"
)
def test_the_ui_lists_the_runs_with_their_datasets(server, teammate):
    """What a teammate sees: the run list of mnist-digits in MLflow's model-training view."""
    from mlflow.tracking import MlflowClient
    from playwright.sync_api import sync_playwright

    url, _ = server
    with signed_in_as(teammate["MLFLOW_TRACKING_USERNAME"], teammate["MLFLOW_TRACKING_PASSWORD"]):
        experiment = MlflowClient(url).get_experiment_by_name("mnist-digits")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(
            http_credentials={"username": "alice", "password": "alice-secret-42"},
            viewport={"width": 1500, "height": 900},
        )
        # MLflow 3's UI opens on its GenAI pages unless told the workflow; the README's link says it too.
        page.goto(f"{url}/#/experiments/{experiment.experiment_id}?workflowType=machine_learning", timeout=120_000)
        page.get_by_text("cnn-seed-7").first.wait_for(timeout=120_000)
        assert page.get_by_text("cnn-two-epochs").first.is_visible()
        assert page.get_by_text("mnist-train").first.is_visible()  # the Dataset column
        browser.close()
