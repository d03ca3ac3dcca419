"""`digits finetune`: adapt a trained model to your own labelled images (transfer learning).

    digits finetune LABELS.csv | FOLDER | REVIEW_FOLDER [--model models/cnn.keras] [--out models/finetuned.keras]
                    [--holdout 0.2] [--train all|head] [--epochs 10] [--max-mnist-loss 0.001]
                    [--champion]

The images come as a CSV (columns file, label and, optionally, group; files relative to the CSV),
as a folder with one sub-folder per digit (0/ ... 9/), or as a review folder that `--review`
filled and a person labelled (pipeline/serving/review.py: its filled digit rows, by group, with the
model's own sure answers that `--review-sure` put there). Each is read as an upload is
(normalize.to_mnist). A share is held out first, whole groups at a time when the CSV names them
(one writer, one font, one scanner), so that it measures images unlike the ones trained on. Then:
  1. the model (a .keras file or an MLflow URI, with its calibration) is fine-tuned on the rest,
     mixed with as many MNIST training digits so that it keeps reading handwriting, with small
     random rotations, shifts and zooms (and the model's `shifts` when it learns from its own sure
     answers too); every layer learns, or only the dense head (--train head).
     The weights are a moving average of the steps'. The last epoch that reads MNIST's validation
     digits at most --max-mnist-loss below the parent is kept; if none does, it stops there (nothing
     written or registered): it must not forget MNIST;
  2. it is calibrated again by the calibrate stage's rule (pipeline.core.trust.calibration): the
     temperatures and "not sure" threshold that keep the promise on the held-out share and on
     MNIST's validation split alike, and under shift on corrupted copies of the validation split;
     and a "not a digit" gate that knows these images;
  3. OUT.keras, .calibration.json, .gate.pkl and .onnx are written (all or none), so that
     `digits predict --model OUT.keras` serves it;
  4. an MLflow run records it: the parent model as lineage, accuracy before and after on the
     held-out share and on MNIST's test split; the model is registered as a new version of the
     parent's registered model. The champion alias moves only with --champion.
Bad input (an unreadable image, a label outside 0-9, too few images of a digit, a model without a
calibration) stops it before training, naming the file; nothing is written or registered then.
Needs MNIST's splits in data/processed (`dvc pull`, or `./dev repro preprocess`).
"""

import csv
import dataclasses
import json
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from pipeline.core import params as params_module
from pipeline.core.files import DataError, load_arrays, require, sha256, write_json
from pipeline.core.layout import DIGITS, NUM_CLASSES, PROCESSED_DIR, beside
from pipeline.serving import images, review

MIN_PER_DIGIT = 10  # images of each digit, so that both shares hold some
MIN_REVIEWED = 50  # labelled digits in a review folder, which holds what the model doubted (any digits)
REPEATS = 4  # each epoch sees every fine-tuning image this often (augmented), and as many MNIST digits
OWN_ANSWERS_MNIST = 3  # MNIST digits per repeated image when the model's own sure answers are among them (rule 47)
EMA_MOMENTUM = 0.99  # the weights kept are this moving average of the steps' (docs/team.md, rule 2)


class FinetuneError(ValueError):
    pass


class ForgetsMnist(FinetuneError):
    """No epoch kept MNIST's validation accuracy within --max-mnist-loss of the parent's."""


