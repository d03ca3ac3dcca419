"""MLflow: one store per checkout, run naming and tags, and runs that never stay RUNNING.

Where the store is: MLFLOW_TRACKING_URI when set (e.g. a tracking server), otherwise an SQLite
file `mlflow.db` plus an artifact folder `mlartifacts/` at the project root. DVC runs
`dvc exp run --temp` and queued experiments in throwaway copies under .dvc/tmp/exps/; their runs
still go to the store of the checkout the user works in.

How stages share a run: a training stage writes models/<model>.run.json with its run id and its
registered model version; evaluate and visualize read it (it is a declared dependency) and add
their metrics and figures to that run.

The Model Registry and its champion are in registry.py.
"""

import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
from contextlib import contextmanager
from pathlib import Path

from pipeline.core import registry
from pipeline.core.layout import run_file

# The MLflow 3 UI opens an experiment without this tag on its GenAI pages (traces, evaluations).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def project_root(cwd=None):
    """The user's checkout, also when DVC runs the stage in a copy under .dvc/tmp/exps/."""
    path = Path(cwd or os.getcwd()).resolve()
    parts = path.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return path


def tracking_uri(root=None):
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(root or project_root()) / 'mlflow.db'}"


@contextmanager
def _store_lock(root):
    """Serialise store set-up (schema creation, experiment creation) between concurrent stages."""
    with open(root / ".mlflow.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def use_experiment(name):
    """Point MLflow at the project's store and experiment, creating either if needed."""
    import mlflow

    root = project_root()
    mlflow.set_tracking_uri(tracking_uri(root))
    with _store_lock(root):
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is None:
            local_artifacts = None if os.environ.get("MLFLOW_TRACKING_URI") else (root / "mlartifacts").as_uri()
            mlflow.create_experiment(name, artifact_location=local_artifacts, tags=EXPERIMENT_KIND)
        experiment = mlflow.set_experiment(name)
        if not EXPERIMENT_KIND.items() <= experiment.tags.items():
            mlflow.set_experiment_tags(EXPERIMENT_KIND)
        return experiment


def git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def run_tags(model, stage):
    commit = git_commit()
    exp_name = os.environ.get("DVC_EXP_NAME")
    tags = {"model": model, "stage": stage, "dvc.exp_name": exp_name or "workspace"}
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


# The splits a training sees, by the name and context their MLflow dataset inputs carry: the
# training stages and the sweep's trials log the same, so a run's inputs compare across both.
TRAINING_DATASETS = [("train", "mnist-train", "training"), ("val", "mnist-validation", "validation")]


def training_datasets(data):
    """[(MLflow dataset with its digest, context)] of the training and validation splits."""
    import mlflow

    return [
        (mlflow.data.from_numpy(data[f"x_{split}"], targets=data[f"y_{split}"], name=name), context)
        for split, name, context in TRAINING_DATASETS
    ]


def run_name(model):
    """e.g. `cnn-lofty-bowl` for a DVC experiment, `cnn-3f2a1bc` for a plain `dvc repro`."""
    exp_name = os.environ.get("DVC_EXP_NAME")
    commit = git_commit()
    return f"{model}-{exp_name or (commit[:7] if commit else 'workspace')}"


_pending_signal = None


def _note_signal(signum, frame):
    # Raising right here could land inside TensorFlow's C++ (seen: a heap-corruption abort when
    # SIGTERM hit while a dataset iterator was being built), so note it for the next safe point.
    global _pending_signal
    _pending_signal = signum


def raise_if_signalled():
    """At a safe point (e.g. between training steps): stop as Ctrl-C does if a signal arrived."""
    if _pending_signal is not None:
        raise KeyboardInterrupt(f"signal {_pending_signal}")


@contextmanager
def run(**start_run_kwargs):
    """mlflow.start_run that ends KILLED on Ctrl-C or SIGTERM and FAILED on an error. Either signal
    takes effect at the next raise_if_signalled() or at the end of the block, whichever is first."""
    import mlflow

    global _pending_signal
    _pending_signal = None
    previous = {sig: signal.signal(sig, _note_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    active = mlflow.start_run(**start_run_kwargs)
    # Which process holds the run open, so a later stage can tell a dead one's orphan from a live run.
    mlflow.set_tags({"host": socket.gethostname(), "pid": str(os.getpid())})
    try:
        yield active
        raise_if_signalled()
    except KeyboardInterrupt:
        mlflow.end_run("KILLED")
        raise
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    else:
        mlflow.end_run("FINISHED")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def training_run(model, stage, experiment_name):
    """A training stage's new MLflow run, named for the model and the experiment or commit, tagged,
    after ending the runs that killed processes left open. Gives (the run, its tags)."""
    experiment = use_experiment(experiment_name)
    end_orphaned_runs(experiment.experiment_id)
    tags = run_tags(model, stage)
    with run(run_name=run_name(model), tags=tags) as active:
        yield active, tags


def register_trained(model, logged, run, tags, val_accuracy, val_digest):
    """A training run's logged model registered as a new version of digits-<model> with the tags the
    champion rule reads, the run file written for later stages, and the champion moved if it is
    better on the same validation data. Returns (the version, what happened to the champion)."""
    version = registry.register(
        model,
        logged.model_uri,
        {
            "git_commit": git_commit() or "none",
            "dvc_exp_name": tags["dvc.exp_name"],
            "run_id": run.info.run_id,
            "val_accuracy": val_accuracy,
            "val_digest": val_digest,
        },
    )
    write_run_file(model, run.info, version.version)
    return version, registry.crown_if_better(version)


def log_keras_model(model, example, name="model"):
    """Log `model` in MLflow's Keras flavor with a signature and an input example."""
    import keras
    import mlflow
    import mlflow.keras.save
    import tensorflow as tf
    from mlflow.models import infer_signature

    save_example = mlflow.keras.save._save_example

    def save_example_into_new_folder(mlflow_model, input_example, path):
        # MLflow's Keras flavor (3.17, 3.18) writes the input example before it creates the
        # model folder, so any input example fails with FileNotFoundError. No public option
        # avoids it while keeping the example in the logged model, so the one private step is
        # wrapped for the duration of this call (and restored below).
        os.makedirs(path, exist_ok=True)
        return save_example(mlflow_model, input_example, path)

    # MLflow checks the input example by predicting it; keep Keras' progress bar out of the log.
    keras.config.disable_interactive_logging()
    # And it announces (INFO, with a timestamp) that it found our uv.lock at every model it logs:
    # news to no one, since the requirements are named below. Its warnings still show.
    logging.getLogger("mlflow.utils.uv_utils").setLevel(logging.WARNING)
    try:
        mlflow.keras.save._save_example = save_example_into_new_folder
        return mlflow.keras.log_model(
            model,
            name=name,
            input_example=example,
            signature=infer_signature(example, model.predict(example, verbose=0)),
            # Named, not inferred: inference reloads the model in a subprocess, costing seconds.
            pip_requirements=[f"tensorflow=={tf.__version__}", f"keras=={keras.__version__}"],
        )
    finally:
        mlflow.keras.save._save_example = save_example
        keras.config.enable_interactive_logging()


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def end_orphaned_runs(experiment_id):
    """End FAILED the runs left RUNNING by processes of this host that died without a word
    (SIGKILL, the OOM killer, a power cut). Runs of live processes and other hosts are left alone.
    Returns the ended run ids."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    host = socket.gethostname()
    ended = []
    for r in client.search_runs(
        [experiment_id], filter_string=f"attributes.status = 'RUNNING' and tags.host = '{host}'"
    ):
        pid = r.data.tags.get("pid", "")
        if pid.isdigit() and not _process_alive(int(pid)):
            client.set_tag(r.info.run_id, "ended_by", f"orphan check: process {pid} on {host} no longer runs")
            client.set_terminated(r.info.run_id, "FAILED")
            print(
                f"mlflow: run {r.info.run_name} ({r.info.run_id}) was left RUNNING by process {pid}, "
                f"which is gone; ended it FAILED",
                flush=True,
            )
            ended.append(r.info.run_id)
    return ended


def write_run_file(model, run_info, model_version=None):
    from pipeline.core.files import write_json

    write_json(
        run_file(model),
        {
            "run_id": run_info.run_id,
            "experiment_id": run_info.experiment_id,
            "registered_model": registry.registered_name(model),
            "model_version": model_version,
        },
    )


def read_run_file(model):
    from pipeline.core.files import require

    path = run_file(model)
    require(path)
    return json.loads(path.read_text())


def tag_model_version(run_file, tags):
    """Set {key: value} tags on the registered version a run file names (none: nothing to tag)."""
    if not run_file.get("model_version"):
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(run_file["registered_model"], run_file["model_version"], key, str(value))


def read_run_id(model):
    return read_run_file(model)["run_id"]
