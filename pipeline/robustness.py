"""Stage robustness: both models on corrupted copies of the test images.

Real handwriting is slanted, rotated, small, off-centre, thick or thin, blurred, noisy or scanned
at low resolution; MNIST's test images are none of these. Each corruption in params.yaml's
`robustness` section (pipeline/core/shifts/corruptions.py, MNIST-C style) makes one copy of the test set,
the same for the same seed. Like evaluate, this stage only measures: nothing here chooses
anything. Writes
  reports/robustness.json  per model: clean test accuracy, accuracy under each corruption and
                           their mean (dvc metrics: `cnn.corrupted.mean_accuracy` ...); and with
                           the calibrate stage's temperatures and "not sure" threshold, on the
                           clean and each corrupted copy, the share of answers that are sure and
                           how many of those are right (`cnn.sure.low_resolution.accepted_accuracy`)
and adds the same to each model's MLflow training run.
"""

import numpy as np

from pipeline.core import params as params_module
from pipeline.core import tracking
from pipeline.core.files import load_arrays, require, write_json
from pipeline.core.layout import MODELS, PROCESSED_DIR, ROBUSTNESS_FILE, calibration_file, model_file
from pipeline.core.shifts import corruptions
from pipeline.core.trust import confidence


def measure(params):
    data = load_arrays(PROCESSED_DIR, ["x_test", "y_test"])
    require(*map(model_file, MODELS), *map(calibration_file, MODELS))
    import keras  # after the checks: a missing input is named at once, not after TensorFlow's start
    import mlflow

    x_test, labels = data["x_test"], data["y_test"].argmax(axis=1)
    copies = corruptions.corrupted_copies(x_test, params)
    tracking.use_experiment(params.mlflow.experiment)

    report = {}
    for model_name in MODELS:
        model = keras.models.load_model(model_file(model_name), compile=False)
        calibration = confidence.read_calibration(calibration_file(model_name))
        probabilities = {
            name: confidence.calibrated(model.predict(images, batch_size=1000, verbose=0), images, calibration)
            for name, images in {"clean": x_test, **copies}.items()
        }
        accuracy = {name: float(np.mean(p.argmax(axis=1) == labels)) for name, p in probabilities.items()}
        per_corruption = {name: accuracy[name] for name in copies}
        report[model_name] = {
            "clean_accuracy": accuracy["clean"],
            "corrupted": {"mean_accuracy": float(np.mean(list(per_corruption.values()))), **per_corruption},
            # What the "not sure" promise (sure answers are accepted_accuracy right) keeps off MNIST.
            "sure": {
                name: confidence.selective_scores(p, labels, calibration["not_sure_below"])
                for name, p in probabilities.items()
            },
        }
        with tracking.run(run_id=tracking.read_run_id(model_name)):
            mlflow.log_metrics(
                {
                    "test_corrupted_mean_accuracy": report[model_name]["corrupted"]["mean_accuracy"],
                    **{f"test_corrupted_{name}_accuracy": v for name, v in per_corruption.items()},
                    **{
                        f"test_sure_{name}_{key}": value
                        for name, scores in report[model_name]["sure"].items()
                        for key, value in scores.items()
                    },
                }
            )
        worst = min(per_corruption, key=per_corruption.get)
        sure = report[model_name]["sure"]
        least_sure = min(copies, key=lambda name: sure[name]["accepted_accuracy"])
        print(
            f"robustness {model_name}: clean {report[model_name]['clean_accuracy']:.2%}, corrupted mean "
            f"{report[model_name]['corrupted']['mean_accuracy']:.2%} over {len(copies)} corruptions "
            f"(worst: {worst} {per_corruption[worst]:.2%}); sure answers right: clean "
            f"{sure['clean']['accepted_accuracy']:.2%}, at worst {sure[least_sure]['accepted_accuracy']:.2%} "
            f"({least_sure}, {sure[least_sure]['coverage']:.1%} of its answers sure)",
            flush=True,
        )
    write_json(ROBUSTNESS_FILE, report)


def main():
    params_module.run_stage("robustness", measure)


if __name__ == "__main__":
    main()
