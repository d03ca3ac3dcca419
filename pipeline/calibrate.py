"""Stage calibrate: make each model's confidence mean what it says, on the validation split.

Label smoothing trains both models to be under-confident: the CNN says ~90 % where it is right
99.5 % of the time. For each model this stage
  1. fits one temperature on the validation images (temperature scaling: divide the logits by T
     before the softmax; T < 1 sharpens, and the predicted digit never changes), and
  2. picks the "not sure" threshold: the lowest calibrated confidence at which the answers kept
     are still `calibrate.accepted_accuracy` (99.9 %) right on validation, and
  3. fits the "not a digit" gate (pipeline.core.gate) on training digits against generated non-digits
     (pipeline.core.nondigits, seeded by `seed`), flagging at most `calibrate.digit_flag_rate` of the
     validation digits.
Writes
  models/<model>.calibration.json  temperature and thresholds, with the sha256 of the model and
                                   gate files they belong to; the predictor (CLI, API, page)
                                   applies them
  models/<model>.gate.pkl          the fitted gate (scikit-learn, pickled: load only your own)
  reports/calibration.json         validation ECE, NLL and mean confidence before and after,
                                   the threshold and its validation coverage (dvc metrics)
and adds the same to the model's MLflow run (params, metrics, calibration.json, gate/, and
`calibrated_model`: the model with its temperature built in, for anyone who loads it with MLflow
alone) and its registered version (tags). The test split is not read here: evaluate measures the result on it.
"""

import joblib
import numpy as np

from pipeline.core import confidence, gate, nondigits, tracking
from pipeline.core import params as params_module
from pipeline.core.files import DataError, atomic_path, load_arrays, require, sha256, write_json
from pipeline.core.layout import CALIBRATION_FILE, PROCESSED_DIR, calibration_file, gate_file, model_file

GATE_TRAINING_DIGITS = 20000  # of the 55,000 training digits; half as MNIST has them, half as uploads


def both_forms(digits):
    """Digits as MNIST has them, and as an upload of each reaches the model (normalize.to_mnist):
    the non-digits go through to_mnist, so the digits must too, or the gate learns to flag what
    normalisation does rather than what is not a digit."""
    return np.concatenate([digits, gate.to_mnist_forms(list(digits[..., 0]))])


def fit_gate(model, x_train, x_val, params):
    """The "not a digit" gate for this model, and how many non-digits it learned from."""
    rng = np.random.default_rng(params.seed)
    chosen = rng.choice(len(x_train), min(GATE_TRAINING_DIGITS, len(x_train)) // 2, replace=False)
    digits = both_forms(x_train[chosen])
    generated = nondigits.generate(params.calibrate.nondigits_per_kind, params.seed, x_train)
    others = gate.to_mnist_forms([image for images in generated.values() for image in images])
    features = gate.with_features(model)
    digit_features = features.predict(digits, batch_size=1000, verbose=0)[1]
    other_features = features.predict(others, batch_size=1000, verbose=0)[1]
    fitted = gate.Gate(params.seed).fit(digit_features, digits, other_features, others)
    val_digits = both_forms(x_val)
    val_scores = fitted.scores(features.predict(val_digits, batch_size=1000, verbose=0)[1], val_digits)
    return fitted.set_threshold(val_scores, params.calibrate.digit_flag_rate), len(others)


def calibrate(model_path, data, labels, params):
    import keras

    model = keras.models.load_model(model_path, compile=False)
    x_val = data["x_val"]
    raw = model.predict(x_val, batch_size=1000, verbose=0)
    temperature = confidence.fit_temperature(raw, labels)
    calibrated = confidence.with_temperature(raw, temperature)
    threshold = confidence.not_sure_threshold(calibrated, labels, params.calibrate.accepted_accuracy)
    fitted_gate, non_digit_count = fit_gate(model, data["x_train"], x_val, params)
    scores = {
        "temperature": temperature,
        "not_sure_below": threshold,
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
    tracking.use_experiment(params.mlflow.experiment)

    report = {}
    for kind in params_module.MODELS:
        run_file = tracking.read_run_file(kind)
        file, scores, fitted_gate, calibrated_model = calibrate(model_file(kind), data, labels, params)
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
        print(
            f"calibrate {kind}: temperature {file['temperature']:.3f}; validation ECE {before['ece']:.2%} -> "
            f"{after['ece']:.2%}, NLL {before['nll']:.4f} -> {after['nll']:.4f}; not sure below "
            f"{file['not_sure_below']:.2%} (keeps {scores['coverage']:.2%} of validation answers, "
            f"{scores['accepted_accuracy']:.2%} right); not-a-digit gate fitted on "
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
