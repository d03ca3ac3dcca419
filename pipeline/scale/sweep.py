"""`digits sweep`: compare recipes on the validation split, as Ray Tune trials (model x seed x
overrides), each trial an MLflow run nested under one run for the sweep.

    digits sweep --grid cnn.arch=plain,resnet --seeds 1 2 3 4 5 6
    digits sweep --space sweep.yaml --search optuna --samples 12 --asha
    RAY_ADDRESS=HEAD:6379 MLFLOW_TRACKING_URI=http://HOST:5000 digits sweep ...   # on a cluster

A trial trains one model with params.yaml plus its overrides, reports every epoch's validation
accuracy and loss to Tune (ASHA stops weak trials on it), then its final validation metrics: clean
accuracy, the mean over the robustness stage's corruptions of the validation images, and the share
of answers kept above the "not sure" threshold that calibrate would fit. The test split is never
read. The sweep's run holds the summary per variant (mean and sd over seeds) as metrics and as
`summary.csv` (and in --out, default reports/sweep.csv), and the sweep ends by printing the
best variant as the `dvc exp run -S ...` line that makes it a reproducible experiment.

The space file (YAML) names each key's values: a list is a grid; `{choice: [...]}`,
`{uniform: [low, high]}` and `{loguniform: [low, high]}` are sampled (--search random or optuna).
"""

import json
import os
import signal
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from pipeline.core import params as params_module
from pipeline.core import tracking
from pipeline.core.files import load_arrays, write_text
from pipeline.core.layout import MODELS, PROCESSED_DIR
from pipeline.scale import cluster

EPOCH_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")
FINAL_METRICS = (
    "val_accuracy",
    "val_corrupted_mean_accuracy",
    "val_corrupted_low_resolution_accuracy",  # the hardest corruption, and the one scans bring most
    "val_not_sure_coverage",
    "train_seconds",
)
RUN_STATUS = {"complete": "FINISHED", "error": "FAILED"}  # and KILLED for what an interrupt leaves


def search_space(grid, sampled, space_file):
    """{key: Tune domain} from --grid KEY=A,B (a grid), --choice/--uniform/--loguniform and a YAML
    file. Values are YAML ('0.3' is a number, '[1, 2, 1]' a list)."""
    from ray import tune

    space = {}
    if space_file:
        for key, spec in (yaml.safe_load(Path(space_file).read_text()) or {}).items():
            if isinstance(spec, list):
                space[key] = tune.grid_search(spec)
            elif isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in SAMPLERS:
                sampler, values = next(iter(spec.items()))
                space[key] = SAMPLERS[sampler](values)
            else:
                raise ValueError(f"{space_file}: {key}: expected a list (grid) or one of {sorted(SAMPLERS)}")
    for sampler, items in [("grid", grid), *sampled]:
        for item in items:
            key, sep, values = item.partition("=")
            if not sep or not values:
                raise ValueError(f"--{sampler} {item}: expected KEY=VALUE,VALUE...")
            values = [yaml.safe_load(v) for v in _split_values(values)]
            space[key] = tune.grid_search(values) if sampler == "grid" else SAMPLERS[sampler](values)
    return space