def labelled_files(source):
    """[(path, label, group or None)] from a CSV, a folder of digit sub-folders or a review folder."""
    source = Path(source)
    if review.is_review_folder(source):
        return reviewed_files(source)
    if source.is_dir():
        wrong = sorted(p.name for p in source.iterdir() if p.is_dir() and p.name not in map(str, DIGITS))
        if wrong:
            raise FinetuneError(f"{source}/{wrong[0]}: expected one sub-folder per digit, named 0 to 9")
        return [
            (path, int(folder.name), None)
            for folder in sorted(p for p in source.iterdir() if p.is_dir())
            for path in sorted(folder.iterdir())
            if path.suffix.lower() in images.IMAGE_SUFFIXES
        ]
    if not source.is_file():
        raise FinetuneError(f"{source}: no such CSV file or folder")
    with source.open(newline="") as f:
        reader = csv.DictReader(f)
        if not {"file", "label"} <= set(reader.fieldnames or ()):
            raise FinetuneError(f"{source}: expected a header with the columns file and label (and optionally group)")
        rows = []
        for line, row in enumerate(reader, start=2):
            label = (row["label"] or "").strip()
            if label not in map(str, DIGITS):
                raise FinetuneError(f"{source} line {line}: label {label!r} of {row['file']} is not a digit 0-9")
            rows.append((source.parent / row["file"], int(label), row.get("group") or None))
    return rows


def reviewed_files(folder):
    """labelled_files of a review folder: the digit rows a person has labelled with a digit."""
    try:
        rows = review.read_rows(folder)
    except review.ReviewError as e:
        raise FinetuneError(str(e)) from None
    labelled = []
    for line, row in enumerate(rows, start=2):
        label = row["label"].strip()
        if row["kind"] != "digit" or label in ("", review.NO_DIGIT):
            continue
        problem = review.label_problem(row)
        if problem:
            raise FinetuneError(f"{folder / review.LABELS} line {line}: {problem}")
        labelled.append((folder / row["file"], int(label), row["group"] or None))
    if len({group for _, _, group in labelled}) == 1:  # all from one folder: nothing to hold out by
        labelled = [(path, label, None) for path, label, _ in labelled]
    return labelled


def own_answers(source):
    """How many of a review folder's rows are the model's own sure answers (--review-sure)."""
    if not review.is_review_folder(source):
        return 0
    return sum(row["reason"] == review.SURE and row["label"].strip() != "" for row in review.read_rows(source))


def read_labelled(source):
    """Images in MNIST form (n, 28, 28, 1), labels (n,) and groups (n,) of a labelled set, checked."""
    files = labelled_files(source)
    read, errors = [], []
    for path, _, _ in files:
        _, image, error = images.read_image(path)
        errors.append(error) if error else read.append(image)
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise FinetuneError(f"cannot read {errors[0]}{more}")
    labels = np.array([label for _, label, _ in files])
    counts = np.bincount(labels, minlength=NUM_CLASSES)
    if review.is_review_folder(source):  # what the model doubted: digits it never doubts may be rare
        if len(labels) < MIN_REVIEWED:
            raise FinetuneError(f"{source}: {len(labels)} labelled digits: at least {MIN_REVIEWED} to fine-tune on")
    elif counts.min() < MIN_PER_DIGIT:
        digit = int(counts.argmin())
        raise FinetuneError(f"{source}: {counts[digit]} images of the digit {digit}: at least {MIN_PER_DIGIT} of each")
    groups = np.array([group or f"{path}" for path, _, group in files])
    return np.stack(read)[..., None], labels, groups


SPLITS_TRIED = 20  # random held-out splits tried until every digit is in both shares


def held_out(labels, groups, share, seed):
    """(fine-tuning indices, held-out indices): whole groups, or a stratified share. Each digit
    with MIN_PER_DIGIT images or more must be in both (every digit, in a set a user assembled): the
    first of SPLITS_TRIED random splits where it is (whole groups can leave a digit on one side)."""
    from sklearn.model_selection import GroupShuffleSplit, ShuffleSplit, StratifiedShuffleSplit

    counts = np.bincount(labels, minlength=NUM_CLASSES)
    needed = set(np.flatnonzero(counts >= MIN_PER_DIGIT).tolist())
    grouped = len(set(groups)) < len(groups)
    stratified = not grouped and counts[counts > 0].min() >= 2
    splitter = GroupShuffleSplit if grouped else StratifiedShuffleSplit if stratified else ShuffleSplit
    splits = splitter(SPLITS_TRIED, test_size=share, random_state=seed).split(np.zeros(len(labels)), labels, groups)
    problem = None
    for train, hold in splits:
        missing = [
            (name, sorted(needed - set(labels[part].tolist())))
            for name, part in (("fine-tuning", train), ("held-out", hold))
        ]
        missing = [(name, digits) for name, digits in missing if digits]
        if not missing:
            return train, hold
        problem = problem or missing[0]
    name, digits = problem
    raise FinetuneError(
        f"the {name} share has no image of the digit {digits[0]} in {SPLITS_TRIED} random splits: add images or groups"
    )


