"""Stage calibrate: make each model's confidence mean what it says, on the validation split.

Label smoothing trains both models to be under-confident: the CNN says ~90 % where it is right
99.5 % of the time. For each model this stage
  1. fits one temperature on the validation images (temperature scaling: divide the logits by T
     before the softmax; T < 1 sharpens, and the predicted digit never changes), and
  2. makes the "not sure" promise hold off MNIST too, on corrupted copies of the validation
     images (pipeline.core.corruptions, the robustness section's strengths): the threshold is the
     lowest calibrated confidence at which clean answers kept are still
     `calibrate.accepted_accuracy` (99.9 %) right; soft images (blurred or low-resolution scans,
     where models are most confidently wrong) get a second, higher temperature, the lowest at which
     every corrupted copy's sure answers are `calibrate.accepted_accuracy_under_shift` right; only
     if none is, the threshold rises (see shift_aware); and
  3. fits the "not a digit" gate (pipeline.core.gate) on training digits against generated non-digits
     (pipeline.core.nondigits, seeded by `seed`), flagging at most `calibrate.digit_flag_rate` of the
     validation digits.
Writes
  models/<model>.calibration.json  temperature and thresholds, with the sha256 of the model and
                                   gate files they belong to; the predictor (CLI, API, page)
                                   applies them
  models/<model>.gate.pkl          the fitted gate (scikit-learn, pickled: load only your own)
  reports/calibration.json         validation ECE, NLL and mean confidence before and after, the
                                   threshold clean digits alone ask for, the coverage each soft
                                   share tried keeps, and the coverage and accuracy of sure answers
                                   on each validation copy (dvc metrics)
and adds the same to the model's MLflow run (params, metrics, calibration.json, gate/, and
`calibrated_model`: the model with its sharp images' temperature built in, for anyone who loads it with MLflow
alone) and its registered version (tags). The test split is not read here: evaluate measures the result on it.
"""

import joblib
import numpy as np

from pipeline.core import confidence, corruptions, gate, tracking
from pipeline.core import params as params_module
from pipeline.core.files import DataError, atomic_path, load_arrays, require, sha256, write_json
from pipeline.core.layout import CALIBRATION_FILE, PROCESSED_DIR, calibration_file, gate_file, model_file

SOFT_TEMPERATURES = 61  # tried from the clean temperature up to 20 times it, evenly in log
THRESHOLDS = 31  # tried from the clean one up, halving the distance to 1 every 10 steps


def shift_aware(raw, images, labels, temperature, params, soft_share):
    """The "not sure" threshold and the soft images' temperature that keep every promise.

    `raw` and `images`: {copy: model outputs, images}, "clean" and each corruption. Each copy has
    its promise: sure answers accepted_accuracy right on clean digits, accepted_accuracy_under_shift
    on a corrupted copy. An image is soft when its faint ink share reaches the one that only
    `soft_share` of clean validation digits reach. The threshold starts where
    clean digits alone put it, and the soft temperature is the lowest from `temperature` up at
    which every copy keeps its promise; only if none does, the threshold rises. Returns the
    calibration's keys, the threshold clean digits alone ask for, and per copy the share kept sure.
    If no threshold and temperature tried keeps every promise, the clean threshold stays."""
    settings = params.calibrate
    target = {
        name: settings.accepted_accuracy if name == "clean" else settings.accepted_accuracy_under_shift for name in raw
    }
    faint = {name: np.asarray(gate.ink_shape(x))[:, 2] for name, x in images.items()}
    soft_from = float(np.quantile(faint["clean"], 1 - soft_share))
    soft = {name: share >= soft_from for name, share in faint.items()}
    clean_threshold = confidence.not_sure_threshold(
        confidence.with_temperature(raw["clean"], temperature), labels, target["clean"]
    )

    def sure(name, threshold, soft_temperature):
        calibrated = confidence.with_temperature(raw[name], np.where(soft[name], soft_temperature, temperature))
        return confidence.selective_scores(calibrated, labels, threshold)

    def promise_kept(threshold, soft_temperature):
        return all(sure(name, threshold, soft_temperature)["accepted_accuracy"] >= target[name] for name in raw)

    soft_temperatures = temperature * np.geomspace(1.0, 20.0, SOFT_TEMPERATURES)
    thresholds = 1 - (1 - clean_threshold) * 0.5 ** (np.arange(THRESHOLDS) / 10)
    # A model that cannot keep every promise within these bounds (the MLP on noisy digits) keeps
    # its clean threshold, and the most careful soft temperature: "not sure" on most clean digits
    # would buy it nothing. reports/calibration.json shows which copies it fails.
    threshold, soft_temperature = next(
        ((float(th), float(t)) for th in thresholds for t in soft_temperatures if promise_kept(th, t)),
        (float(clean_threshold), float(soft_temperatures[-1])),
    )
    rule = {"not_sure_below": threshold, "soft_from": soft_from, "soft_temperature": soft_temperature}
    kept = {name: sure(name, threshold, soft_temperature)["coverage"] for name in raw}
    return rule, clean_threshold, kept