def _split_values(text):
    """'plain,resnet' -> ['plain', 'resnet']; commas inside [...] stay: '[1,2,1],[1,1,1]'."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [*parts, current]


def _sampler(name):
    def make(values):
        from ray import tune

        if name == "choice":
            return tune.choice(values)
        if len(values) != 2:
            raise ValueError(f"{name}: expected [low, high], got {values}")
        return getattr(tune, name)(*map(float, values))

    return make


SAMPLERS = {name: _sampler(name) for name in ("choice", "uniform", "loguniform")}


def variant_of(config):
    """What a trial tries, without its seed: the key its seeds are summarised under."""
    return ", ".join(f"{k}={v}" for k, v in sorted(config.items()) if k != "seed")


def run_trial(config, tree, data, corrupted_val):
    """One Tune trial; a failure is reported with its message (for the MLflow run's `error` tag)
    before Tune marks the trial failed."""
    from ray import tune

    try:
        trial(config, tree, data, corrupted_val)
    except Exception as e:
        tune.report({"epoch": 0, "val_accuracy": float("nan"), "error": f"{type(e).__name__}: {e}"[:4000]})
        raise


def trial(config, tree, data, corrupted_val):
    """Train config["model"] with its overrides at config["seed"] on the training split; report
    each epoch, then the final validation metrics."""
    import keras
    import tensorflow as tf
    from ray import tune

    from pipeline.core import training
    from pipeline.core.trust import confidence  # here: `digits predict` starts without TensorFlow

    cpus = cluster.limit_tensorflow_threads()
    keras.backend.clear_session()  # the actor may have run an earlier trial: free its model
    overrides = {k: v for k, v in config.items() if k != "model"}
    params = params_module.from_tree(params_module.with_overrides(tree, overrides))
    model_params = params.model(config["model"])

    class ReportEpoch(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            tune.report({"epoch": epoch + 1, **{k: float(logs[k]) for k in EPOCH_METRICS}})

    training.seed_everything(params.seed)
    model = training.compiled_model(model_params, params.epochs, len(data["x_train"]))
    _, seconds = training.fit(
        model,
        model_params,
        data,
        params.epochs,
        params.seed,
        params.shifts.strengths,
        to_mlflow=False,
        callbacks=[ReportEpoch()],
        verbose=0,
    )

    scorecard, _, _ = confidence.validation_scorecard(
        model,
        data["x_val"],
        data["y_val"].argmax(1),
        corrupted_val,
        params.calibrate.accepted_accuracy,
        params.evaluate.batch_size,
    )
    tune.report(
        {
            "epoch": params.epochs,
            **scorecard,
            "train_seconds": seconds,
            "param_count": model.count_params(),
            "cpus": cpus,
            "tensorflow_threads": tf.config.threading.get_intra_op_parallelism_threads(),
            "node_id": _node_id(),
            "final": True,
        }
    )


def _node_id():
    import ray

    return ray.get_runtime_context().get_node_id()


def trial_params(tree, config):
    """What a trial's MLflow run holds as params: every knob of its model's section as the training
    stage logs them, epochs and seed, and its overrides as given. Only the overrides when they do
    not make valid params (the trial will fail and say why)."""
    overrides = {k: v for k, v in config.items() if k != "model"}
    try:
        params = params_module.from_tree(params_module.with_overrides(tree, overrides))
    except params_module.ParamsError:
        return {k: str(v) for k, v in config.items()}
    every = {"model": config["model"], "epochs": params.epochs, "seed": params.seed}
    every.update(params.model(config["model"]).flat())
    return {k: str(v) for k, v in every.items()}


def mlflow_callback(client, experiment_id, parent_run_id, dataset_inputs, sweep_name, tree):
    """A Tune callback, in the driver, that keeps one MLflow run per trial nested under the sweep's
    run: params at the start, each epoch's metrics (step = epoch), the final metrics, and its end as
    FINISHED or FAILED. Anything still open when the sweep is interrupted is ended KILLED."""
    from mlflow.entities import Metric, Param, RunStatus
    from ray import tune

    class MLflowTrials(tune.Callback):
        def __init__(self):
            self.runs, self.open = {}, set()

        def on_trial_start(self, iteration, trials, trial, **info):
            if trial.trial_id in self.runs:
                return
            tags = {
                "mlflow.parentRunId": parent_run_id,
                "sweep": sweep_name,
                "variant": variant_of(trial.config),
                "overrides": variant_of({k: v for k, v in trial.config.items() if k != "model"}),
                **tracking.run_tags(trial.config["model"], "sweep"),
            }
            run = client.create_run(experiment_id, run_name=f"{sweep_name}-{trial.trial_id}", tags=tags)
            params = [Param(k, v) for k, v in trial_params(tree, trial.config).items()]
            client.log_batch(run.info.run_id, params=params)
            client.log_inputs(run.info.run_id, datasets=dataset_inputs)
            self.runs[trial.trial_id] = run.info.run_id
            self.open.add(trial.trial_id)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if "error" in result:
                client.set_tag(self.runs[trial.trial_id], "error", result["error"])
                return
            now = int(time.time() * 1000)
            if result.get("final"):
                keys = [*FINAL_METRICS, "val_risk_coverage_area", "param_count"]
                keys += [k for k in result if k.startswith("val_corrupted_") and k not in keys]
            else:
                keys = EPOCH_METRICS
            metrics = [Metric(k, float(result[k]), now, int(result["epoch"])) for k in keys if k in result]
            client.log_batch(self.runs[trial.trial_id], metrics=metrics)
            if result.get("final"):
                for key in ("node_id", "cpus", "tensorflow_threads"):
                    client.set_tag(self.runs[trial.trial_id], f"ray.{key}", str(result[key]))

        def on_trial_complete(self, iteration, trials, trial, **info):
            if not (trial.last_result or {}).get("final"):
                client.set_tag(self.runs[trial.trial_id], "stopped_early", "ASHA")
            self._end(trial, "FINISHED")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._end(trial, "FAILED")

        def _end(self, trial, status):
            if trial.trial_id in self.open:
                client.set_terminated(self.runs[trial.trial_id], status)
                self.open.discard(trial.trial_id)

        def kill_open(self):
            for trial_id in sorted(self.open):
                client.set_terminated(self.runs[trial_id], RunStatus.to_string(RunStatus.KILLED))
            self.open.clear()

    return MLflowTrials()


def summarize(results):
    """Per variant: how many trials finished, were stopped early (ASHA) or failed, and the mean and sd
    over seeds of each final metric of the finished ones. Rows sorted best first by mean validation
    accuracy."""
    variants = {}
    for result in results:
        entry = variants.setdefault(variant_of(result["config"]), {"finished": [], "stopped": 0, "failed": 0})
        if result["status"] != "FINISHED":
            entry["failed"] += 1
        elif result["metrics"].get("final"):
            entry["finished"].append(result["metrics"])
        else:
            entry["stopped"] += 1
    rows = []
    for variant, entry in variants.items():
        row = {
            "variant": variant,
            "trials": len(entry["finished"]),
            "stopped": entry["stopped"],
            "failed": entry["failed"],
        }
        for key in FINAL_METRICS:
            values = [m[key] for m in entry["finished"]]
            row[f"{key}_mean"] = statistics.mean(values) if values else float("nan")
            row[f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(row)
    return sorted(rows, key=lambda r: -np.nan_to_num(r["val_accuracy_mean"], nan=-1))


def summary_table(rows):
    import pandas as pd

    return pd.DataFrame(rows).to_csv(index=False, float_format="%.5f")


def exp_run_line(variant_config):
    """The command that makes a variant a DVC experiment through the real pipeline."""

    def text(value):
        return json.dumps(value).replace('"', "") if isinstance(value, list) else str(value)

    sets = " ".join(f"-S '{k}={text(v)}'" for k, v in variant_config.items())
    return f"dvc exp run {sets}".strip()


def dataset_inputs(data):
    """The splits a trial sees, as the training stages log them, for MlflowClient.log_inputs."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    return [
        DatasetInput(Dataset(**dataset.to_dict()), tags=[InputTag("mlflow.data.context", context)])
        for dataset, context in tracking.training_datasets(data)
    ]


