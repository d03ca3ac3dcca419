"""Stage evaluate: both models on the test images, which no earlier stage has looked at.

Writes
  reports/metrics.json                 per model: test accuracy with its 95 % Wilson interval,
                                       loss, errors, macro P/R/F1, throughput; calibration error
                                       and NLL before and after the calibrate stage's temperature;
                                       coverage and accuracy of the answers above its "not sure"
                                       threshold; the share of test digits and of generated
                                       non-digits (pipeline.core.trust.nondigits, a seed and fonts the gate
                                       was not fitted on) that the "not a digit" gate flags
                                       (dvc metrics: `cnn.test.accuracy` ...)
  reports/eval/<model>_report.json     per-class P/R/F1, confusion matrix, most confused pairs
  reports/eval/<model>_predictions.csv actual, predicted, calibrated and raw confidence, not sure,
                                       per test image in test-set order (dvc plots draws the
                                       confusion matrix from it)
and adds the test metrics, the test set (as a run input) and these files to each model's MLflow
training run, and the test accuracy to its registered model version.
"""

import io
import time

import numpy as np
import pandas as pd
from scipy.stats import binomtest
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from pipeline.core import params as params_module
from pipeline.core import tracking
from pipeline.core.files import load_arrays, require, write_json, write_text
from pipeline.core.layout import (
    DIGITS,
    EVAL_DIR,
    METRICS_FILE,
    MODELS,
    PROCESSED_DIR,
    calibration_file,
    gate_file,
    model_file,
)
from pipeline.core.trust import confidence, gate, nondigits


def predict_timed(model, x, batch_size, passes=3):
    """Probabilities for x, and the throughput of the fastest of `passes` timed passes made after
    a warm-up. The fastest, as timeit reports it: other load on a shared machine only ever slows a
    pass down."""
    model.predict(x[:batch_size], batch_size=batch_size, verbose=0)
    best = 0.0
    for _ in range(passes):
        start = time.perf_counter()
        probabilities = model.predict(x, batch_size=batch_size, verbose=0)
        best = max(best, len(x) / (time.perf_counter() - start))
    return probabilities, best


def most_confused(matrix, top=5):
    off_diagonal = [(int(matrix[a, p]), a, p) for a in DIGITS for p in DIGITS if a != p and matrix[a, p]]
    return [{"actual": a, "predicted": p, "count": n} for n, a, p in sorted(off_diagonal, reverse=True)[:top]]


def score(probabilities, labels):
    """Every number the stage reports, from predicted probabilities and true labels (ints)."""
    predicted = probabilities.argmax(axis=1)
    eps = 1e-7
    loss = float(-np.mean(np.log(np.clip(probabilities[np.arange(len(labels)), labels], eps, 1.0))))
    precision, recall, f1, support = precision_recall_fscore_support(labels, predicted, labels=DIGITS, zero_division=0)
    matrix = confusion_matrix(labels, predicted, labels=DIGITS)
    correct = int(np.sum(predicted == labels))
    # How far another draw of 10,000 test images could move the accuracy (95 %, Wilson score).
    low, high = binomtest(correct, len(labels)).proportion_ci(0.95, method="wilson")
    summary = {
        "accuracy": correct / len(labels),
        "accuracy_ci95_low": float(low),
        "accuracy_ci95_high": float(high),
        "loss": loss,
        "errors": int(np.sum(predicted != labels)),
        "precision_macro": float(precision.mean()),
        "recall_macro": float(recall.mean()),
        "f1_macro": float(f1.mean()),
    }
    report = {
        "per_class": {
            str(d): {
                "precision": float(precision[d]),
                "recall": float(recall[d]),
                "f1": float(f1[d]),
                "support": int(support[d]),
            }
            for d in DIGITS
        },
        "confusion_matrix": matrix.tolist(),
        "most_confused": most_confused(matrix),
    }
    return summary, report, predicted


def trust_scores(raw, images, labels, calibration):
    """How far the calibrated confidences can be trusted on the test images."""
    calibrated = confidence.calibrated(raw, images, calibration)
    before, after = confidence.calibration_scores(raw, labels), confidence.calibration_scores(calibrated, labels)
    return calibrated, {
        "calibration": {
            "temperature": calibration["temperature"],
            "soft_temperature": calibration.get("soft_temperature", calibration["temperature"]),
            **{f"{name}_before": v for name, v in before.items()},
            **{f"{name}_after": v for name, v in after.items()},
        },
        "not_sure": {
            "threshold": calibration["not_sure_below"],
            **confidence.selective_scores(calibrated, labels, calibration["not_sure_below"]),
        },
    }


