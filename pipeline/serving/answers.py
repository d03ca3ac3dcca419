"""What an answer says, in every format: the answer to one digit image (the API's JSON, the CLI's
text, JSON and CSV, the CSV and Parquet of `digits score`) and to one whole number."""

import csv
import json
import sys

import numpy as np


def digit_answer(probabilities, not_a_digit, predictor):
    """The answer to one image: the digit, how sure, and whether it is "not sure" or "not a digit"."""
    return {
        "digit": int(np.argmax(probabilities)),
        "confidence": float(np.max(probabilities)),
        "not_sure": predictor.not_sure(probabilities, not_a_digit),
        "not_a_digit": bool(not_a_digit),
    }


def ranked(path, probabilities, not_a_digit, top_k, predictor):
    """digit_answer for a file, rounded as the CLI shows it, with the `top_k` likeliest digits."""
    answer = digit_answer(probabilities, not_a_digit, predictor)
    order = probabilities.argsort()[::-1][:top_k]
    return {
        "file": str(path),
        **answer,
        "confidence": round(answer["confidence"], 4),
        "top": [{"digit": int(d), "probability": round(float(probabilities[d]), 4)} for d in order],
    }


def csv_columns(top_k):
    return ["file", "digit", "confidence", "not_sure", "not_a_digit", *[f"top{i + 1}" for i in range(top_k)]]


def csv_row(r):
    """A `ranked` answer as a CSV row under csv_columns."""
    return [r["file"], r["digit"], r["confidence"], r["not_sure"], r["not_a_digit"]] + [
        f"{t['digit']}:{t['probability']}" for t in r["top"]
    ]


def text_line(r):
    """A `ranked` answer as a line of `digits predict`'s text output."""
    others = "  ".join(f"{t['digit']} {t['probability']:.1%}" for t in r["top"][1:])
    sure = "not a digit" if r["not_a_digit"] else "not sure" if r["not_sure"] else "sure"
    return f"{r['file']}\t{r['digit']}\t{r['confidence']:.1%}\t{sure}" + (f"\t(then {others})" if others else "")


READ_COLUMNS = ["file", "number", "sure", "digits", "boxes"]


def reading_row(r):
    """A reading of the number in a file ({"file": ..., **Reading.as_dict()}) as a CSV row under
    READ_COLUMNS."""
    return [
        r["file"],
        r["number"],
        r["sure"],
        " ".join(f"{d['digit']}:{d['confidence']}" for d in r["digits"]),
        ";".join(" ".join(map(str, d["box"])) for d in r["digits"]),
    ]


def reading_line(r):
    """A reading of the number in a file as a line of `digits read`'s text output: the whole number's
    confidence where the reader has one (the line reader's verifier judges the number, so it can be
    "not sure" of digits each read at 100 %), then each digit's."""
    each = "  ".join(f"{'?' if d['not_a_digit'] else d['digit']} {d['confidence']:.1%}" for d in r["digits"])
    whole = "" if r["confidence"] is None else f"{r['confidence']:.2%}\t"
    return f"{r['file']}\t{r['number']}\t{whole}{'sure' if r['sure'] else 'not sure'}\t({each})"


class Output:
    """Answers on stdout as they come (text, csv); json is one document at the end, the answers
    under `key` ("predictions" or "readings")."""

    def __init__(self, form, model_identity, columns, key):
        self.form, self.model_identity, self.key, self.rows = form, model_identity, key, []
        if form == "csv":
            self.csv = csv.writer(sys.stdout)
            self.csv.writerow(columns)

    def write(self, answer, as_row, as_line):
        """One answer (a dict); `as_row` and `as_line` make its CSV row and its text line."""
        if self.form == "json":
            self.rows.append(answer)
        elif self.form == "csv":
            self.csv.writerow(as_row(answer))
        else:
            print(as_line(answer))

    def close(self):
        if self.form == "json":
            print(json.dumps({"model": self.model_identity, self.key: self.rows}, indent=2))
        sys.stdout.flush()