def param_space(args, base):
    """Tune's param_space from the command line: the models, the fixed overrides, the searched keys
    and the seeds; and the epochs each trial runs."""
    from ray import tune

    space = search_space(
        args.grid, [("choice", args.choice), ("uniform", args.uniform), ("loguniform", args.loguniform)], args.space
    )
    fixed = {}
    for item in args.set:
        key, _, value = item.partition("=")
        fixed[key] = yaml.safe_load(value)
    if "epochs" in space and args.asha:
        raise ValueError("--asha stops trials by epoch: keep epochs fixed")
    if args.search == "optuna":
        if any(isinstance(v, dict) and "grid_search" in v for v in space.values()):
            raise ValueError("--search optuna samples every key: use --choice, not --grid or a list")
        seeds = {"seed": tune.choice(args.seeds)} if len(args.seeds) > 1 else {"seed": args.seeds[0]}
    else:
        seeds = {"seed": tune.grid_search(args.seeds)}
    models = tune.grid_search(args.models) if len(args.models) > 1 else args.models[0]
    return {"model": models, **fixed, **space, **seeds}, fixed.get("epochs", base.epochs)


def start_parent_run(client, experiment, sweep_name):
    parent = client.create_run(
        experiment.experiment_id, run_name=sweep_name, tags={**tracking.run_tags("sweep", "sweep"), "sweep": sweep_name}
    )
    parent_id = parent.info.run_id
    client.log_param(parent_id, "command", " ".join(sys.argv[1:])[:6000] or "sweep")
    return parent_id


