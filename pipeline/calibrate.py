"""Stage calibrate: make each model's confidence mean what it says, on the validation split.

Label smoothing trains both models to be under-confident: the CNN says ~90 % where it is right
99.5 % of the time. For each model this stage
  1. fits one temperature on the validation images (temperature scaling: divide the logits by T
     before the softmax; T < 1 sharpens, and the predicted digit never changes), and
  2. picks the "not sure" threshold: the lowest calibrated confidence at which the answers kept
     are still `calibrate.accepted_accuracy` (99.9 %) right on validation.
Writes
  models/<model>.calibration.json  temperature and threshold, with the sha256 of the model file
                                   they belong to; the predictor (CLI, API, page) applies them
  reports/calibration.json         validation ECE, NLL and mean confidence before and after,
                                   the threshold and its validation coverage (dvc metrics)
and adds the same to the model's MLflow run (params, metrics, calibration.json) and its
registered version (tags). The test split is not read here: evaluate measures the result on it.
"""

import hashlib

from pipeline import confidence, tracking
from pipeline import params as params_module
from pipeline.files import DataError, load_arrays, require, write_json
from pipeline.layout import CALIBRATION_FILE, PROCESSED_DIR, calibration_file, model_file


def calibrate(model_path, x_val, labels, accepted_accuracy):
    import keras

    model = keras.models.load_model(model_path, compile=False)
    raw = model.predict(x_val, batch_size=1000, verbose=0)
    temperature = confidence.fit_temperature(raw, labels)
    calibrated = confidence.with_temperature(raw, temperature)
    threshold = confidence.not_sure_threshold(calibrated, labels, accepted_accuracy)
    scores = {
        "temperature": temperature,
        "not_sure_below": threshold,
        "before": confidence.calibration_scores(raw, labels),
        "after": confidence.calibration_scores(calibrated, labels),
        **confidence.selective_scores(calibrated, labels, threshold),
    }
    file = {
        "temperature": temperature,
        "not_sure_below": threshold,
        "accepted_accuracy": accepted_accuracy,
        "model_sha256": hashlib.sha256(model_path.read_bytes()).hexdigest(),
    }
    return file, scores


def calibrate_models(params):
    import mlflow
    from mlflow.tracking import MlflowClient

    data = load_arrays(PROCESSED_DIR, ["x_val", "y_val"])
    require(*(model_file(kind) for kind in params_module.MODELS))
    x_val, labels = data["x_val"], data["y_val"].argmax(axis=1)
    tracking.use_experiment(params.experiment)

    report = {}
    for kind in params_module.MODELS:
        run_file = tracking.read_run_file(kind)
        file, scores = calibrate(model_file(kind), x_val, labels, params.accepted_accuracy)
        write_json(calibration_file(kind), file)
        report[kind] = {"val": scores}
        with tracking.run(run_id=run_file["run_id"]):
            mlflow.log_params({"temperature": round(file["temperature"], 4), "not_sure_below": file["not_sure_below"]})
            mlflow.log_metrics(
                {
                    **{f"val_{name}_before": v for name, v in scores["before"].items()},
                    **{f"val_{name}_after": v for name, v in scores["after"].items()},
                    "val_coverage": scores["coverage"],
                }
            )
            mlflow.log_dict(file, "calibration.json")  # the name the predictor looks for
        if run_file.get("model_version"):
            for key in ("temperature", "not_sure_below"):
                MlflowClient().set_model_version_tag(
                    run_file["registered_model"], run_file["model_version"], key, str(file[key])
                )
        before, after = scores["before"], scores["after"]
        print(
            f"calibrate {kind}: temperature {file['temperature']:.3f}; validation ECE {before['ece']:.2%} -> "
            f"{after['ece']:.2%}, NLL {before['nll']:.4f} -> {after['nll']:.4f}; not sure below "
            f"{file['not_sure_below']:.2%} (keeps {scores['coverage']:.2%} of validation answers, "
            f"{scores['accepted_accuracy']:.2%} right)",
            flush=True,
        )
    write_json(CALIBRATION_FILE, report)


def main():
    params = params_module.load_or_exit("calibrate")
    try:
        calibrate_models(params)
    except DataError as e:
        raise SystemExit(f"calibrate: {e}") from None


if __name__ == "__main__":
    main()
