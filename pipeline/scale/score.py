"""`digits score`: batch scoring with Ray Data, for more images than one process reads quickly.

    digits score FOLDER_OR_IMAGE... --out answers.csv        # or .parquet
    digits score --parquet scans.parquet --out answers.parquet   # columns `file` and `image` (bytes)
    digits score forms/ --read --out numbers.csv                   # each image a whole number
    digits score scans/ --out answers.csv --review review/         # the not-sure ones to review/
    RAY_ADDRESS=HEAD:6379 digits score ...                         # spread over a cluster

Ray Data splits the list of files (or the Parquet file) into blocks and streams them through a pool
of actors, one per CPU by default. Each actor loads the model once (an .onnx or .keras file, or a
models:/ URI) with its calibration and gate, then reads, normalises and answers its blocks. The
output has the columns of `digits predict --format csv` (with --read, of `digits read --format
csv`), in input order, and the same answers. Files that cannot be read are named on stderr and in
OUT.errors.csv, and the exit code is 1. With --review DIR, the images whose answer is not sure go
to a review folder, as with `digits predict --review` (pipeline/serving/review.py); from a Parquet
file, their bytes are copied out of it.
"""

import csv
import sys
from pathlib import Path

import numpy as np

from pipeline.core import normalize
from pipeline.scale import cluster
from pipeline.serving import answers, images, review
from pipeline.serving.predictor import DEFAULT_MODEL, RUNTIMES, check_source
from pipeline.serving.reader import DEFAULT_READER, SEGMENT, check_reader

# Rows per block and per actor call. The answers do not depend on it (ONNX Runtime answers an image
# alike in any batch); 512 gave two actors their first block soonest on 10,000 files (docs/scaling.md).
BLOCK_ROWS = 512
# Blocks queued at each copy (Ray Data's default, stated because a small job is cut to fill them:
# a copy takes blocks until its queue is full, those on its own node first).
BLOCKS_IN_FLIGHT = 4
ACTORS_START_SECONDS = 600  # a models:/ URI is downloaded by every actor as it starts


def decode(batch):
    """Ray Data batch {file, path or image bytes} -> {file, image (n, 28, 28), error}."""
    digit_images, errors = [], []
    contents = batch.get("image")
    for i, name in enumerate(batch["file"]):
        if contents is None:  # read by absolute path, named as the user gave it
            _, image, error = images.read_image(Path(batch["path"][i]), name)
        else:
            image, error = images.decode_image(contents[i], name)
        digit_images.append(np.zeros((28, 28), np.float32) if image is None else image)
        errors.append(error or "")
    return {"file": np.asarray(batch["file"]), "image": np.stack(digit_images), "error": np.asarray(errors)}


class ModelActor:
    """One model copy per actor, loaded once. Each answer also names the node that gave it, so that
    the driver can say how far the job spread."""

    def __init__(self, source, runtime):
        import ray

        from pipeline.serving.predictor import Predictor

        # Ray does not enforce CPU limits: the model's threads follow the CPUs Ray gave the actor.
        self.predictor = Predictor(source, runtime, threads=cluster.assigned_cpus())
        self.node = ray.get_runtime_context().get_node_id()

    def answer(self, columns, errors):
        return {**columns, "error": np.asarray(errors), "node": np.full(len(errors), self.node)}


class Scorer(ModelActor):
    """Reads and answers rows as `digits predict` does. The actor decodes its own rows: a separate
    decoding stage cost more in moving images between processes than it gained (docs/scaling.md)."""

    def __init__(self, source, runtime, top_k):
        super().__init__(source, runtime)
        self.top_k = top_k

    def __call__(self, batch):
        """Every row comes back: an unreadable file with its error and no answer."""
        batch = decode(batch)
        readable = batch["error"] == ""
        by_file = {}
        if readable.any():
            probabilities, not_a_digit = self.predictor.predict(list(batch["image"][readable]))
            names = batch["file"][readable]
            for name, p, flag in zip(names, probabilities, not_a_digit, strict=True):
                by_file[name] = answers.csv_row(answers.ranked(name, p, flag, self.top_k, self.predictor))
        unanswered = ["", -1, float("nan"), False, False, *[""] * self.top_k]
        rows = [by_file.get(name, [name, *unanswered[1:]]) for name in batch["file"]]
        columns = zip(answers.csv_columns(self.top_k), zip(*rows, strict=True), strict=True)
        return self.answer({column: np.asarray(values) for column, values in columns}, batch["error"])