def tuner_for(args, space, epochs, trainable, callback, sweep_name):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    search_alg = None
    if args.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(metric="val_accuracy", mode="max", seed=args.seeds[0])
    asha = ASHAScheduler(max_t=epochs + 1, grace_period=args.asha_grace, time_attr="epoch") if args.asha else None
    return tune.Tuner(
        tune.with_resources(trainable, {"cpu": args.cpus_per_trial}),
        param_space=space,
        tune_config=tune.TuneConfig(
            metric="val_accuracy",
            mode="max",
            num_samples=args.samples,
            search_alg=search_alg,
            scheduler=asha,
            max_concurrent_trials=args.max_concurrent,
            # A trial's actor runs the next trial: no new process, TensorFlow import or data copy.
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=sweep_name,
            storage_path=str(tracking.project_root() / ".ray_results"),
            callbacks=[callback],
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
            verbose=1,
        ),
    )


def run_tuner(tuner, callback, client, parent_id):
    """The trials' results; an interrupt marks the sweep's run and its open trials KILLED."""
    # Ctrl-C ends the sweep at once, as KeyboardInterrupt here (Tune's own handler would wind it
    # down and return as if finished); Ray then stops the trials this driver owns.
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even where a shell started us ignoring it
    status = "KILLED"
    try:
        results = [
            {"config": r.config, "metrics": r.metrics or {}, "status": "FAILED" if r.error else "FINISHED"}
            for r in tuner.fit()
        ]
        status = "FINISHED"
    finally:
        callback.kill_open()
        if status != "FINISHED":
            client.set_terminated(parent_id, "KILLED")
    return results


def log_summary(client, parent_id, rows, table):
    """The summary table on the sweep's run, with each variant's mean and sd as metrics v<i>.*."""
    from mlflow.entities import Metric, RunTag

    client.log_text(parent_id, table, "summary.csv")
    now = int(time.time() * 1000)
    client.log_batch(
        parent_id,
        metrics=[
            Metric(f"v{i}.{key}_{stat}", row[f"{key}_{stat}"], now, 0)
            for i, row in enumerate(rows)
            for key in FINAL_METRICS
            for stat in ("mean", "sd")
            if not np.isnan(row[f"{key}_mean"])
        ],
        tags=[RunTag(f"v{i}", row["variant"]) for i, row in enumerate(rows)],
    )
    client.set_terminated(parent_id, "FINISHED")


def report_best(sweep_name, results, rows):
    """The exit code, after naming the failed trials and the best variant as a `dvc exp run` line."""
    failed = sum(r["status"] == "FAILED" for r in results)
    if failed:
        print(f"sweep {sweep_name}: {failed} of {len(results)} trials FAILED (see their MLflow runs' `error` tag)")
    best = next((r for r in rows if r["trials"]), None)
    if best is None:
        print(f"sweep {sweep_name}: no trial finished")
        return 1
    best_config = next(r["config"] for r in results if variant_of(r["config"]) == best["variant"])
    overrides = {k: v for k, v in best_config.items() if k not in ("seed", "model")}
    print(
        f"sweep {sweep_name}: best {best['variant']} (val accuracy {best['val_accuracy_mean']:.4%} "
        f"± {best['val_accuracy_sd']:.4%} over {best['trials']} seeds)\n"
        f"  to make it an experiment: {exp_run_line(overrides)}"
    )
    return 1 if failed else 0