def best_shift_aware(raw, images, labels, temperature, params):
    """shift_aware for each of `calibrate.soft_share_of_clean`: the one that keeps the most clean
    validation answers sure wins; within 0.1 point of it, the one that keeps the most answers sure
    over all copies. Returns the rule, the clean threshold and {share: coverage per copy} (the record)."""
    tried = {
        share: shift_aware(raw, images, labels, temperature, params, share)
        for share in params.calibrate.soft_share_of_clean
    }
    most_clean = max(kept["clean"] for _, _, kept in tried.values())
    share = max(
        (share for share, (_, _, kept) in tried.items() if kept["clean"] >= most_clean - 0.001),
        key=lambda share: np.mean(list(tried[share][2].values())),
    )
    rule, clean_threshold, _ = tried[share]
    return {**rule, "soft_share_of_clean": share}, clean_threshold, {str(k): v[2] for k, v in tried.items()}


def calibrate(model_path, data, labels, corrupted_val, params):
    import keras

    model = keras.models.load_model(model_path, compile=False)
    images = {"clean": data["x_val"], **corrupted_val}
    raw = {name: model.predict(x, batch_size=1000, verbose=0) for name, x in images.items()}
    temperature = confidence.fit_temperature(raw["clean"], labels)
    rule, clean_threshold, tried = best_shift_aware(raw, images, labels, temperature, params)
    calibration = {"temperature": temperature, **{k: v for k, v in rule.items() if k != "soft_share_of_clean"}}
    settings = params.calibrate
    fitted_gate, non_digit_count = gate.fit(
        model, data["x_train"], data["x_val"], params.seed, settings.nondigits_per_kind, settings.digit_flag_rate
    )
    calibrated = {name: confidence.calibrated(raw[name], x, calibration) for name, x in images.items()}
    scores = {
        **calibration,
        "clean_digits_alone_ask": clean_threshold,
        "soft_share_of_clean": rule["soft_share_of_clean"],
        "coverage_by_soft_share": tried,
        "before": confidence.calibration_scores(raw["clean"], labels),
        "after": confidence.calibration_scores(calibrated["clean"], labels),
        **confidence.selective_scores(calibrated["clean"], labels, rule["not_sure_below"]),
        # What the promise keeps on each copy of the validation images, in-sample.
        "sure": {
            name: confidence.selective_scores(p, labels, rule["not_sure_below"]) for name, p in calibrated.items()
        },
        "gate_threshold": fitted_gate.threshold,
        "gate_training_non_digits": non_digit_count,
    }
    file = {
        **calibration,
        "accepted_accuracy": params.calibrate.accepted_accuracy,
        "not_a_digit_above": fitted_gate.threshold,
        "model_sha256": sha256(model_path),
    }
    # The MLflow copy carries the one temperature of sharp images: Keras' own layers cannot pick
    # one per image. The served graph (pipeline.core.graph) applies both.
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
            # Metrics, not params: the stage reruns on the same training run when only calibrate's
            # params change, and MLflow params cannot change.
            fitted = ("temperature", "soft_temperature", "soft_from", "not_sure_below")
            mlflow.log_metrics({f"calibration_{key}": file[key] for key in fitted})
            mlflow.log_metrics(
                {
                    **{f"val_{name}_before": v for name, v in scores["before"].items()},
                    **{f"val_{name}_after": v for name, v in scores["after"].items()},
                    "val_coverage": scores["coverage"],
                    **{f"val_sure_{name}_{k}": v for name, sure in scores["sure"].items() for k, v in sure.items()},
                }
            )
            # The names the predictor looks for in a model's run.
            mlflow.log_dict(file, "calibration.json")
            mlflow.log_artifact(str(gate_file(kind)), "gate")
            tracking.log_keras_model(calibrated_model, data["x_val"][:1], name="calibrated_model")
        tracking.tag_model_version(
            run_file, {key: file[key] for key in ("temperature", "soft_temperature", "not_sure_below")}
        )
        before, after = scores["before"], scores["after"]
        worst = min(scores["sure"], key=lambda name: scores["sure"][name]["accepted_accuracy"])
        print(
            f"calibrate {kind}: temperature {file['temperature']:.3f} ({file['soft_temperature']:.3f} for soft "
            f"images); validation ECE {before['ece']:.2%} -> {after['ece']:.2%}, NLL {before['nll']:.4f} -> "
            f"{after['nll']:.4f}; not sure below {file['not_sure_below']:.2%} (keeps "
            f"{scores['coverage']:.2%} of clean validation answers, {scores['accepted_accuracy']:.2%} right; "
            f"sure answers at worst {scores['sure'][worst]['accepted_accuracy']:.2%} right, on {worst}); "
            f"not-a-digit gate fitted on {scores['gate_training_non_digits']:,} generated non-digits",
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
