"""`digits predict`, `digits read`, `digits serve` and `digits promote`: use the trained model on
your own images.

digits predict IMAGE_OR_FOLDER... [--top-k 3] [--format text|json|csv] [--model PATH_OR_URI] [--runtime tf]
digits read IMAGE_OR_FOLDER... [--format text|json|csv]     whole numbers: ZIP codes, amounts, fields
digits serve [--host 127.0.0.1] [--port 8000] [--model PATH_OR_URI] [--workers N] [--runtime tf]
digits promote NAME VERSION       move the Model Registry alias `champion` by hand
"""

import csv
import json
import os
import sys
from pathlib import Path

from pipeline.core import normalize
from pipeline.serving.predictor import DEFAULT_MODEL, RUNTIMES, threads_from_environment

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def image_paths(arguments):
    """Files as given; folders expanded to the images inside them, sorted."""
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            yield from sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            yield path


def load_predictor(source, runtime):
    """The model, or None after saying why it could not be loaded."""
    from pipeline.serving.predictor import Predictor

    try:
        return Predictor(source, runtime)
    except (FileNotFoundError, ValueError) as e:
        print(f"digits: {e}", file=sys.stderr)
        return None


GRACEFUL_SECONDS = 30  # on SIGTERM or Ctrl-C, requests in flight get this long to be answered
BATCH_SIZE = 256  # images per model call: one call per image made a folder of 1,797 take 31 s
PARALLEL_FROM = 200  # from this many images on, decode them in worker processes (one per core)