def sweep(args):
    from mlflow import MlflowClient
    from ray import tune

    from pipeline.core.shifts import corruptions

    address = cluster.address(args.address)
    uri = cluster.check_tracking_for(address)
    tree = params_module.read_tree(args.params)
    base = params_module.from_tree(tree, args.params)  # a broken params.yaml stops here, not in every trial
    space, epochs = param_space(args, base)

    data = load_arrays(PROCESSED_DIR, ["x_train", "y_train", "x_val", "y_val"])  # never the test split
    corrupted_val = corruptions.corrupted_copies(data["x_val"], base)
    cluster.connect(address, args.cpus)
    experiment = tracking.use_experiment(base.mlflow.experiment)
    client = MlflowClient(uri)
    sweep_name = args.name or time.strftime("sweep-%Y%m%d-%H%M%S")
    parent_id = start_parent_run(client, experiment, sweep_name)
    client.log_param(parent_id, "search", args.search)
    client.log_param(parent_id, "seeds", str(args.seeds))
    callback = mlflow_callback(client, experiment.experiment_id, parent_id, dataset_inputs(data), sweep_name, tree)
    print(f"sweep {sweep_name}: MLflow run {parent_id} in {uri}", flush=True)

    trainable = tune.with_parameters(run_trial, tree=tree, data=data, corrupted_val=corrupted_val)
    tuner = tuner_for(args, space, epochs, trainable, callback, sweep_name)
    results = run_tuner(tuner, callback, client, parent_id)
    rows = summarize(results)
    table = summary_table(rows)
    write_text(args.out, table)
    log_summary(client, parent_id, rows, table)
    print(table, end="")
    return report_best(sweep_name, results, rows)


def main(args):
    try:
        return sweep(args)
    except (ValueError, cluster.ClusterError, params_module.ParamsError) as e:
        print(f"digits sweep: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("digits sweep: interrupted; its running trials and its run are marked KILLED in MLflow", file=sys.stderr)
        return 130


def add_arguments(parser):
    parser.add_argument("--models", nargs="+", choices=MODELS, default=["cnn"])
    parser.add_argument(
        "--seeds", nargs="+", type=int, default=[1, 2, 3], help="seeds of every variant (default 1 2 3)"
    )
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="fixed overrides, e.g. epochs=5")
    parser.add_argument(
        "--grid", nargs="*", default=[], metavar="KEY=A,B", help="every value is tried, e.g. cnn.arch=plain,resnet"
    )
    parser.add_argument("--choice", nargs="*", default=[], metavar="KEY=A,B", help="sampled (random, optuna)")
    parser.add_argument("--uniform", nargs="*", default=[], metavar="KEY=LOW,HIGH")
    parser.add_argument("--loguniform", nargs="*", default=[], metavar="KEY=LOW,HIGH")
    parser.add_argument("--space", metavar="FILE", help="the search space as YAML (see above)")
    parser.add_argument("--search", choices=["grid", "random", "optuna"], default="grid")
    parser.add_argument("--samples", type=int, default=1, help="samples per grid point (random), or trials (optuna)")
    parser.add_argument("--asha", action="store_true", help="stop weak trials early on validation accuracy (ASHA)")
    parser.add_argument(
        "--asha-grace", type=int, default=3, metavar="EPOCHS", help="epochs before ASHA may stop a trial"
    )
    parser.add_argument("--address", help="a Ray cluster to join (default RAY_ADDRESS; none: start Ray here)")
    parser.add_argument("--cpus", type=int, help="CPUs of the local Ray (default: all)")
    parser.add_argument("--cpus-per-trial", type=float, default=1, help="CPUs Ray gives each trial (default 1)")
    parser.add_argument("--max-concurrent", type=int, default=0, help="trials at once (default: as CPUs allow)")
    parser.add_argument("--name", help="the sweep's name (default sweep-<time>)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default="reports/sweep.csv", help="the summary table (default reports/sweep.csv)")
