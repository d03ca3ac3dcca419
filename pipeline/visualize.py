"""Stage visualize: the figures people look at, as PNG under reports/figures/.

  training_curves.png       accuracy and loss per epoch, training and validation, both models
  confusion_<model>.png     confusion matrix heatmap
  predictions_<model>.png   random test images, predicted vs actual, mistakes in red
  mistakes_<model>.png      the model's most confident mistakes
  reliability.png           accuracy against confidence, before and after calibration, both models
  risk_coverage.png         error rate of the answers kept against the share kept, both models,
                            with the "not sure" threshold marked
  robustness.png            test images under each shift, and each model's accuracy
  sure_under_shift.png      on the clean and each shifted test copy: the share of answers that are
                            sure, and how many of those are right, against the validation promise
  samples.png               examples of each digit and the class distribution of each split
  reading_examples.png      numbers read by the reader (read_eval), each digit's box and answer,
                            right in green and wrong in red, "not sure" digits dashed
Each model's figures (and the shared ones) are added to its MLflow training run.
"""

import json

import matplotlib

matplotlib.use("Agg")  # files only; no display needed

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from pipeline.core import params as params_module
from pipeline.core import tracking
from pipeline.core.files import atomic_path, load_arrays, require
from pipeline.core.layout import (
    DATA_STATS_FILE,
    EVAL_DIR,
    FIGURES_DIR,
    MODELS,
    PROCESSED_DIR,
    READING_EXAMPLES_DIR,
    ROBUSTNESS_FILE,
    TRAIN_REPORTS_DIR,
)
from pipeline.core.shifts import corruptions
from pipeline.core.trust import confidence

NAMES = MODELS  # what figures call each model


def save(fig, name):
    path = FIGURES_DIR / name
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


