"""`digits finetune` end to end, on a real domain shift: printed digits rendered from the fonts
matplotlib ships (small type, as a scanner sees it), each font only in the fine-tuning share or only
in the held-out one. It starts from a briefly trained CNN (conftest.trained_model_file), fine-tunes
for a few epochs against a small slice of real MNIST, and registers a version in a real MLflow
store. What it reaches at full size is bench/finetune.py's job."""

import json
import re
import shutil

import numpy as np
import pytest

from bench import printed
from pipeline.core.files import sha256


@pytest.fixture
def finetune_project(project, mnist, trained_model_file):
    """A project folder with real MNIST splits (small), the trained CNN and its calibration."""
    from pipeline import preprocess
    from pipeline.core.files import save_arrays

    project(calibrate__nondigits_per_kind=30)
    x, y = preprocess.scale(mnist["x_train"][:4000]), preprocess.one_hot(mnist["y_train"][:4000])
    x_test, y_test = preprocess.scale(mnist["x_test"][:2000]), preprocess.one_hot(mnist["y_test"][:2000])
    save_arrays(
        project.path / "data/processed",
        {
            "x_train": x[:3000],
            "y_train": y[:3000],
            "x_val": x[3000:],
            "y_val": y[3000:],
            "x_test": x_test,
            "y_test": y_test,
        },
    )
    models = project.path / "models"
    models.mkdir()
    for path in trained_model_file.parent.iterdir():
        shutil.copy(path, models / path.name)
    return project.path


def registered_versions():
    from mlflow import MlflowClient

    from pipeline.core import tracking

    return MlflowClient(tracking.tracking_uri()).search_model_versions()  # this test's own store


def run(*argv):
    from pipeline import cli

    return cli.main(["finetune", *map(str, argv)])


def test_fine_tuning_on_printed_digits_improves_them_and_registers_a_version_with_lineage(finetune_project, capsys):
    from mlflow import MlflowClient

    from pipeline.core import params
    from pipeline.serving.predictor import Predictor

    labels = printed.write_labelled_folder(finetune_project / "printed", printed.FONTS, 2, seed=1, sizes=printed.SMALL)
    out = finetune_project / "models/finetuned.keras"
    # The brief CNN's 1,000 validation digits: a digit is 0.1 points, the default --max-mnist-loss.
    assert run(labels, "--epochs", 4, "--seed", 3, "--max-mnist-loss", 0.02) == 0
    said = capsys.readouterr().out
    assert "registered digits-cnn v1, the champion did not move" in said

    (version,) = registered_versions()
    client = MlflowClient()
    metrics = client.get_run(version.run_id).data.metrics
    assert metrics["after_held_out_accuracy"] >= metrics["before_held_out_accuracy"] + 0.03, metrics
    assert metrics["after_held_out_accuracy"] >= 0.9, metrics
    assert metrics["after_mnist_test_accuracy"] >= metrics["before_mnist_test_accuracy"] - 0.02, metrics
    # The kept epoch reads MNIST's validation digits at most --max-mnist-loss worse.
    assert metrics["after_mnist_val_accuracy"] >= metrics["before_mnist_val_accuracy"] - 0.02, metrics
    assert version.tags["parent_sha256"] == sha256(finetune_project / "models/cnn.keras")
    assert version.tags["parent_model"] == "models/cnn.keras"
    assert not client.get_registered_model("digits-cnn").aliases  # no champion unless asked

    # The held-out share is whole fonts the fine-tuning never saw.
    inputs = client.get_run(version.run_id).inputs.dataset_inputs
    assert {i.dataset.name for i in inputs} == {"finetune", "held-out"}
    calibration = json.loads((finetune_project / "models/finetuned.calibration.json").read_text())
    assert calibration["model_sha256"] == sha256(out)
    parent = json.loads((finetune_project / "models/cnn.calibration.json").read_text())
    doubts = (
        f'"not sure" below {calibration["not_sure_below"]:.2%} confidence (the parent: {parent["not_sure_below"]:.2%})'
    )
    assert doubts in said, said
    # The calibrate stage's shift-aware rule: its own temperature for soft (faint and smooth) images.
    assert 0 < calibration["soft_from"] <= 1 and calibration["soft_temperature"] >= calibration["temperature"]
    assert calibration["smooth_below"] in params.load(finetune_project / "params.yaml").calibrate.smooth_below
    predictor = Predictor(out)  # the ONNX graph beside it, as `digits predict --model` loads it
    assert predictor.calibration["smooth_below"] == calibration["smooth_below"]
    answer, _ = predictor.predict(np.stack([printed_digit(7)]))
    assert answer.argmax() == 7


