"""Stage calibrate: make each model's confidence mean what it says, on the validation split.

Label smoothing trains both models to be under-confident. For each model this stage
  1. answers the validation images and shifted copies of them (pipeline.core.shifts.corruptions,
     the `shifts` section's strengths), and searches the temperatures and the "not sure"
     threshold that keep every promise on them (pipeline.core.trust.calibration: the one rule,
     which `digits finetune` uses too), and again on `calibrate.bootstrap_resamples` resamples of
     them, to measure how far each copy's coverage would move;
  2. fits the "not a digit" gate (pipeline.core.trust.gate) on training digits against generated
     non-digits (pipeline.core.trust.nondigits, seeded by `seed`), flagging at most
     `calibrate.digit_flag_rate` of the validation digits.
Writes
  models/<model>.calibration.json  temperature and thresholds, with the sha256 of the model and
                                   gate files they belong to; the predictor (CLI, API, page)
                                   applies them
  models/<model>.gate.pkl          the fitted gate (scikit-learn, pickled: load only your own)
  reports/calibration.json         validation ECE, NLL and mean confidence before and after, the
                                   threshold clean digits alone ask for, the coverage each soft
                                   share tried keeps, the coverage and accuracy of sure answers
                                   on each validation copy, and the range of that coverage over
                                   calibrations on resamples of them (dvc metrics)
and adds the same to the model's MLflow run (params, metrics, calibration.json, gate/, and
`calibrated_model`: the model with its sharp images' temperature built in, for anyone who loads it with MLflow
alone) and its registered version (tags). The test split is not read here: evaluate measures the result on it.
"""

from pipeline.core import params as params_module
from pipeline.core import tracking
from pipeline.core.files import atomic_path, load_arrays, require, sha256, write_json
from pipeline.core.layout import CALIBRATION_FILE, MODELS, PROCESSED_DIR, calibration_file, gate_file, model_file
from pipeline.core.shifts import corruptions
from pipeline.core.trust import calibration, confidence, gate


def calibrate(model_path, data, labels, corrupted_val, params):
    import keras

    model = keras.models.load_model(model_path, compile=False)
    sets = {"clean": (data["x_val"], labels), **{name: (x, labels) for name, x in corrupted_val.items()}}
    copies = calibration.copies_of(model, sets, clean={"clean"})
    settings = params.calibrate
    fitted, record = calibration.search(copies, settings)
    spread = calibration.coverage_spread(copies, settings, settings.bootstrap_resamples, params.seed)
    fitted_gate, non_digit_count = gate.fit(
        model, data["x_train"], data["x_val"], params.seed, settings.nondigits_per_kind, settings.digit_flag_rate
    )
    calibrated = {name: confidence.calibrated(copy.raw, copy.images, fitted) for name, copy in copies.items()}
    scores = {
        **fitted,
        **record,
        "before": confidence.calibration_scores(copies["clean"].raw, labels),
        "after": confidence.calibration_scores(calibrated["clean"], labels),
        **confidence.selective_scores(calibrated["clean"], labels, fitted["not_sure_below"]),
        # What the promise keeps on each copy of the validation images, in-sample.
        "sure": {
            name: confidence.selective_scores(p, labels, fitted["not_sure_below"]) for name, p in calibrated.items()
        },
        # The same search on resamples of the validation images: how far each copy's coverage would move.
        "coverage_spread": spread,
        "gate_threshold": fitted_gate.threshold,
        "gate_training_non_digits": non_digit_count,
    }
    file = {
        **fitted,
        "accepted_accuracy": params.calibrate.accepted_accuracy,
        "not_a_digit_above": fitted_gate.threshold,
        "model_sha256": sha256(model_path),
    }
    # The MLflow copy carries the one temperature of sharp images: Keras' own layers cannot pick
    # one per image. The served graph (pipeline.core.graph.convert) applies both.
    return file, scores, fitted_gate, confidence.with_temperature_layers(model, fitted["temperature"])


def calibrate_models(params):
    import mlflow

    data = load_arrays(PROCESSED_DIR, ["x_train", "x_val", "y_val"])
    require(*(model_file(model) for model in MODELS))
    labels = data["y_val"].argmax(axis=1)
    corrupted_val = corruptions.corrupted_copies(data["x_val"], params)
    tracking.use_experiment(params.mlflow.experiment)

    report = {}
    for model in MODELS:
        run_file = tracking.read_run_file(model)
        file, scores, fitted_gate, calibrated_model = calibrate(model_file(model), data, labels, corrupted_val, params)
        with atomic_path(gate_file(model)) as tmp:
            gate.save(fitted_gate, tmp)
        file["gate_sha256"] = sha256(gate_file(model))
        write_json(calibration_file(model), file)
        report[model] = {"val": scores}
        with tracking.run(run_id=run_file["run_id"]):
            # Metrics, not params: the stage reruns on the same training run when only calibrate's
            # params change, and MLflow params cannot change.
            fitted = ("temperature", "soft_temperature", "soft_from", "smooth_below", "not_sure_below")
            mlflow.log_metrics({f"calibration_{key}": file[key] for key in fitted})
            mlflow.log_metrics(
                {
                    **{f"val_{name}_before": v for name, v in scores["before"].items()},
                    **{f"val_{name}_after": v for name, v in scores["after"].items()},
                    "val_coverage": scores["coverage"],
                    **{f"val_sure_{name}_{k}": v for name, sure in scores["sure"].items() for k, v in sure.items()},
                    **{
                        f"val_coverage_spread_{name}_{end}": v
                        for name, ends in scores["coverage_spread"].items()
                        for end, v in ends.items()
                    },
                }
            )
            # The names the predictor looks for in a model's run.
            mlflow.log_dict(file, "calibration.json")
            mlflow.log_artifact(str(gate_file(model)), "gate")
            tracking.log_keras_model(calibrated_model, data["x_val"][:1], name="calibrated_model")
        tracking.tag_model_version(
            run_file, {key: file[key] for key in ("temperature", "soft_temperature", "not_sure_below")}
        )
        before, after = scores["before"], scores["after"]
        worst = min(scores["sure"], key=lambda name: scores["sure"][name]["accepted_accuracy"])
        spread = scores["coverage_spread"]
        widest = max(spread, key=lambda name: spread[name]["high"] - spread[name]["low"], default=None)
        spread_said = (
            f"; coverage over {params.calibrate.bootstrap_resamples} resamples at most "
            f"{spread[widest]['low']:.1%}-{spread[widest]['high']:.1%}, on {widest}"
            if widest
            else ""
        )
        print(
            f"calibrate {model}: temperature {file['temperature']:.3f} ({file['soft_temperature']:.3f} for soft "
            f"images, smooth below {file['smooth_below']:g}); validation ECE {before['ece']:.2%} -> "
            f"{after['ece']:.2%}, NLL {before['nll']:.4f} -> {after['nll']:.4f}; "
            f"not sure below {file['not_sure_below']:.2%} (keeps "
            f"{scores['coverage']:.2%} of clean validation answers, {scores['accepted_accuracy']:.2%} right; "
            f"sure answers at worst {scores['sure'][worst]['accepted_accuracy']:.2%} right, on {worst}"
            f"{spread_said}); "
            f"not-a-digit gate fitted on {scores['gate_training_non_digits']:,} generated non-digits",
            flush=True,
        )
    write_json(CALIBRATION_FILE, report)


def main():
    params_module.run_stage("calibrate", calibrate_models)


if __name__ == "__main__":
    main()