def parent_model(source):
    """The model to start from (a Predictor on TensorFlow: its .keras file and calibration), and
    what identifies it, for lineage."""
    from pipeline.serving.predictor import Predictor

    try:
        parent = Predictor(source, runtime="tf")
    except (FileNotFoundError, ValueError) as e:
        raise FinetuneError(str(e)) from None
    if parent.calibration is None:
        raise FinetuneError(f"{source}: the model has no calibration; run `dvc repro calibrate` (or `dvc pull`) first")
    lineage = {"parent_model": parent.source, "parent_sha256": sha256(parent.keras_path)}
    if parent.registered:
        lineage.update(parent_registered_model=parent.registered["name"], parent_version=parent.registered["version"])
    else:
        training_run = beside(parent.keras_path, "run")
        if training_run.exists():  # a pipeline model: its training run and registered version
            known = json.loads(training_run.read_text())
            lineage.update(parent_run_id=known["run_id"], parent_registered_model=known["registered_model"])
            if known.get("model_version"):
                lineage["parent_version"] = known["model_version"]
    return parent, {key: str(value) for key, value in lineage.items()}


def recipe(model_params, args, self_trained=False):
    """How fine-tuning trains: the model's own recipe (params.yaml), with these changes. A small
    constant rate (--learning-rate, decaying to zero) and no weight decay, so that it adapts rather
    than relearns; a moving average of the weights, which a few noisy steps on a few hundred images
    move less than the weights themselves; small random rotations, shifts and zooms, and no printed
    digits. The `shifts` only when `self_trained` (the model's own sure answers among the images):
    thousands of images of one new kind made it forget how shifted handwriting looks, and the
    calibration's promise on those copies then doubted the new kind too (docs/team.md, rules 24 and
    44-46)."""
    augment = dataclasses.replace(
        model_params.augment,
        rotation_degrees=10,
        shift_fraction=0.1,
        zoom_fraction=0.1,
        shift_share=model_params.augment.shift_share if self_trained else 0.0,
        printed_share=0.0,
    )
    return dataclasses.replace(
        model_params,
        batch_size=64,
        learning_rate=args.learning_rate,
        weight_decay=0.0,
        warmup_epochs=0,
        ema_momentum=EMA_MOMENTUM,
        augment=augment,
    )