def gate_scores(model, fitted_gate, x_test, non_digits):
    """Share of the test digits the "not a digit" gate flags, and of each model_name of non-digit."""
    features = gate.with_features(model)

    def flagged(images):
        return fitted_gate.not_a_digit(features.predict(images, batch_size=1000, verbose=0)[1], images)

    per_kind = {model_name: float(flagged(images).mean()) for model_name, images in non_digits.items()}
    return {
        "digits_flagged": float(flagged(x_test).mean()),
        # The same digits as an upload of each reaches the model: through normalize.to_mnist.
        "uploaded_digits_flagged": float(flagged(gate.to_mnist_forms(list(x_test[..., 0]))).mean()),
        "non_digits_flagged": float(np.mean(list(per_kind.values()))),
        **{f"{model_name}_flagged": share for model_name, share in per_kind.items()},
    }


def predictions_csv(labels, predicted, calibrated, raw, threshold):
    frame = pd.DataFrame(
        {
            "actual": labels,
            "predicted": predicted,
            "confidence": calibrated.max(axis=1).round(6),
            "raw_confidence": raw.max(axis=1).round(6),
            "not_sure": calibrated.max(axis=1) < threshold,
        }
    )
    out = io.StringIO()
    frame.to_csv(out, index=False)
    return out.getvalue()


def evaluate_models(params):
    data = load_arrays(PROCESSED_DIR, ["x_test", "y_test"])
    require(
        *map(model_file, MODELS),
        *map(calibration_file, MODELS),
        *map(gate_file, MODELS),
    )
    import keras  # after the checks: a missing input is named at once, not after TensorFlow's start
    import mlflow

    x_test, labels = data["x_test"], data["y_test"].argmax(axis=1)
    tracking.use_experiment(params.mlflow.experiment)
    # Another seed than calibrate's, test digits in the strips, and fonts the gate never saw.
    generated = nondigits.generate(params.evaluate.nondigits_per_kind, params.seed + 1, x_test, nondigits.EVAL_FONTS)
    non_digits = {model_name: gate.to_mnist_forms(images) for model_name, images in generated.items()}

    metrics = {}
    for model_name in MODELS:
        model, run_file = keras.models.load_model(model_file(model_name)), tracking.read_run_file(model_name)
        raw, images_per_second = predict_timed(model, x_test, params.evaluate.batch_size)
        summary, report, predicted = score(raw, labels)
        summary["images_per_second"] = round(images_per_second, 1)
        calibration = confidence.read_calibration(calibration_file(model_name))
        calibrated, trust = trust_scores(raw, x_test, labels, calibration)
        trust["not_a_digit"] = gate_scores(model, gate.load(gate_file(model_name)), x_test, non_digits)
        metrics[model_name] = {"test": {**summary, **trust}}

        report_path, predictions_path = (
            EVAL_DIR / f"{model_name}_report.json",
            EVAL_DIR / f"{model_name}_predictions.csv",
        )
        write_json(report_path, report)
        write_text(predictions_path, predictions_csv(labels, predicted, calibrated, raw, calibration["not_sure_below"]))
        with tracking.run(run_id=run_file["run_id"]):
            mlflow.log_input(mlflow.data.from_numpy(x_test, targets=data["y_test"], name="mnist-test"), context="test")
            mlflow.log_metrics({f"test_{k}": v for k, v in summary.items()})
            mlflow.log_metrics({f"test_{g}_{k}": v for g, scores in trust.items() for k, v in scores.items()})
            mlflow.log_metrics({f"test_recall_class_{d}": report["per_class"][str(d)]["recall"] for d in DIGITS})
            mlflow.log_artifact(str(report_path), "evaluation")
            mlflow.log_artifact(str(predictions_path), "evaluation")
        tracking.tag_model_version(run_file, {"test_accuracy": summary["accuracy"]})
        pairs = ", ".join(f"{c['actual']}->{c['predicted']} x{c['count']}" for c in report["most_confused"][:3])
        print(
            f"evaluate {model_name}: test accuracy {summary['accuracy']:.4f} "
            f"(95 % CI {summary['accuracy_ci95_low']:.4f}-"
            f"{summary['accuracy_ci95_high']:.4f}; {summary['errors']} errors in "
            f"{len(labels):,}), loss {summary['loss']:.4f}, {images_per_second:,.0f} images/s; "
            f"most confused {pairs or 'none'}\n"
            f"evaluate {model_name}: calibration error {trust['calibration']['ece_before']:.2%} -> "
            f"{trust['calibration']['ece_after']:.2%}; {trust['not_sure']['coverage']:.2%} of answers are sure "
            f'and {trust["not_sure"]["accepted_accuracy"]:.2%} of those are right; "not a digit" for '
            f"{trust['not_a_digit']['non_digits_flagged']:.1%} of generated non-digits and "
            f"{trust['not_a_digit']['digits_flagged']:.2%} of test digits "
            f"({trust['not_a_digit']['uploaded_digits_flagged']:.2%} of them as uploads)",
            flush=True,
        )

    write_json(METRICS_FILE, metrics)


def main():
    params_module.run_stage("evaluate", evaluate_models)


if __name__ == "__main__":
    main()
