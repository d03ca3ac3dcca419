"""The number reader (pipeline/core/reading/segment.py) on numbers written from real MNIST test digits, read
by a briefly trained CNN (conftest.trained_model_file), and the same answers from `digits read`
and POST /read. What it measures at full size is the read_eval stage's job."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw

from pipeline.core import normalize
from pipeline.core.reading import numbers, segment
from pipeline.read_eval import scores
from tests.helpers import ROOT


@pytest.fixture(scope="module")
def predictor(trained_model_file):
    from pipeline.serving.predictor import Predictor

    return Predictor(trained_model_file)


@pytest.fixture(scope="module")
def written(mnist):
    """Numbers of 5 test digits in each spacing kind, 20 of each."""
    rng = np.random.default_rng(0)
    x, y = mnist["x_test"][:2000] / np.float32(255), mnist["y_test"][:2000]
    return {kind: numbers.sample(x, y, [5], kind, 20, rng) for kind in numbers.KINDS}


def test_clear_numbers_are_cut_into_their_digits_and_read(written, predictor):
    readings = [(text, boxes, segment.read(image, predictor)) for image, text, boxes in written["clear"]]
    assert sum(len(r.digits) == 5 for _, _, r in readings) >= 18
    # Digits read right, matched in order as read_eval matches them (an extra digit shifts none).
    assert scores([(text, r) for text, _, r in readings])["digit_accuracy"] >= 0.9
    # Each digit's box is where the digit was written: its centre inside the written box.
    for _, boxes, r in readings:
        if len(r.digits) == 5:
            for written_box, digit in zip(boxes, r.digits, strict=True):
                centre = (digit.box[0] + digit.box[2]) / 2
                assert written_box[0] <= centre <= written_box[2]


def test_touching_digits_are_split(written, predictor):
    """Every one of these numbers has a pair of digits whose ink touches: one connected piece."""
    readings = [(text, segment.read(image, predictor)) for image, text, _ in written["touching"]]
    assert sum(len(r.digits) == len(text) for text, r in readings) >= 14


def test_a_number_is_sure_only_when_every_digit_is(written, predictor):
    """(How often sure readings are right with the real model: reports/reading.json.)"""
    readings = [segment.read(image, predictor) for kind in written.values() for image, _, _ in kind]
    assert all(r.sure == all(not d.not_sure for d in r.digits) for r in readings)
    assert {r.sure for r in readings} == {True, False}
    # A mark that is not a digit is "?" in the number, never a guessed digit.
    assert all(r.text == "".join("?" if d.not_a_digit else str(d.digit) for d in r.digits) for r in readings)


def strokes_image(strokes, size=(200, 100), width=6):
    image = Image.new("L", size, 255)
    pen = ImageDraw.Draw(image)
    for stroke in strokes:
        pen.line(stroke, fill=0, width=width)
    return np.asarray(image)


def test_a_digit_written_in_separate_strokes_is_one_piece():
    """A 4 whose two strokes do not meet, and a 5 whose bar floats off its body, each count once;
    a digit apart from them is its own piece."""
    four = [[(20, 20), (14, 55), (44, 55)], [(40, 28), (40, 85)]]
    five = [[(84, 38), (80, 58), (100, 58), (104, 74), (96, 84), (80, 82)], [(88, 22), (112, 22)]]
    one = [[(150, 20), (150, 85)]]
    ink = normalize.to_ink(normalize.to_gray(strokes_image(four + five + one)))
    pieces = segment.ink_pieces(ink)
    spans = [(left, right) for (_, _, left, right), _ in pieces]
    assert len(spans) == 3
    for (left, right), strokes in zip(spans, [four, five, one], strict=True):
        xs = [x for stroke in strokes for x, _ in stroke]
        assert left <= min(xs) and max(xs) < right  # the piece holds every stroke of its digit


def test_a_piece_cut_from_the_ink_reaches_the_model_as_the_same_ink_uploaded_would():
    """Both readers bring each cut piece to MNIST's form without re-measuring the paper (it is the
    zero background already); the form must be the one an upload of the piece gets."""
    four, five = [[(20, 20), (14, 55), (44, 55)], [(40, 28), (40, 85)]], [[(84, 38), (80, 58), (104, 74)]]
    ink = normalize.to_ink(normalize.to_gray(strokes_image(four + five)))
    for _, piece in segment.ink_pieces(ink):
        for part in (piece, piece[:, : piece.shape[1] // 2], 0.4 * piece):  # a whole piece, a split, faint ink
            assert np.array_equal(segment.mnist_form(part), normalize.to_mnist(np.pad(part, 2)))
    with pytest.raises(normalize.ImageError, match="blank"):
        segment.mnist_form(np.zeros((30, 20), np.float32))


def test_blank_and_cluttered_images_are_refused_with_a_reason(predictor):
    with pytest.raises(normalize.ImageError, match="blank"):
        segment.read(np.full((60, 200), 255, np.uint8), predictor)
    dots = [[(x, 30), (x + 2, 30)] for x in range(10, 400, 12)]
    with pytest.raises(segment.TooManyPieces, match=f"at most {segment.MAX_PIECES}"):
        segment.read(strokes_image(dots, size=(420, 60)), predictor)


def test_cli_api_and_reader_give_the_same_answer(written, predictor, trained_model_file, tmp_path):
    from fastapi.testclient import TestClient

    from pipeline.serving.api import create_app

    images = [written["clear"][0][0], written["touching"][0][0]]
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"number{i}.png")
        Image.fromarray(image).save(paths[-1])
    expected = [{"file": str(p), **segment.read(normalize.decode(p.read_bytes()), predictor).as_dict()} for p in paths]
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "read", *map(str, paths), "--format", "json", "--model",
         str(trained_model_file), "--reader", "segment"],
        capture_output=True, text=True, cwd=ROOT, check=True,
    )  # fmt: skip
    assert json.loads(done.stdout)["readings"] == expected
    with TestClient(create_app(predictor)) as client:
        for path, answer in zip(paths, expected, strict=True):
            upload = client.post("/read", files={"file": (path.name, path.read_bytes(), "image/png")})
            pixels = client.post("/read", json={"pixels": np.asarray(Image.open(path)).tolist()})
            for response in (upload, pixels):
                assert response.status_code == 200
                assert {k: v for k, v in response.json().items() if k not in ("model", "reader")} == {
                    k: v for k, v in answer.items() if k != "file"
                }


@pytest.mark.parametrize(
    ("request_kwargs", "status", "message"),
    [
        ({"json": {"pixels": [[0] * 10, [0] * 9]}}, 422, "different lengths"),
        ({"json": {"pixels": [[0] * 10] * 10}}, 422, "blank"),
        ({"json": {"pixels": [[300] * 10] * 10}}, 422, "pixels[0][0]"),
        ({"json": {"pixels": [[0] * 3000]}}, 422, "pixels[0]"),
        ({"content": b"{", "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
        ({"content": b"x", "headers": {"content-type": "text/plain"}}, 415, "multipart/form-data"),
        ({"files": {"file": ("x.png", b"not an image", "image/png")}}, 422, "not an image"),
        ({"content": b"0" * (normalize.MAX_BYTES + 10**6), "headers": {"content-type": "image/png"}}, 413, "limit"),
    ],
)
def test_bad_read_requests_get_a_4xx_that_names_the_problem(model_file, request_kwargs, status, message):
    from fastapi.testclient import TestClient

    from pipeline.serving.api import create_app
    from pipeline.serving.predictor import Predictor

    with TestClient(create_app(Predictor(model_file))) as client:
        response = client.post("/read", **request_kwargs)
    assert response.status_code == status
    assert message in response.json()["detail"]
