"""Review queues: the answers a person should check, gathered in a folder by `--review DIR` of
`digits predict` and `digits read`; `digits review DIR` shows what waits, and `digits finetune DIR`
learns from the rows a person has filled. With `digits predict --review-sure`, the answers the model
kept go there too, labelled with its own answer: fine-tuning then learns the batch's look from them
as well (self-training, docs/team.md rules 44-47), and a person may correct any of them.

DIR holds a copy of each image sent to review (under a name the queue gives it) and labels.csv, one
row per image, in COLUMNS:
  file        the copy, relative to DIR
  label       empty until a person writes what the image shows: a digit (or a number, for
              `digits read`), or "-" for an image that holds none
  answer      what the model answered ("?" for a mark that is not a digit)
  confidence  how sure it was
  reason      why it is here: "not sure" or "not a digit", or "feedback" (a person's correction
              sent to `digits serve --feedback DIR`, its label filled), or "sure" (an answer the
              model kept, --review-sure: its label filled with the answer)
  model       which model answered (as `--format json` names it)
  kind        digit or number
  group       the folder the image came from (often one writer, or one scanner's batch):
              fine-tuning holds out whole groups
  source      the image's own path
A spreadsheet or a text editor is enough to fill the labels. Rows are appended whole, one at a
time under a lock (filelock), and flushed to disk: an interrupted run leaves every row it finished.
"""

import csv
import io
import os
import shutil
import uuid
from pathlib import Path

from pipeline.core.files import atomic_path

COLUMNS = ["file", "label", "answer", "confidence", "reason", "model", "kind", "group", "source"]
LABELS = "labels.csv"
IMAGES = "images"
NO_DIGIT = "-"  # the label of an image that holds no digit
SURE = "sure"  # the reason of an answer the model kept, queued by --review-sure with its own label
KINDS = ("digit", "number")


class ReviewError(ValueError):
    pass


class QueueFull(ReviewError):
    pass


class ReviewQueue:
    def __init__(self, folder, model):
        """A queue in `folder` (made if missing) for the answers of `model` (its identity)."""
        from filelock import FileLock

        self.folder, self.model = Path(folder), model
        self.labels = self.folder / LABELS
        try:
            (self.folder / IMAGES).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ReviewError(f"{folder}: cannot make a review folder here ({e.strerror})") from None
        self.lock = FileLock(self.folder / f".{LABELS}.lock")
        with self.lock:
            if not self.labels.exists() or self.labels.stat().st_size == 0:
                self._append(COLUMNS)
            else:
                read_rows(self.folder)  # a folder of another layout is refused before anything is added

    def add(self, source, kind, answer, confidence, not_a_digit, data=None, sure=False):
        """Copy the image file `source` (or write its bytes `data`, from a Parquet file) into the
        queue, with a row for a person to label; a `sure` answer's row comes labelled with the answer.
        `confidence` may be None (not known)."""
        name = Path(source)
        row = {
            "label": str(answer) if sure else "",
            "answer": answer,
            "confidence": "" if confidence is None else f"{confidence:.4f}",
            "reason": SURE if sure else "not a digit" if not_a_digit else "not sure",
            "kind": kind,
            "group": name.parent.name,
            "source": str(source),
        }
        write = (
            (lambda path: path.write_bytes(data)) if data is not None else (lambda path: shutil.copyfile(name, path))
        )
        return self.store(write, name.suffix.lower(), row)

    def store(self, write_image, suffix, row, most=None):
        """Write an image (write_image(path)) under a new name, then append its row (COLUMNS but file
        and model); returns the image's path. The row is only written once the image is whole.
        QueueFull when the folder already holds `most` images."""
        path = self.folder / IMAGES / f"{uuid.uuid4().hex[:16]}{suffix}"
        row = {**row, "file": path.relative_to(self.folder).as_posix(), "model": self.model}
        with self.lock:
            if most is not None and self.count() >= most:
                raise QueueFull(f"the feedback folder holds its quota of {most:,} images")
            with atomic_path(path) as tmp:
                write_image(tmp)
            self._append([row[c] for c in COLUMNS])
        return path

    def count(self):
        """How many images the folder holds."""
        with os.scandir(self.folder / IMAGES) as entries:
            return sum(1 for entry in entries if not entry.name.startswith("."))

    def _append(self, values):
        line = io.StringIO()
        csv.writer(line).writerow(values)
        with self.labels.open("a", newline="") as f:
            f.write(line.getvalue())
            f.flush()
            os.fsync(f.fileno())


def is_review_folder(path):
    return (Path(path) / LABELS).is_file()


def read_rows(folder):
    """The rows of a review folder's labels.csv, as dicts; ReviewError naming the file otherwise."""
    labels = Path(folder) / LABELS
    if not is_review_folder(folder):
        raise ReviewError(f"{folder}: no {LABELS} here: not a review folder (make one with --review {folder})")
    with labels.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != COLUMNS:
            raise ReviewError(f"{labels}: expected the columns {', '.join(COLUMNS)}")
        return list(reader)


def label_problem(row):
    """Why a filled row's label cannot be used (None if it can)."""
    label = row["label"].strip()
    if label == NO_DIGIT:
        return None
    if row["kind"] == "digit" and (len(label) != 1 or not label.isdigit()):
        return f"label {label!r} is not a digit 0-9 (or {NO_DIGIT} for no digit)"
    if row["kind"] == "number" and not label.isdigit():
        return f"label {label!r} is not a number of digits 0-9 (or {NO_DIGIT} for no number)"
    return None


def summary(folder):
    """(counts, waiting rows, filled rows) of a review folder; the model's own sure answers are
    counted, not listed."""
    rows = read_rows(folder)
    filled = [r for r in rows if r["label"].strip() and r["reason"] != SURE]
    waiting = [r for r in rows if not r["label"].strip()]
    counts = {"rows": len(rows), "waiting": len(waiting), "filled": len(filled)}
    for reason in ("not sure", "not a digit", SURE):
        counts[reason] = sum(r["reason"] == reason for r in rows)
    counts["unusable labels"] = sum(label_problem(r) is not None for r in filled)
    return counts, waiting, filled


def show(args):
    """`digits review DIR`: what waits, and what has been filled."""
    import sys

    try:
        counts, waiting, filled = summary(args.folder)
    except ReviewError as e:
        print(f"digits: {e}", file=sys.stderr)
        return 2
    print(
        f"{args.folder}: {counts['waiting']} waiting, {counts['filled']} filled, of {counts['rows']} "
        f"({counts['not sure']} not sure, {counts['not a digit']} not a digit"
        + (f", {counts[SURE]} sure, labelled with the model's answer)" if counts[SURE] else ")")
    )
    for title, rows in (("waiting", waiting), ("filled", filled)):
        if rows and args.show in (title, "all"):
            print(f"\n{title}:")
            for r in rows:
                line = f"{r['file']}\t{r['kind']} {r['answer']}\t{r['confidence']}\t{r['reason']}\t{r['source']}"
                if title == "filled":
                    problem = label_problem(r)
                    line += f"\tlabel {r['label'].strip()}" + (f"  ({problem})" if problem else "")
                print(line)
    return 0


def add_arguments(parser):
    parser.add_argument("folder", help="a folder that --review filled")
    parser.add_argument("--show", choices=["waiting", "filled", "all"], default="all", help="which rows to list")