class NumberScorer(ModelActor):
    """Each image read as a whole number, as `digits read` does. The reader needs the image at its
    own size, so it decodes the file itself."""

    def __init__(self, source, runtime, reader):
        from pipeline.serving.reader import NumberReader

        super().__init__(source, runtime)
        self.reader = NumberReader(reader, self.predictor, threads=cluster.assigned_cpus())

    def __call__(self, batch):
        rows, errors = [], []
        contents = batch.get("image")
        for i, name in enumerate(batch["file"]):
            data, error = images.read_bytes(batch["path"][i], name) if contents is None else (contents[i], None)
            image, error = (None, error) if error else images.decode_raw(data, name)
            reading = None
            if not error:
                try:
                    reading = self.reader.read(image)
                except normalize.ImageError as e:  # a blank page, too many marks: as `digits read` names it
                    error = f"{name}: {e}"
            rows.append([name, "", "", "", ""] if error else answers.reading_row({"file": name, **reading.as_dict()}))
            errors.append(error or "")
        # As text, as the CLI's CSV has them: every batch then has the same Parquet schema.
        columns = zip(answers.READ_COLUMNS, zip(*rows, strict=True), strict=True)
        return self.answer({column: np.asarray([str(v) for v in values]) for column, values in columns}, errors)


def score(args):
    import pyarrow as pa
    import ray

    address = cluster.address(args.address)
    if args.actors is not None and args.actors < 1:
        raise ValueError(f"--actors {args.actors}: expected 1 or more")
    if args.cpus_per_actor <= 0:
        raise ValueError(f"--cpus-per-actor {args.cpus_per_actor:g}: expected more than 0")
    if bool(args.parquet) == bool(args.images):
        raise ValueError("give image files or folders, or --parquet FILE (one of the two)")
    if not args.parquet:
        paths = [str(p) for p in images.image_paths(args.images)]
        if not paths:
            raise ValueError(f"{' '.join(args.images)}: no images found")
    check_source(args.model)
    if args.read:
        check_reader(args.reader)
    model = args.model if ":/" in args.model else str(Path(args.model).resolve())
    cluster.connect(address, args.cpus)
    total = ray.cluster_resources().get("CPU", 0)
    actors = args.actors or max(1, int(total // args.cpus_per_actor))
    if actors * args.cpus_per_actor > total:
        raise ValueError(
            f"{actors} actors of {args.cpus_per_actor:g} CPUs need {actors * args.cpus_per_actor:g} CPUs; "
            f"Ray has {total:g}: lower --actors or --cpus-per-actor"
        )
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # rows come out in input order
    # Every model copy is loaded before the first block goes out: otherwise the copy that starts
    # first, on the node holding the blocks, takes a small job's blocks all.
    context.wait_for_min_actors_s = ACTORS_START_SECONDS
    context.enable_progress_bars = sys.stderr.isatty()
    rows = BLOCK_ROWS
    if args.parquet:
        source = ray.data.read_parquet(str(Path(args.parquet).resolve()), columns=["file", "image"])
    else:
        # Workers run in other folders, and on other machines: they read by absolute path (a shared
        # file system on a cluster; or --parquet), and the answers name files as given.
        files = pa.table({"file": paths, "path": [str(Path(p).resolve()) for p in paths]})
        rows = min(rows, -(-len(paths) // (actors * BLOCKS_IN_FLIGHT)))  # a small job still reaches every copy
        source = ray.data.from_arrow([files.slice(start, rows) for start in range(0, len(paths), rows)])
    number_reader = args.reader if args.reader == SEGMENT else str(Path(args.reader).resolve())
    answer, arguments = (NumberScorer, {"reader": number_reader}) if args.read else (Scorer, {"top_k": args.top_k})
    answered = source.map_batches(
        answer,
        fn_constructor_kwargs={"source": model, "runtime": args.runtime, **arguments},
        batch_size=rows,
        compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=BLOCKS_IN_FLIGHT),
        num_cpus=args.cpus_per_actor,
    )
    columns = answers.READ_COLUMNS if args.read else answers.csv_columns(args.top_k)
    queue = review.ReviewQueue(args.review, args.model) if args.review else None  # a bad folder: before the job
    count, failed, nodes, doubtful = write(answered, args.out, columns)
    if queue:
        send_to_review(queue, doubtful, args.parquet, args.read)
    for _, error in failed:
        print(f"digits: {error}", file=sys.stderr)
    if failed:
        with open(f"{args.out}.errors.csv", "w", newline="") as f:
            csv.writer(f).writerows([("file", "error"), *failed])
    spread = f"{actors} model cop{'y' if actors == 1 else 'ies'} on {len(nodes)} node{'s' * (len(nodes) != 1)}"
    print(f"digits score: {count} answers in {args.out}; {len(failed)} unreadable; {spread}", file=sys.stderr)
    return 1 if failed else 0


def write(answered, out, names):
    """Stream the answers into one CSV or Parquet file (via a temporary file, so a failure leaves
    no half file); returns how many answers, (file, error) of every unreadable one, and the nodes
    that answered."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    count, failed, nodes, doubtful = 0, [], set(), []
    tmp = Path(f"{out}.part")
    parquet = str(out).endswith(".parquet")
    with open(tmp, "w", newline="") as f:
        writer = None if parquet else csv.writer(f)
        if writer:
            writer.writerow(names)
        sink = None
        for batch in answered.iter_batches(batch_size=None, batch_format="pyarrow"):  # as the actors made them
            nodes.update(pc.unique(batch.column("node")).to_pylist())
            bad = pc.not_equal(batch.column("error"), "")
            unreadable = batch.filter(bad)
            failed += zip(unreadable.column("file").to_pylist(), unreadable.column("error").to_pylist(), strict=True)
            batch = batch.filter(pc.invert(bad)).select(names)
            doubtful += not_sure_rows(batch)
            count += batch.num_rows
            if parquet:
                sink = sink or pq.ParquetWriter(tmp, batch.schema)
                sink.write_table(batch)
            else:
                writer.writerows(zip(*(batch.column(c).to_pylist() for c in names), strict=True))
        if parquet:
            (sink or pq.ParquetWriter(tmp, pa.schema([(c, pa.string()) for c in names]))).close()
    tmp.replace(out)
    return count, failed, nodes, doubtful


def not_sure_rows(batch):
    """(file, answer, confidence or None, not a digit) of the answers in `batch` that are not sure."""
    rows = batch.to_pylist()  # flags as booleans, or as text where a batch had an unreadable row
    if "number" in batch.column_names:  # --read
        return [(r["file"], r["number"], None, "?" in r["number"]) for r in rows if str(r["sure"]) != "True"]
    return [
        (r["file"], r["digit"], float(r["confidence"]), str(r["not_a_digit"]) == "True")
        for r in rows
        if str(r["not_sure"]) == "True"
    ]


def send_to_review(queue, doubtful, parquet, read):
    """Each doubtful answer into the review queue: its file copied, or its bytes from the Parquet file."""
    import pyarrow.parquet as pq

    contents = {}
    if parquet and doubtful:
        names = [file for file, *_ in doubtful]
        table = pq.read_table(parquet, columns=["file", "image"], filters=[("file", "in", names)])
        contents = dict(zip(table.column("file").to_pylist(), table.column("image").to_pylist(), strict=True))
    for file, answer, confidence, not_a_digit in doubtful:
        queue.add(file, "number" if read else "digit", answer, confidence, not_a_digit, contents.get(file))


def main(args):
    try:
        return score(args)
    except (ValueError, FileNotFoundError, cluster.ClusterError) as e:
        print(f"digits score: {e}", file=sys.stderr)
        return 2


def add_arguments(parser):
    parser.add_argument("images", nargs="*", help="image files or folders (or --parquet)")
    parser.add_argument("--parquet", help="a Parquet file with columns `file` (a name) and `image` (encoded bytes)")
    parser.add_argument("--out", required=True, help="where the answers go: .csv or .parquet")
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"a .keras or .onnx file, or a models:/ URI (default {DEFAULT_MODEL})"
    )
    parser.add_argument("--runtime", choices=RUNTIMES, default="onnx", help="onnx (default) or tf, as `digits predict`")
    parser.add_argument("--top-k", type=int, default=1, choices=range(1, 11), metavar="K")
    parser.add_argument("--read", action="store_true", help="read each image as a whole number, as `digits read`")
    parser.add_argument(
        "--reader", default=DEFAULT_READER, help=f"with --read: the line reader (default {DEFAULT_READER}) or `segment`"
    )
    parser.add_argument(
        "--review",
        metavar="DIR",
        help="copy each image whose answer is not sure into DIR, as `digits predict --review`",
    )
    parser.add_argument("--actors", type=int, help="model copies (default: one per CPU of the cluster)")
    parser.add_argument("--cpus-per-actor", type=float, default=1)
    parser.add_argument("--address", help="a Ray cluster to join (default RAY_ADDRESS; none: start Ray here)")
    parser.add_argument("--cpus", type=int, help="CPUs of the local Ray (default: all)")
