"""Ray, local or a cluster: `ray.init()` starts one in this process unless an address is given
(`--address` or RAY_ADDRESS), and a cluster's runs go to a tracking server, never a local file."""

import os
from urllib.parse import urlparse

from pipeline.core import tracking

# Every node runs its checkout's .venv. Under `uv run` (as `./dev run` does), Ray would otherwise
# start each worker through `uv run` and upload the working folder, data and models included, as
# the job's working_dir: the workers did not come up within Ray's timeout here. Read at `import ray`.
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


class ClusterError(RuntimeError):
    pass


def address(flag=None):
    """The cluster to join: the flag, else RAY_ADDRESS; None starts a local Ray in this process."""
    return flag or os.environ.get("RAY_ADDRESS") or None


def check_tracking_for(cluster_address):
    """On a cluster, trials run on other machines: a SQLite file or a folder on this one is not a
    store they can share. Refused before anything starts."""
    uri = tracking.tracking_uri()
    if cluster_address and urlparse(uri).scheme not in ("http", "https", "databricks"):
        raise ClusterError(
            f"the Ray cluster at {cluster_address} needs a tracking server, not the local store {uri}: "
            "start one with `./dev team-server` and set MLFLOW_TRACKING_URI=http://HOST:5000 "
            "(with MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD)"
        )
    return uri


def connect(cluster_address=None, cpus=None):
    """Join the cluster, or start a local Ray with `cpus` CPUs (default: all) and no dashboard."""
    import ray

    if cluster_address:
        return ray.init(address=cluster_address, log_to_driver=False)
    # RAY_ADDRESS would make a bare ray.init() join that cluster: address() has already said no.
    return ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)


def assigned_cpus():
    """The CPUs Ray gave this task or actor (at least one)."""
    import ray

    return max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))


def limit_tensorflow_threads():
    """Ray does not enforce CPU limits: TensorFlow in a task would use every core of its node. Its
    thread pools follow the CPUs Ray gave the task instead. Must run before TensorFlow starts work."""
    import tensorflow as tf

    cpus = assigned_cpus()
    # A reused actor (the sweep's trials) has set them already, to the same share: TensorFlow
    # refuses to change them once it has started.
    if tf.config.threading.get_intra_op_parallelism_threads() != cpus:
        tf.config.threading.set_intra_op_parallelism_threads(cpus)
        tf.config.threading.set_inter_op_parallelism_threads(cpus)
    return cpus