def fine_tune(model, model_params, x, y, data, keep_from, args, shift_strengths, self_trained):
    """Train every layer (or the dense head only) on the user's images mixed with as many MNIST
    training digits (OWN_ANSWERS_MNIST times as many when `self_trained`), by the shared training
    loop (pipeline.core.training) and recipe(); keep the last epoch that reads at least `keep_from`
    of MNIST's validation digits. Returns that epoch, None if none did."""
    import keras

    from pipeline.core import training

    if args.train == "head":  # the layers after the convolutions' features are flattened
        flatten = max(i for i, layer in enumerate(model.layers) if isinstance(layer, keras.layers.Flatten))
        for layer in model.layers[: flatten + 1]:
            layer.trainable = False
    rng = np.random.default_rng(args.seed)
    per_image = OWN_ANSWERS_MNIST if self_trained else 1
    mnist = rng.choice(len(data["x_train"]), min(len(data["x_train"]), per_image * REPEATS * len(x)), replace=False)
    mixed = {
        "x_train": np.concatenate([np.repeat(x, REPEATS, axis=0), data["x_train"][mnist]]),
        "y_train": np.concatenate(
            [np.repeat(keras.utils.to_categorical(y, NUM_CLASSES), REPEATS, axis=0), data["y_train"][mnist]]
        ),
    }
    kept = {}

    class KeepsMnist(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            mnist_val = accuracy(model, data["x_val"], data["y_val"].argmax(1))
            keeps = mnist_val >= keep_from
            verdict = "may be kept" if keeps else "not kept"
            print(f"  MNIST validation {mnist_val:.2%} (the guard asks {keep_from:.2%}: {verdict})", flush=True)
            if keeps:
                kept.update(epoch=epoch + 1, weights=model.get_weights())

    settings = recipe(model_params, args, self_trained)
    training.compile_with_recipe(model, settings, args.epochs, len(mixed["x_train"]))
    # The guard judges the averaged weights: swapped into the model at each epoch's end, before it.
    averaged = keras.callbacks.SwapEMAWeights(swap_on_epoch=True)
    training.fit(
        model,
        settings,
        mixed,
        args.epochs,
        args.seed,
        shift_strengths,
        to_mlflow=False,
        callbacks=[averaged, KeepsMnist()],
        verbose=2,
    )
    if kept:
        model.set_weights(kept["weights"])
    return kept.get("epoch")


def recalibrate(model, held, data, params):
    """The calibration search of the calibrate stage on the held-out share and MNIST's validation
    digits (promised `calibrate.accepted_accuracy`) and corrupted copies of them (promised
    `calibrate.accepted_accuracy_under_shift`): (calibration, the sure answers on the held-out share)."""
    from pipeline.core.shifts import corruptions
    from pipeline.core.trust import calibration, confidence

    mnist = (data["x_val"], data["y_val"].argmax(1))
    shifted = corruptions.corrupted_copies(mnist[0], params)
    sets = {"clean": mnist, "held_out": held, **{name: (x, mnist[1]) for name, x in shifted.items()}}
    copies = calibration.copies_of(model, sets, clean={"clean", "held_out"})
    fitted, _ = calibration.search(copies, params.calibrate)
    held_answers = confidence.calibrated(copies["held_out"].raw, held[0], fitted)
    return fitted, confidence.selective_scores(held_answers, held[1], fitted["not_sure_below"])


def accuracy(model, x, labels):
    return float(np.mean(model.predict(x, batch_size=1000, verbose=0).argmax(1) == labels))


@contextmanager
def write_files(out, model, fitted_gate, calibration, x_check):
    """OUT.keras, .calibration.json, .gate.pkl and .onnx, all or none: each is made and checked in a
    scratch folder, and moved beside the others (one file system: each appears whole) only when the
    block that logs them ends without an error. Gives the staged files and the calibration written."""
    from pipeline.core.graph import convert
    from pipeline.core.trust import gate

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".finetune-") as folder:
        staged = {part: beside(Path(folder) / out.name, part) for part in ("keras", "calibration", "gate", "onnx")}
        model.save(staged["keras"])
        gate.save(fitted_gate, staged["gate"])
        calibration = {
            **calibration,
            "model_sha256": sha256(staged["keras"]),
            "gate_sha256": sha256(staged["gate"]),
        }
        write_json(staged["calibration"], calibration)
        convert.export(staged["keras"], staged["calibration"], staged["gate"], staged["onnx"], x_check)
        yield staged, calibration
        for part, path in staged.items():
            path.replace(beside(out, part))


