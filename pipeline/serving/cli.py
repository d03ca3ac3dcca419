"""`digits predict`, `digits read`, `digits review`, `digits serve` and `digits promote`: use the
trained model on your own images.

digits predict IMAGE_OR_FOLDER... [--top-k 3] [--format text|json|csv] [--model PATH_OR_URI] [--runtime tf]
               [--review DIR]    copy what is not sure, or not a digit, to DIR for a person to label
               [--review-sure]   ... and what is sure, labelled with its answer, to fine-tune on too
digits read IMAGE_OR_FOLDER... [--format text|json|csv] [--reader models/reader.onnx|segment] [--review DIR]
digits review DIR [--show waiting|filled|all]    what waits in a review folder
digits serve [--host 127.0.0.1] [--port 8000] [--model PATH_OR_URI] [--workers N] [--runtime tf]
             [--feedback DIR]    keep people's corrections (POST /feedback, the page) in DIR
digits promote NAME VERSION       move the Model Registry alias `champion` by hand
"""

import sys

from pipeline.core import normalize
from pipeline.serving import answers, feedback, images, review
from pipeline.serving.finetune import positive
from pipeline.serving.predictor import DEFAULT_MODEL, RUNTIMES
from pipeline.serving.reader import DEFAULT_READER

BATCH_SIZE = 256  # images per model call: one call per image is many times slower (docs/experiments.md)


def loaded(make, *args):
    """make(*args): a model, reader or folder, or None after saying why it could not be made."""
    try:
        return make(*args)
    except (FileNotFoundError, ValueError) as e:
        print(f"digits: {e}", file=sys.stderr)
        return None


def load_predictor(source, runtime):
    from pipeline.serving.predictor import Predictor

    return loaded(Predictor, source, runtime)


def load_reader(source, predictor):
    from pipeline.serving.reader import NumberReader

    return loaded(NumberReader, source, predictor)


def predict(args):
    from tqdm import tqdm

    if args.review_sure and not args.review:
        message = "--review-sure adds the sure answers to a review folder: name it with --review DIR"
        print(f"digits: {message}", file=sys.stderr)
        return 2
    paths = list(images.image_paths(args.images))
    results, pool = images.read_images(paths)
    predictor = load_predictor(args.model, args.runtime)
    queue = loaded(review.ReviewQueue, args.review, predictor.identity) if predictor and args.review else False
    if predictor is None or queue is None:
        if pool:
            pool.shutdown(cancel_futures=True)
        return 2
    output = answers.Output(args.format, predictor.identity, answers.csv_columns(args.top_k), "predictions")
    failed = 0
    # The bar shows on a terminal only (disable=None), on stderr; rows go to stdout.
    many = len(paths) >= images.PARALLEL_FROM
    with tqdm(total=len(paths), unit="image", disable=None if many else True, file=sys.stderr, leave=False) as bar:
        for batch in images.batches(results, BATCH_SIZE):
            for _, _, error in batch:
                if error:
                    failed += 1
                    bar.write(f"digits: {error}", file=sys.stderr)
            readable = [(path, image) for path, image, error in batch if not error]
            if readable:
                names, digit_images = zip(*readable, strict=True)
                probabilities, not_a_digit = predictor.predict(digit_images)
                for path, p, flag in zip(names, probabilities, not_a_digit, strict=True):
                    answer = answers.ranked(path, p, flag, args.top_k, predictor)
                    output.write(answer, answers.csv_row, answers.text_line)
                    if queue and (answer["not_sure"] or args.review_sure):
                        digit, confidence, not_a_digit = answer["digit"], answer["confidence"], answer["not_a_digit"]
                        queue.add(path, "digit", digit, confidence, not_a_digit, sure=not answer["not_sure"])
                sys.stdout.flush()
            bar.update(len(batch))
    output.close()
    if pool:
        pool.shutdown()
    return 1 if failed else 0


def read(args):
    """Each image is one number: the string, whether it is sure, and each digit's box and answer."""
    paths = list(images.image_paths(args.images))
    predictor = load_predictor(args.model, args.runtime)
    number_reader = predictor and load_reader(args.reader, predictor)
    answered_by = number_reader and f"{predictor.identity} {number_reader.identity}"
    queue = loaded(review.ReviewQueue, args.review, answered_by) if number_reader and args.review else False
    if number_reader is None or queue is None:
        return 2
    output = answers.Output(args.format, predictor.identity, answers.READ_COLUMNS, "readings")
    failed = 0
    for path in paths:
        data, error = images.read_bytes(path)
        image, error = (None, error) if error else images.decode_raw(data, str(path))
        if error:
            failed += 1
            print(f"digits: {error}", file=sys.stderr)
            continue
        try:
            reading = {"file": str(path), **number_reader.read(image).as_dict()}
        except normalize.ImageError as e:  # a blank page, too many marks: named, and the rest are read
            failed += 1
            print(f"digits: {path}: {e}", file=sys.stderr)
            continue
        output.write(reading, answers.reading_row, answers.reading_line)
        if queue and not reading["sure"]:
            queue.add(path, "number", reading["number"], reading["confidence"] or 0.0, "?" in reading["number"])
    output.close()
    return 1 if failed else 0