def training_curves(histories):
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, metric, label in [(axes[0], "accuracy", "Accuracy"), (axes[1], "loss", "Loss")]:
        for (model, history), color in zip(histories.items(), ("tab:blue", "tab:orange"), strict=True):
            ax.plot(
                history.epoch,
                history[metric],
                color=color,
                linestyle="--",
                marker=".",
                label=f"{NAMES[model]} training",
            )
            ax.plot(
                history.epoch, history[f"val_{metric}"], color=color, marker="o", label=f"{NAMES[model]} validation"
            )
        ax.set(title=f"{label} per epoch", xlabel="Epoch", ylabel=label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Training curves (training metrics are on augmented images)")
    return fig


def confusion(model, matrix):
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    matrix = np.asarray(matrix)
    # Log colour scale: the diagonal holds ~1,000 per class, mistakes a handful, and both should show.
    sns.heatmap(
        matrix,
        annot=True,
        fmt="d",
        cmap="Blues",
        ax=ax,
        cbar_kws={"label": "images"},
        norm=matplotlib.colors.LogNorm(vmin=1, vmax=max(matrix.max(), 2)),
        annot_kws={"size": 8},
    )
    errors = int(matrix.sum() - np.trace(matrix))
    ax.set(
        title=f"{NAMES[model]} confusion matrix on the test set ({errors} errors)",
        xlabel="Predicted digit",
        ylabel="Actual digit",
    )
    return fig


def image_grid(images, titles, colors, suptitle, columns=5):
    rows = int(np.ceil(len(images) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.8, rows * 2.0), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, title, color in zip(axes.flat, images, titles, colors, strict=False):  # the grid may have spare axes
        ax.imshow(image.squeeze(), cmap="gray_r")
        ax.set_title(title, color=color, fontsize=10)
    fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def prediction_grid(model, x_test, predictions, count, seed):
    chosen = np.sort(np.random.default_rng(seed).choice(len(predictions), size=count, replace=False))
    rows = predictions.iloc[chosen]
    return image_grid(
        x_test[chosen],
        [f"pred {r.predicted} / true {r.actual}" for r in rows.itertuples()],
        ["black" if r.predicted == r.actual else "red" for r in rows.itertuples()],
        f"{NAMES[model]}: random test images (mistakes in red)",
    )


def confident_mistakes(model, x_test, predictions, count):
    mistakes = predictions[predictions.predicted != predictions.actual]
    worst = mistakes.sort_values("confidence", ascending=False).head(count)
    return image_grid(
        x_test[worst.index.to_numpy()],
        [f"pred {r.predicted} ({r.confidence:.0%})\ntrue {r.actual}" for r in worst.itertuples()],
        ["red"] * len(worst),
        f"{NAMES[model]}: most confident mistakes ({len(mistakes)} in all)",
    )


def reliability(predictions, bins=15):
    """Calibrated confidences lie on the diagonal: of the answers given with 80 % confidence, 80 % are right."""
    fig, axes = plt.subplots(1, len(predictions), figsize=(6 * len(predictions), 5), squeeze=False)
    edges = np.linspace(0, 1, bins + 1)
    for ax, (model, frame) in zip(axes[0], predictions.items(), strict=True):
        correct = (frame.predicted == frame.actual).to_numpy()
        for column, label, color in [("raw_confidence", "model", "tab:gray"), ("confidence", "calibrated", "tab:blue")]:
            which = np.clip(np.digitize(frame[column], edges) - 1, 0, bins - 1)
            used = [b for b in range(bins) if np.any(which == b)]
            ax.plot(
                [frame[column][which == b].mean() for b in used],
                [correct[which == b].mean() for b in used],
                marker="o",
                color=color,
                label=label,
            )
        ax.plot([0, 1], [0, 1], linestyle=":", color="black", label="perfect calibration")
        ax.set(
            title=f"{NAMES[model]} on the test set",
            xlabel="Confidence (mean per bin)",
            ylabel="Accuracy in the bin",
            xlim=(0, 1.01),
            ylim=(0, 1.01),
        )
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left")
    fig.suptitle(f"Reliability diagram ({bins} confidence bins; temperature fitted on validation)")
    return fig


def risk_coverage(predictions):
    """Refusing the least confident answers: how many are kept, and how many of those are wrong."""
    fig, ax = plt.subplots(figsize=(7.5, 5))
    lowest_coverage = 1.0
    for (model, frame), color in zip(predictions.items(), ("tab:blue", "tab:orange"), strict=True):
        _, accuracy_of_top = confidence.most_confident_first(
            frame.confidence.to_numpy(), (frame.predicted == frame.actual).to_numpy()
        )
        kept = np.arange(1, len(frame) + 1) / len(frame)
        ax.plot(kept, 1 - accuracy_of_top, color=color, label=NAMES[model])
        sure = ~frame.not_sure.to_numpy(bool)
        lowest_coverage = min(lowest_coverage, sure.mean())
        sure_errors = np.mean(frame.predicted[sure] != frame.actual[sure]) if sure.any() else 0.0
        ax.plot([sure.mean()], [sure_errors], marker="o", color=color, label=f'{NAMES[model]} "not sure" threshold')
    ax.set(
        title="Risk-coverage on the test set",
        xlabel="Coverage (share of answers kept, most confident first)",
        ylabel="Error rate of the kept answers",
        xlim=(min(0.9, lowest_coverage - 0.02), 1.001),
    )
    ax.axhline(0.001, linestyle=":", color="black", label="0.1 % error")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def robustness(report, x_test, params, examples=4):
    names = list(params.shifts.strengths)
    fig = plt.figure(figsize=(1.1 * len(names) + 2, 7))
    grid = fig.add_gridspec(examples + 4, len(names) + 1)
    for column, name in enumerate(["clean", *names]):
        images = (
            x_test[:examples]
            if name == "clean"
            else corruptions.corrupt(x_test[:examples], name, params.shifts.strengths[name], 0)
        )
        for row in range(examples):
            ax = fig.add_subplot(grid[row, column])
            ax.imshow(images[row].squeeze(), cmap="gray_r")
            ax.axis("off")
            if row == 0:
                ax.set_title(name.replace("_", " "), fontsize=9)
    bars = fig.add_subplot(grid[examples + 1 :, :])
    accuracy = pd.DataFrame(
        {
            NAMES[model]: [
                scores["clean_accuracy"],
                *(scores["corrupted"][n] for n in names),
                scores["corrupted"]["mean_accuracy"],
            ]
            for model, scores in report.items()
        },
        index=["clean", *(n.replace("_", " ") for n in names), "mean shifted"],
    )
    accuracy.plot.bar(ax=bars, rot=15)
    bars.set(ylabel="Test accuracy", ylim=(0, 1))
    bars.axhline(0.98, linestyle=":", color="black", label="98 %")
    bars.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle("Shifted copies of the test images (pipeline/core/shifts/corruptions.py, params.yaml shifts)")
    return fig


def sure_under_shift(report, accepted_accuracy, accepted_accuracy_under_shift):
    """Does "sure" keep its promise off MNIST? Per test copy: how many answers are sure, and how many
    of those are right, against the promise on clean digits and the one under shift."""
    fig, (share, right) = plt.subplots(1, 2, figsize=(16, 4.5))
    copies = list(next(iter(report.values()))["sure"])
    labels = [name.replace("_", " ") for name in copies]
    for key, ax, ylabel in [
        ("coverage", share, "Share of answers that are sure"),
        ("accepted_accuracy", right, "Sure answers that are right"),
    ]:
        frame = pd.DataFrame(
            {NAMES[model]: [scores["sure"][name][key] for name in copies] for model, scores in report.items()},
            index=labels,
        )
        frame.plot.bar(ax=ax, rot=45)
        ax.set(ylabel=ylabel)
    share.set_ylim(0, 1)
    lowest = min(scores["sure"][name]["accepted_accuracy"] for scores in report.values() for name in copies)
    right.set_ylim(min(0.95, np.floor(lowest * 50) / 50), 1.0)  # every bar shows, down to the 2 % below it
    right.axhline(accepted_accuracy, linestyle=":", color="black", label=f"clean promise ({accepted_accuracy:.1%})")
    right.axhline(
        accepted_accuracy_under_shift,
        linestyle="--",
        color="grey",
        label=f"under shift ({accepted_accuracy_under_shift:.1%})",
    )
    right.legend(loc="lower left")
    fig.suptitle('"Not sure" under shift: fitted on clean and shifted validation copies, measured on test copies')
    fig.tight_layout()
    return fig


def reading_examples(images, readings, columns=2):
    """The read_eval stage's example numbers: each digit's box, what was read, and the truth."""
    from matplotlib.patches import Rectangle

    rows = -(-len(readings) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6.5 * columns, 1.6 * rows), squeeze=False)
    for ax, image, found in zip(axes.flat, images, readings, strict=False):
        ax.imshow(image, cmap="gray", vmin=0, vmax=255)
        right = found["read"] == found["text"]
        for digit in found["digits"]:
            left, top, end, bottom = digit["box"]
            ax.add_patch(
                Rectangle(
                    (left - 0.5, top - 0.5),
                    end - left,
                    bottom - top,
                    fill=False,
                    color="tab:green" if right else "tab:red",
                    linestyle="--" if digit["not_sure"] else "-",
                )
            )
            ax.text(left, top - 1, digit["digit"], color="tab:blue", fontsize=9, va="bottom")
        sure = "sure" if found["sure"] else "not sure"
        ax.set_title(f"read {found['read']} ({sure}); written {found['text']}", fontsize=9)
        ax.axis("off")
    for ax in axes.flat[len(readings) :]:
        ax.axis("off")
    fig.suptitle("Numbers written from test digits, read digit by digit (rows: clear, tight, touching, overlapping)")
    fig.tight_layout()
    return fig


def samples(x_test, labels, stats, per_digit=8):
    fig = plt.figure(figsize=(13, 6.5))
    grid = fig.add_gridspec(10, per_digit + 6)
    for digit in range(10):
        for i, index in enumerate(np.flatnonzero(labels == digit)[:per_digit]):
            ax = fig.add_subplot(grid[digit, i])
            ax.imshow(x_test[index].squeeze(), cmap="gray_r")
            ax.axis("off")
    bars = fig.add_subplot(grid[1:9, per_digit + 1 :])
    counts = pd.DataFrame({split: s["class_counts"] for split, s in stats.items()}).astype(int)
    counts.plot.bar(ax=bars, rot=0)
    bars.set(title="Images per digit in each split", xlabel="Digit", ylabel="Images")
    bars.legend(title="Split")
    fig.suptitle("Test images of each digit (rows 0-9) and the class distribution")
    return fig


def visualize(params):
    import mlflow

    x_test = load_arrays(PROCESSED_DIR, ["x_test"])["x_test"]
    require(
        DATA_STATS_FILE,
        ROBUSTNESS_FILE,
        READING_EXAMPLES_DIR / "readings.json",
        *(TRAIN_REPORTS_DIR / f"{model}_history.csv" for model in MODELS),
        *(EVAL_DIR / f"{model}_{what}" for model in MODELS for what in ("predictions.csv", "report.json")),
    )
    histories = {model: pd.read_csv(TRAIN_REPORTS_DIR / f"{model}_history.csv") for model in MODELS}
    predictions = {model: pd.read_csv(EVAL_DIR / f"{model}_predictions.csv") for model in MODELS}
    reports = {model: json.loads((EVAL_DIR / f"{model}_report.json").read_text()) for model in MODELS}
    stats = json.loads(DATA_STATS_FILE.read_text())
    count = min(params.visualize.grid_images, len(x_test))

    shared = [
        save(training_curves(histories), "training_curves.png"),
        save(samples(x_test, predictions["cnn"].actual.to_numpy(), stats), "samples.png"),
        save(reliability(predictions), "reliability.png"),
        save(risk_coverage(predictions), "risk_coverage.png"),
        save(robustness(json.loads(ROBUSTNESS_FILE.read_text()), x_test, params), "robustness.png"),
        save(
            sure_under_shift(
                json.loads(ROBUSTNESS_FILE.read_text()),
                params.calibrate.accepted_accuracy,
                params.calibrate.accepted_accuracy_under_shift,
            ),
            "sure_under_shift.png",
        ),
        save(
            reading_examples(
                load_arrays(READING_EXAMPLES_DIR, ["images"])["images"],
                json.loads((READING_EXAMPLES_DIR / "readings.json").read_text()),
            ),
            "reading_examples.png",
        ),
    ]
    figures = {
        model: shared
        + [
            save(confusion(model, reports[model]["confusion_matrix"]), f"confusion_{model}.png"),
            save(prediction_grid(model, x_test, predictions[model], count, params.seed), f"predictions_{model}.png"),
            save(confident_mistakes(model, x_test, predictions[model], min(count, 15)), f"mistakes_{model}.png"),
        ]
        for model in MODELS
    }

    tracking.use_experiment(params.mlflow.experiment)
    for model, paths in figures.items():
        with tracking.run(run_id=tracking.read_run_id(model)):
            for path in paths:
                mlflow.log_artifact(str(path), "figures")
    print(f"visualize: wrote {len(set(sum(figures.values(), [])))} figures to {FIGURES_DIR}/", flush=True)


def main():
    params_module.run_stage("visualize", visualize)


if __name__ == "__main__":
    main()