def log_and_register(model, model_name, staged, calibration, lineage, record, args):
    """An MLflow run with the lineage, params, datasets, accuracies before and after and the files;
    the model registered as a new version of its parent's registered model. Returns the version."""
    import mlflow

    from pipeline.core import registry, tracking

    x, labels, train, hold = record["images"]
    with tracking.run(run_name=f"{model_name}-finetune", tags={**tracking.run_tags(model_name, "finetune"), **lineage}):
        mlflow.log_params(
            {
                "parent_model": args.model,
                "train": args.train,
                "epochs": args.epochs,
                "max_mnist_loss": args.max_mnist_loss,
                "kept_epoch": record["kept_epoch"],
                "learning_rate": args.learning_rate,
                "holdout": args.holdout,
                "seed": args.seed,
                "finetune_images": len(train),
                "held_out_images": len(hold),
            }
        )
        mlflow.log_input(mlflow.data.from_numpy(x[train], targets=labels[train], name="finetune"), context="training")
        mlflow.log_input(mlflow.data.from_numpy(x[hold], targets=labels[hold], name="held-out"), context="validation")
        mlflow.log_metrics(
            {
                **{f"before_{k}_accuracy": v for k, v in record["before"].items()},
                **{f"after_{k}_accuracy": v for k, v in record["after"].items()},
                **{
                    f"calibration_{k}": calibration[k]
                    for k in ("temperature", "soft_temperature", "soft_from", "smooth_below", "not_sure_below")
                },
                "held_out_coverage": record["sure"]["coverage"],
                "held_out_sure_accuracy": record["sure"]["accepted_accuracy"],
            }
        )
        info = tracking.log_keras_model(model, x[:1], name="model")
        mlflow.log_dict(calibration, "calibration.json")
        mlflow.log_artifact(str(staged["gate"]), "gate")
        mlflow.log_artifact(str(staged["onnx"]), "onnx")
        name = lineage.get("parent_registered_model", registry.registered_name(model_name))
        version = registry.register(model_name, info.model_uri, {**lineage, "finetuned": "true"}, name=name)
        if args.champion:
            registry.set_champion(version)
    return version


def finetune(args):
    import keras

    from pipeline.core import tracking
    from pipeline.core.trust import gate

    params = params_module.load(args.params)
    x, labels, groups = read_labelled(args.images)
    train, hold = held_out(labels, groups, args.holdout, args.seed)
    require(PROCESSED_DIR)
    data = load_arrays(PROCESSED_DIR, ["x_train", "y_train", "x_val", "y_val", "x_test", "y_test"])
    parent, lineage = parent_model(args.model)
    model = keras.models.load_model(parent.keras_path, compile=False)
    grouped = f" ({len(set(groups[hold]))} groups)" if len(set(groups)) < len(groups) else ""
    own = own_answers(args.images)
    print(
        f"finetune: {len(x)} images read"
        + (f" ({own} of them the model's own sure answers)" if own else "")
        + f"; fine-tuning on {len(train)}, holding out {len(hold)}{grouped}; from {args.model}",
        flush=True,
    )

    def scores():
        return {
            "held_out": accuracy(model, x[hold], labels[hold]),
            "mnist_val": accuracy(model, data["x_val"], data["y_val"].argmax(1)),
            "mnist_test": accuracy(model, data["x_test"], data["y_test"].argmax(1)),
        }

    record = {"images": (x, labels, train, hold), "before": scores()}
    keep_from = record["before"]["mnist_val"] - args.max_mnist_loss
    keras.utils.set_random_seed(args.seed)
    recipe_of_parent = params.model(model.name)
    shifts = params.shifts.strengths
    record["kept_epoch"] = fine_tune(
        model, recipe_of_parent, x[train], labels[train], data, keep_from, args, shifts, own > 0
    )
    if record["kept_epoch"] is None:
        raise ForgetsMnist(
            f"after every one of its {args.epochs} epochs the model read fewer than {keep_from:.2%} of MNIST's "
            f"validation digits (its parent {record['before']['mnist_val']:.2%}, less --max-mnist-loss "
            f"{args.max_mnist_loss:.2%}): nothing was written or registered. Try --train head, or a lower "
            "--learning-rate"
        )
    record["after"] = scores()

    print('finetune: calibrating again, and fitting the "not a digit" gate', flush=True)
    calibration, record["sure"] = recalibrate(model, (x[hold], labels[hold]), data, params)
    settings = params.calibrate
    fitted_gate, _ = gate.fit(
        model,
        data["x_train"],
        np.concatenate([data["x_val"], x[hold]]),
        args.seed,
        settings.nondigits_per_kind,
        settings.digit_flag_rate,
        own_digits=x[train],
    )
    calibration = {
        **calibration,
        "accepted_accuracy": settings.accepted_accuracy,
        "not_a_digit_above": fitted_gate.threshold,
    }
    # What it doubts: a threshold above the parent's sends more of the same images to review.
    record["not_sure_below"] = {"before": parent.calibration["not_sure_below"], "after": calibration["not_sure_below"]}
    out = Path(args.out)
    tracking.use_experiment(params.mlflow.experiment)
    with write_files(out, model, fitted_gate, calibration, x[hold]) as (staged, written):
        version = log_and_register(model, model.name, staged, written, lineage, record, args)
    report(record, out, version, args.champion)
    return {
        "finetune_images": len(train),
        "held_out_images": len(hold),
        "kept_epoch": record["kept_epoch"],
        "before": record["before"],
        "after": record["after"],
        "held_out_sure": record["sure"],
        "not_sure_below": record["not_sure_below"],
        "registered": f"{version.name} v{version.version}",
    }