def read_image(path, name=None):
    """(path, image in MNIST form, None), or (path, None, why it cannot be read). Messages call the
    file `name` (default: the path as given)."""
    name = name or str(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        return path, None, f"{name}: {e.strerror or e}"
    image, error = decode_image(data, name)
    return path, image, error


def decode_image(data, name):
    """(image in MNIST form, None) from an encoded image, or (None, why it cannot be read)."""
    try:
        return normalize.to_mnist(normalize.decode(data, name)), None
    except normalize.ImageError as e:  # its message names the file
        return None, str(e)


def read_images(paths):
    """read_image over all paths, in order, and the process pool doing it (None for a few paths).
    The pool starts at once: it decodes while the main process loads TensorFlow and the model."""
    if len(paths) < PARALLEL_FROM or (os.cpu_count() or 1) < 2:
        return map(read_image, paths), None
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: the workers need NumPy and PIL, not a copy of this process's TensorFlow threads.
    pool = ProcessPoolExecutor(os.cpu_count(), mp_context=multiprocessing.get_context("spawn"))
    return pool.map(read_image, paths, chunksize=64), pool


def batches(items, size):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def ranked(path, probabilities, not_a_digit, top_k, predictor):
    order = probabilities.argsort()[::-1][:top_k]
    return {
        "file": str(path),
        "digit": int(order[0]),
        "confidence": round(float(probabilities[order[0]]), 4),
        "not_sure": predictor.not_sure(probabilities, not_a_digit),
        "not_a_digit": bool(not_a_digit),
        "top": [{"digit": int(d), "probability": round(float(probabilities[d]), 4)} for d in order],
    }


def csv_columns(top_k):
    return ["file", "digit", "confidence", "not_sure", "not_a_digit", *[f"top{i + 1}" for i in range(top_k)]]


def csv_row(r):
    """A `ranked` answer as a CSV row under csv_columns."""
    return [r["file"], r["digit"], r["confidence"], r["not_sure"], r["not_a_digit"]] + [
        f"{t['digit']}:{t['probability']}" for t in r["top"]
    ]


class Output:
    """Rows on stdout as they are predicted (text, csv); json is one document at the end."""

    def __init__(self, form, top_k, model_identity):
        self.form, self.model_identity, self.rows = form, model_identity, []
        if form == "csv":
            self.csv = csv.writer(sys.stdout)
            self.csv.writerow(csv_columns(top_k))

    def write(self, r):
        if self.form == "json":
            self.rows.append(r)
        elif self.form == "csv":
            self.csv.writerow(csv_row(r))
        else:
            others = "  ".join(f"{t['digit']} {t['probability']:.1%}" for t in r["top"][1:])
            sure = "not a digit" if r["not_a_digit"] else "not sure" if r["not_sure"] else "sure"
            print(
                f"{r['file']}\t{r['digit']}\t{r['confidence']:.1%}\t{sure}" + (f"\t(then {others})" if others else "")
            )

    def close(self):
        if self.form == "json":
            print(json.dumps({"model": self.model_identity, "predictions": self.rows}, indent=2))
        sys.stdout.flush()


def predict(args):
    from tqdm import tqdm

    paths = list(image_paths(args.images))
    results, pool = read_images(paths)
    predictor = load_predictor(args.model, args.runtime)
    if predictor is None:
        if pool:
            pool.shutdown(cancel_futures=True)
        return 2
    output = Output(args.format, args.top_k, predictor.identity)
    failed = 0
    # The bar shows on a terminal only (disable=None), on stderr; rows go to stdout.
    with tqdm(
        total=len(paths),
        unit="image",
        disable=None if len(paths) >= PARALLEL_FROM else True,
        file=sys.stderr,
        leave=False,
    ) as progress:
        for batch in batches(results, BATCH_SIZE):
            for _, _, error in batch:
                if error:
                    failed += 1
                    progress.write(f"digits: {error}", file=sys.stderr)
            readable = [(path, image) for path, image, error in batch if not error]
            if readable:
                names, images = zip(*readable, strict=True)
                probabilities, not_a_digit = predictor.predict(images)
                for path, p, flag in zip(names, probabilities, not_a_digit, strict=True):
                    output.write(ranked(path, p, flag, args.top_k, predictor))
                sys.stdout.flush()
            progress.update(len(batch))
    output.close()
    if pool:
        pool.shutdown()
    return 1 if failed else 0


READ_COLUMNS = ["file", "number", "sure", "digits", "boxes"]


def reading_row(path, answer):
    """A Reading.as_dict() answer as a CSV row under READ_COLUMNS."""
    return [
        str(path),
        answer["number"],
        answer["sure"],
        " ".join(f"{d['digit']}:{d['confidence']}" for d in answer["digits"]),
        ";".join(" ".join(map(str, d["box"])) for d in answer["digits"]),
    ]


def read(args):
    """Each image is one number: the string, whether it is sure, and each digit's box and answer."""
    from pipeline.core import reading

    paths = list(image_paths(args.images))
    predictor = load_predictor(args.model, args.runtime)
    if predictor is None:
        return 2
    failed, rows = 0, []
    writer = csv.writer(sys.stdout) if args.format == "csv" else None
    if writer:
        writer.writerow(READ_COLUMNS)
    for path in paths:
        try:
            answer = reading.read(normalize.decode(path.read_bytes(), str(path)), predictor).as_dict()
        except OSError as e:
            failed += 1
            print(f"digits: {path}: {e.strerror or e}", file=sys.stderr)
            continue
        except normalize.ImageError as e:
            failed += 1
            print(f"digits: {path}: {e}" if str(path) not in str(e) else f"digits: {e}", file=sys.stderr)
            continue
        if args.format == "json":
            rows.append({"file": str(path), **answer})
        elif writer:
            writer.writerow(reading_row(path, answer))
        else:
            each = "  ".join(
                f"{'?' if d['not_a_digit'] else d['digit']} {d['confidence']:.1%}" for d in answer["digits"]
            )
            print(f"{path}\t{answer['number']}\t{'sure' if answer['sure'] else 'not sure'}\t({each})")
    if args.format == "json":
        print(json.dumps({"model": predictor.identity, "readings": rows}, indent=2))
    return 1 if failed else 0


def serve(args):
    import tempfile

    import uvicorn

    from pipeline.serving.api import create_app

    where = f"http://{args.host}:{args.port}/ (API docs at /docs, metrics at /metrics)"
    if args.workers == 1:
        predictor = load_predictor(args.model, args.runtime)
        if predictor is None:
            return 2
        print(f"digits: serving {args.model} ({predictor.identity}) on {where}", flush=True)
        uvicorn.run(
            create_app(predictor),
            host=args.host,
            port=args.port,
            log_level="warning",
            timeout_graceful_shutdown=GRACEFUL_SECONDS,
        )
        return 0
    # Each worker process loads the model itself; the workers' metrics are summed through files in
    # a fresh folder (prometheus_client's multiprocess mode).
    if not ("://" in args.model or args.model.startswith(("runs:/", "models:/")) or Path(args.model).exists()):
        print(
            f"digits: {args.model}: no such model file (train one with `./dev repro`, or `dvc pull`)", file=sys.stderr
        )
        return 2
    try:
        threads_from_environment()  # a bad DIGITS_THREADS is named here, not in every worker
    except ValueError as e:
        print(f"digits: {e}", file=sys.stderr)
        return 2
    os.environ["DIGITS_MODEL"], os.environ["DIGITS_RUNTIME"] = args.model, args.runtime
    # Each worker's model gets its share of the cores: N workers with every core each would
    # oversubscribe them.
    os.environ.setdefault("DIGITS_THREADS", str(max(1, (os.cpu_count() or 1) // args.workers)))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="digits-metrics-")
    print(f"digits: serving {args.model} with {args.workers} worker processes on {where}", flush=True)
    uvicorn.run(
        "pipeline.serving.api:app_from_environment",
        factory=True,
        workers=args.workers,
        host=args.host,
        port=args.port,
        log_level="warning",
        timeout_graceful_shutdown=GRACEFUL_SECONDS,
    )
    return 0


def promote(args):
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from pipeline.core import registry, tracking

    mlflow.set_tracking_uri(tracking.tracking_uri())
    client = MlflowClient()
    try:
        version = client.get_model_version(args.name, str(args.version))
        before = registry.champion_of(args.name)
        client.set_registered_model_alias(args.name, registry.CHAMPION, version.version)
    except MlflowException as e:
        print(f"digits: {args.name} v{args.version}: {e.message}", file=sys.stderr)
        return 2
    was = f"v{before.version}" if before else "no version"
    print(
        f"digits: {args.name}@{registry.CHAMPION} moved from {was} to v{version.version} "
        f"(val accuracy {version.tags.get('val_accuracy', '?')}, "
        f"test accuracy {version.tags.get('test_accuracy', '?')})"
    )
    return 0


def add_commands(commands):
    """predict, serve and promote, as sub-commands of `digits` (pipeline/cli.py)."""
    model_help = (
        f"a .keras or .onnx file, or an MLflow model URI: runs:/<run id>/model, models:/digits-cnn/3, "
        f"models:/digits-cnn@champion (default {DEFAULT_MODEL})"
    )
    runtime_help = "onnx: the exported graph on ONNX Runtime (default); tf: the .keras file on TensorFlow"

    predict_parser = commands.add_parser("predict", help="predict the digit in image files or folders of images")
    predict_parser.add_argument("images", nargs="+", help="image files (PNG, JPEG, BMP, GIF, WebP ...) or folders")
    predict_parser.add_argument(
        "--top-k", type=int, default=1, choices=range(1, 11), metavar="K", help="also show the next K-1 guesses"
    )
    predict_parser.add_argument("--format", choices=["text", "json", "csv"], default="text")
    predict_parser.add_argument("--model", default=DEFAULT_MODEL, help=model_help)
    predict_parser.add_argument("--runtime", choices=RUNTIMES, default="onnx", help=runtime_help)
    predict_parser.set_defaults(run=predict)

    r = commands.add_parser("read", help="read whole numbers (ZIP codes, amounts), one per image, digit by digit")
    r.add_argument("images", nargs="+", help="image files or folders, each holding one number written on a line")
    r.add_argument("--format", choices=["text", "json", "csv"], default="text")
    r.add_argument("--model", default=DEFAULT_MODEL, help=model_help)
    r.add_argument("--runtime", choices=RUNTIMES, default="onnx", help=runtime_help)
    r.set_defaults(run=read)

    s = commands.add_parser("serve", help="start the REST API and the drawing page")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--model", default=DEFAULT_MODEL, help=model_help)
    s.add_argument("--runtime", choices=RUNTIMES, default="onnx", help=runtime_help)
    s.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="server processes, each with its own copy of the model (default 1)",
    )
    s.set_defaults(run=serve)

    m = commands.add_parser("promote", help="make a registered model version the champion (MLflow Model Registry)")
    m.add_argument("name", help="registered model, e.g. digits-cnn")
    m.add_argument("version", type=int, help="its version number")
    m.set_defaults(run=promote)
