"""Stage calibrate: make each model's confidence mean what it says, on the validation split.

Label smoothing trains both models to be under-confident: the CNN says ~90 % where it is right
99.5 % of the time. For each model this stage
  1. fits one temperature on the validation images (temperature scaling: divide the logits by T
     before the softmax; T < 1 sharpens, and the predicted digit never changes), and
  2. picks the "not sure" threshold: the lowest calibrated confidence at which the answers kept
     are still `calibrate.accepted_accuracy` (99.9 %) right on validation, and still
     `calibrate.accepted_accuracy_under_shift` right on each corrupted copy of the validation
     images (pipeline.core.corruptions, the robustness section's strengths): a model is most
     confidently wrong off MNIST (8x8 scans), and one threshold must serve both; and
  3. fits the "not a digit" gate (pipeline.core.gate) on training digits against generated non-digits
     (pipeline.core.nondigits, seeded by `seed`), flagging at most `calibrate.digit_flag_rate` of the
     validation digits.
Writes
  models/<model>.calibration.json  temperature and thresholds, with the sha256 of the model and
                                   gate files they belong to; the predictor (CLI, API, page)
                                   applies them
  models/<model>.gate.pkl          the fitted gate (scikit-learn, pickled: load only your own)
  reports/calibration.json         validation ECE, NLL and mean confidence before and after,
                                   the threshold each copy asks for, and the coverage and accuracy
                                   of sure answers on each at the one chosen (dvc metrics)
and adds the same to the model's MLflow run (params, metrics, calibration.json, gate/, and
`calibrated_model`: the model with its temperature built in, for anyone who loads it with MLflow
alone) and its registered version (tags). The test split is not read here: evaluate measures the result on it.
"""

import joblib

from pipeline.core import confidence, corruptions, gate, tracking
from pipeline.core import params as params_module
from pipeline.core.files import DataError, atomic_path, load_arrays, require, sha256, write_json
from pipeline.core.layout import CALIBRATION_FILE, PROCESSED_DIR, calibration_file, gate_file, model_file


def not_sure_threshold(model, temperature, calibrated, labels, corrupted_val, params):
    """The threshold that keeps both promises, and per copy (clean, each corruption) the threshold
    it alone would ask for."""
    wanted = {"clean": confidence.not_sure_threshold(calibrated, labels, params.calibrate.accepted_accuracy)}
    for name, images in corrupted_val.items():
        shifted = confidence.with_temperature(model.predict(images, batch_size=1000, verbose=0), temperature)
        wanted[name] = confidence.not_sure_threshold(shifted, labels, params.calibrate.accepted_accuracy_under_shift)
    return max(wanted.values()), wanted


def calibrate(model_path, data, labels, corrupted_val, params):
    import keras

    model = keras.models.load_model(model_path, compile=False)
    x_val = data["x_val"]
    raw = model.predict(x_val, batch_size=1000, verbose=0)
    temperature = confidence.fit_temperature(raw, labels)
    calibrated = confidence.with_temperature(raw, temperature)
    threshold, wanted = not_sure_threshold(model, temperature, calibrated, labels, corrupted_val, params)
    settings = params.calibrate
    fitted_gate, non_digit_count = gate.fit(
        model, data["x_train"], x_val, params.seed, settings.nondigits_per_kind, settings.digit_flag_rate
    )
    scores = {
        "temperature": temperature,
        "not_sure_below": threshold,
        "threshold_wanted_by": wanted,
        "before": confidence.calibration_scores(raw, labels),
        "after": confidence.calibration_scores(calibrated, labels),
        **confidence.selective_scores(calibrated, labels, threshold),
        "gate_threshold": fitted_gate.threshold,
        "gate_training_non_digits": non_digit_count,
    }
    file = {
        "temperature": temperature,
        "not_sure_below": threshold,
        "accepted_accuracy": params.calibrate.accepted_accuracy,
        "not_a_digit_above": fitted_gate.threshold,
        "model_sha256": sha256(model_path),
    }
    return file, scores, fitted_gate, confidence.with_temperature_layers(model, temperature)


def calibrate_models(params):
    import mlflow

    data = load_arrays(PROCESSED_DIR, ["x_train", "x_val", "y_val"])
    require(*(model_file(kind) for kind in params_module.MODELS))
    labels = data["y_val"].argmax(axis=1)
    corrupted_val = corruptions.corrupted_copies(data["x_val"], params)
    tracking.use_experiment(params.mlflow.experiment)

    report = {}
    for kind in params_module.MODELS:
        run_file = tracking.read_run_file(kind)
        file, scores, fitted_gate, calibrated_model = calibrate(model_file(kind), data, labels, corrupted_val, params)
        with atomic_path(gate_file(kind)) as tmp:
            joblib.dump(fitted_gate, tmp)
        file["gate_sha256"] = sha256(gate_file(kind))
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
            # The names the predictor looks for in a model's run.
            mlflow.log_dict(file, "calibration.json")
            mlflow.log_artifact(str(gate_file(kind)), "gate")
            tracking.log_keras_model(calibrated_model, data["x_val"][:1], name="calibrated_model")
        tracking.tag_model_version(run_file, {key: file[key] for key in ("temperature", "not_sure_below")})
        before, after = scores["before"], scores["after"]
        binding = max(scores["threshold_wanted_by"], key=scores["threshold_wanted_by"].get)
        print(
            f"calibrate {kind}: temperature {file['temperature']:.3f}; validation ECE {before['ece']:.2%} -> "
            f"{after['ece']:.2%}, NLL {before['nll']:.4f} -> {after['nll']:.4f}; not sure below "
            f"{file['not_sure_below']:.2%}, as {binding} asks (keeps {scores['coverage']:.2%} of clean validation "
            f"answers, {scores['accepted_accuracy']:.2%} right); not-a-digit gate fitted on "
            f"{scores['gate_training_non_digits']:,} generated non-digits",
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