def report(record, out, version, champion):
    before, after, sure, doubt = record["before"], record["after"], record["sure"], record["not_sure_below"]
    moved = (
        "now the champion"
        if champion
        else f"the champion did not move (`digits promote {version.name} {version.version}`)"
    )
    print(
        f"finetune: kept epoch {record['kept_epoch']}; held-out accuracy {before['held_out']:.2%} -> "
        f"{after['held_out']:.2%} ({sure['coverage']:.1%} of it sure, {sure['accepted_accuracy']:.2%} of those "
        f"right); MNIST validation {before['mnist_val']:.2%} -> {after['mnist_val']:.2%}, test "
        f'{before["mnist_test"]:.2%} -> {after["mnist_test"]:.2%}; "not sure" below {doubt["after"]:.2%} '
        f"confidence (the parent: {doubt['before']:.2%}). Wrote {out} (+ .calibration.json, .gate.pkl, "
        f".onnx); registered {version.name} v{version.version}, {moved}",
        flush=True,
    )


def main(args):
    try:
        finetune(args)
    except (FinetuneError, DataError, params_module.ParamsError) as e:
        print(f"digits finetune: {e}", file=sys.stderr)
        return 2
    return 0


def share(text):
    value = float(text)
    if not 0 < value < 1:
        raise ValueError(text)
    return value


def loss_share(text):
    value = float(text)
    if not 0 <= value < 1:
        raise ValueError(text)
    return value


def positive(text):
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def arguments(argv):
    """`digits finetune`'s arguments from a list of strings, with its defaults: for callers that run
    it in-process (the benchmarks), as the CLI would."""
    import argparse

    parser = argparse.ArgumentParser(prog="digits finetune")
    add_arguments(parser)
    return parser.parse_args(argv)


def add_arguments(parser):
    parser.add_argument("images", help="a CSV (file,label[,group]) or a folder with sub-folders 0 to 9")
    parser.add_argument(
        "--model",
        default="models/cnn.keras",
        help="the model to start from: a .keras file or an MLflow URI (models:/digits-cnn@champion)",
    )
    parser.add_argument(
        "--out",
        default="models/finetuned.keras",
        help="where the fine-tuned model goes (default models/finetuned.keras)",
    )
    parser.add_argument(
        "--holdout", type=float, default=0.2, help="share held out to measure and calibrate on (default 0.2)"
    )
    parser.add_argument("--train", choices=["all", "head"], default="all", help="which layers learn (default all)")
    parser.add_argument("--epochs", type=positive, default=10)
    parser.add_argument(
        "--max-mnist-loss",
        type=loss_share,
        default=0.001,
        help="keep the last epoch whose accuracy on MNIST's validation digits is at most this much below the "
        "parent's; refuse if none is (default 0.001: 0.1 points)",
    )
    parser.add_argument(
        "--learning-rate", type=float, default=1e-4, help="the constant rate, decaying to zero (default 1e-4)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--champion", action="store_true", help="make the new version the champion")
    parser.add_argument("--params", default="params.yaml")