def test_one_round_of_review_teaches_the_model_the_images_it_was_not_sure_of(finetune_project):
    """predict --review on printed digits, a person's labels (the truth), finetune on the review
    folder, and the new version answers the reviewed images better (bench/review.py's round)."""
    from bench import review as review_round

    shorter = ("--epochs", 4, "--max-mnist-loss", 0.02)  # as in the test above
    # The corrections alone: this brief CNN, new to print, is sure of much it reads wrong, and its
    # own answers would teach it those (test_review.py covers --review-sure's folder).
    result = review_round.loop("models/cnn.keras", finetune_project / "loop", 16, 500, 1, shorter, sure_too=False)
    before, after = result["parent"]["first batch"], result["fine-tuned"]["first batch"]
    assert 0 < result["corrections"] <= 500 and before["sent_to_review"] > 0, result
    assert after["accuracy"] >= before["accuracy"] + 0.05, result
    assert result["fine-tuned"]["second batch"]["accuracy"] > result["parent"]["second batch"]["accuracy"], result
    (version,) = registered_versions()
    assert version.tags["parent_model"] == "models/cnn.keras"
    # Over rounds, a refused one is counted and left out of the spread.
    summary = review_round.summary({"1": result, "2": {"refused": "it would forget MNIST"}})
    assert summary["refused"] == 1 and summary["review_share_ratio"]["mean"] == result["review_share_ratio"]
    assert summary["mnist_test_after_min"] == result["mnist"]["after"]["mnist_test"] > 0.5, summary


def test_fine_tuning_on_its_own_sure_answers_keeps_the_models_shifts():
    """Rules 45 and 46 (docs/team.md): learning thousands of its own answers of one new kind, the
    model keeps reading shifted handwriting only if the shift table stays in its batches."""
    from pipeline.core import params
    from pipeline.serving import finetune

    cnn, args = params.load().cnn, finetune.arguments(["review/"])
    assert finetune.recipe(cnn, args).augment.shift_share == 0.0
    assert finetune.recipe(cnn, args, self_trained=True).augment.shift_share == cnn.augment.shift_share > 0


def printed_digit(digit):
    from pipeline.core import normalize

    return normalize.to_mnist(printed.render(digit, "DejaVuSans", np.random.default_rng(0), printed.LARGE))


@pytest.mark.parametrize(
    "case, message",
    [
        ("unreadable", "cannot read .*broken.png"),
        ("label", r"labels.csv line \d+: label '12' of .* is not a digit 0-9"),
        ("too_few", "3 images of the digit 4: at least 10 of each"),
        ("no_calibration", "has no calibration"),
        ("no_csv", "no such CSV file or folder"),
        ("forgets_mnist", r"fewer than .* of MNIST's validation digits .*: nothing was written or registered"),
    ],
)
def test_bad_input_is_refused_naming_it_and_nothing_is_registered(finetune_project, capsys, case, message):
    labels = printed.write_labelled_folder(finetune_project / "printed", printed.FONTS[:2], 6, seed=0)
    rows = labels.read_text().splitlines()
    model = "models/cnn.keras"
    if case == "unreadable":
        (labels.parent / "broken.png").write_bytes(b"not an image")
        rows.append("broken.png,3,x")
    elif case == "label":
        rows[5] = rows[5].replace(",0,", ",12,")
    elif case == "too_few":
        rows = [r for r in rows if ",4," not in r] + [r for r in rows if ",4," in r][:3]
    elif case == "no_calibration":
        (finetune_project / "bare").mkdir()
        shutil.copy(finetune_project / model, finetune_project / "bare/cnn.keras")
        model = "bare/cnn.keras"
    elif case == "no_csv":
        labels = labels.with_name("missing.csv")
    if labels.exists():
        labels.write_text("\n".join(rows) + "\n")
    # A learning rate this high wrecks what the model knew: no epoch keeps MNIST.
    too_fast = ["--learning-rate", 1.0] if case == "forgets_mnist" else []
    assert run(labels, "--model", model, "--epochs", 1, *too_fast) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not registered_versions()
    assert not list((finetune_project / "models").glob("finetuned*"))


def test_the_held_out_split_keeps_every_digit_on_both_sides_or_says_which_it_cannot():
    """Whole groups (writers, page visits) can leave a digit on one side; another random split is
    tried before giving up, and the digit is named when none works."""
    from pipeline.serving.finetune import FinetuneError, held_out

    # Ten writers; the 2s come from only two of them, so many splits hold out no 2.
    labels = np.array([d for writer in range(10) for d in ([2] * 6 if writer < 2 else [0, 1] * 6)])
    groups = np.array([writer for writer in range(10) for _ in range(6 if writer < 2 else 12)])
    train, hold = held_out(labels, groups, 0.2, seed=0)
    assert {0, 1, 2} <= set(labels[train]) and {0, 1, 2} <= set(labels[hold])
    assert not set(groups[train]) & set(groups[hold])
    only_one_writes_twos = np.array([2] * 12 + [0, 1] * 6 * 9)
    with pytest.raises(FinetuneError, match="has no image of the digit 2 in 20 random splits"):
        held_out(only_one_writes_twos, np.repeat(np.arange(10), 12), 0.2, seed=0)