def serve(args):
    from pipeline.serving import server
    from pipeline.serving.reader import served_reader

    reader = served_reader(args.reader)
    if args.workers > 1:
        try:
            kept = args.feedback, args.feedback_per_minute, args.feedback_quota
            server.run_workers(args.model, args.runtime, reader, args.host, args.port, args.workers, kept)
        except (FileNotFoundError, ValueError) as e:
            print(f"digits: {e}", file=sys.stderr)
            return 2
        return 0
    predictor = load_predictor(args.model, args.runtime)
    number_reader = predictor and load_reader(reader, predictor)
    if number_reader is None:
        return 2
    kept = loaded(feedback_folder, args, predictor.identity) if args.feedback else False
    if kept is None:
        return 2
    server.run(predictor, number_reader, args.host, args.port, kept or None)
    return 0


def feedback_folder(args, model):
    from pipeline.serving.feedback import Feedback

    return Feedback(args.feedback, model, args.feedback_per_minute, args.feedback_quota)


def promote(args):
    from mlflow.exceptions import MlflowException

    from pipeline.core import registry

    try:
        before, version = registry.promote(args.name, args.version)
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
    """predict, read, serve, promote and review, as sub-commands of `digits` (pipeline/cli.py)."""
    model_help = (
        f"a .keras or .onnx file, or an MLflow model URI: runs:/<run id>/model, models:/digits-cnn/3, "
        f"models:/digits-cnn@champion (default {DEFAULT_MODEL})"
    )
    runtime_help = "onnx: the exported graph on ONNX Runtime (default); tf: the .keras file on TensorFlow"
    reader_help = (
        f"how whole numbers are read: the line reader's .onnx file (default {DEFAULT_READER}), or `segment` "
        "(cut the ink into digits and answer each with --model)"
    )
    review_help = (
        "copy each image whose answer is not sure (or not a digit) into DIR, with a row in DIR/labels.csv "
        "for a person to fill; see `digits review DIR`, and `digits finetune DIR` to learn from them"
    )

    predict_parser = commands.add_parser("predict", help="predict the digit in image files or folders of images")
    predict_parser.add_argument("images", nargs="+", help="image files (PNG, JPEG, BMP, GIF, WebP ...) or folders")
    predict_parser.add_argument(
        "--top-k", type=int, default=1, choices=range(1, 11), metavar="K", help="also show the next K-1 guesses"
    )
    predict_parser.add_argument("--format", choices=["text", "json", "csv"], default="text")
    predict_parser.add_argument("--model", default=DEFAULT_MODEL, help=model_help)
    predict_parser.add_argument("--runtime", choices=RUNTIMES, default="onnx", help=runtime_help)
    predict_parser.add_argument("--review", metavar="DIR", help=review_help)
    predict_parser.add_argument(
        "--review-sure",
        action="store_true",
        help="with --review: copy the sure answers to DIR too, labelled with the answer (reason `sure`), so that "
        "`digits finetune DIR` also learns the batch's look from them (self-training); correct any that is wrong",
    )
    predict_parser.set_defaults(run=predict)

    r = commands.add_parser("read", help="read whole numbers (ZIP codes, amounts), one per image, digit by digit")
    r.add_argument("images", nargs="+", help="image files or folders, each holding one number written on a line")
    r.add_argument("--format", choices=["text", "json", "csv"], default="text")
    r.add_argument("--model", default=DEFAULT_MODEL, help=model_help)
    r.add_argument("--runtime", choices=RUNTIMES, default="onnx", help=runtime_help)
    r.add_argument("--reader", default=DEFAULT_READER, help=reader_help)
    r.add_argument("--review", metavar="DIR", help=review_help)
    r.set_defaults(run=read)

    s = commands.add_parser("serve", help="start the REST API and the drawing page")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--model", default=DEFAULT_MODEL, help=model_help)
    s.add_argument("--runtime", choices=RUNTIMES, default="onnx", help=runtime_help)
    s.add_argument("--reader", default=DEFAULT_READER, help=reader_help)
    s.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="server processes, each with its own copy of the model (default 1)",
    )
    s.add_argument(
        "--feedback",
        metavar="DIR",
        help="turn on POST /feedback and the page's corrections: each kept in DIR as `--review DIR` keeps answers",
    )
    s.add_argument("--feedback-per-minute", type=positive, default=feedback.PER_MINUTE, metavar="N", help="per client")
    s.add_argument("--feedback-quota", type=positive, default=feedback.QUOTA, metavar="N", help="images DIR may hold")
    s.set_defaults(run=serve)

    m = commands.add_parser("promote", help="make a registered model version the champion (MLflow Model Registry)")
    m.add_argument("name", help="registered model, e.g. digits-cnn")
    m.add_argument("version", type=int, help="its version number")
    m.set_defaults(run=promote)

    v = commands.add_parser("review", help="what waits in a review folder (--review DIR) for a person to label")
    review.add_arguments(v)
    v.set_defaults(run=review.show)
