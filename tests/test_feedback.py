import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from bench import feedback as bench_feedback
from pipeline.serving import review
from pipeline.serving.api import create_app
from pipeline.serving.feedback import Feedback
from pipeline.serving.predictor import Predictor
from tests.helpers import draw_digit_seven


def png(image):
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def predictor(model_file):
    return Predictor(model_file)


def app_with_feedback(predictor, folder, **bounds):
    return TestClient(create_app(predictor, kept=Feedback(folder, predictor.identity, **bounds)))


def test_feedback_is_off_by_default_and_nothing_is_written(predictor, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with TestClient(create_app(predictor)) as client:
        answer = client.post("/feedback", files={"file": ("a.png", png(draw_digit_seven()))}, data={"label": "7"})
        assert answer.status_code == 404
        assert "/feedback" not in client.get("/openapi.json").json()["paths"]
    assert list(tmp_path.iterdir()) == []


def test_a_correction_is_kept_under_the_servers_name_with_its_label(predictor, tmp_path):
    folder = tmp_path / "feedback"
    with app_with_feedback(predictor, folder) as client:
        sent = draw_digit_seven(120, 120, offset=(20, 10)).convert("L")
        digit = client.post(
            "/feedback",
            files={"file": ("../../etc/passwd.png", png(sent))},
            data={"label": "7", "shown": "1", "visit": "visit-1"},
        )
        pixels = np.zeros((28, 84))
        pixels[8:20, 10:14] = pixels[8:20, 40:44] = 255
        number = client.post("/feedback", json={"pixels": pixels.tolist(), "label": "11", "kind": "number"})
    assert digit.status_code == 201 and number.status_code == 201, (digit.text, number.text)
    rows = review.read_rows(folder)
    assert [r["file"] for r in rows] == [digit.json()["file"], number.json()["file"]]
    assert [(r["label"], r["kind"], r["answer"], r["reason"]) for r in rows] == [
        ("7", "digit", "1", "feedback"),
        ("11", "number", "", "feedback"),
    ]
    assert rows[0]["group"] == "visit-1" and rows[0]["model"] == predictor.identity
    assert all(r["file"].startswith(f"{review.IMAGES}/") and "passwd" not in r["file"] for r in rows)
    assert np.array_equal(np.asarray(Image.open(folder / rows[0]["file"])), np.asarray(sent))
    assert np.array_equal(np.asarray(Image.open(folder / rows[1]["file"])), pixels.astype(np.uint8))


@pytest.mark.parametrize(
    "files, data, status",
    [
        ({"file": ("a.png", png(draw_digit_seven()))}, {"label": "seven"}, 422),
        ({"file": ("a.png", png(draw_digit_seven()))}, {"label": "71"}, 422),  # a number for a digit
        ({"file": ("a.png", png(draw_digit_seven()))}, {}, 422),
        ({"file": ("a.png", png(draw_digit_seven()))}, {"label": "7", "visit": "../x"}, 422),
        ({"file": ("a.png", png(Image.new("L", (40, 40), 255)))}, {"label": "7"}, 422),  # blank
        ({"file": ("a.txt", b"not an image")}, {"label": "7"}, 422),
        ({"image": ("a.png", png(draw_digit_seven()))}, {"label": "7"}, 422),
    ],
)
def test_bad_corrections_get_a_4xx_naming_the_problem_and_nothing_is_written(predictor, tmp_path, files, data, status):
    with app_with_feedback(predictor, tmp_path / "feedback") as client:
        answer = client.post("/feedback", files=files, data=data)
        assert answer.status_code == status and answer.json()["detail"]
        assert (
            client.post("/feedback", content=b"<xml/>", headers={"content-type": "application/xml"}).status_code == 415
        )
    assert review.read_rows(tmp_path / "feedback") == []
    assert list((tmp_path / "feedback" / review.IMAGES).iterdir()) == []


def test_a_client_over_its_rate_and_a_full_folder_get_429(predictor, tmp_path):
    seven = {"file": ("a.png", png(draw_digit_seven()))}
    with app_with_feedback(predictor, tmp_path / "rate", per_minute=3) as client:
        codes = [client.post("/feedback", files=seven, data={"label": "7"}).status_code for _ in range(4)]
    assert codes == [201, 201, 201, 429]
    with app_with_feedback(predictor, tmp_path / "quota", quota=2) as client:
        answers = [client.post("/feedback", files=seven, data={"label": "7"}) for _ in range(3)]
    assert [a.status_code for a in answers] == [201, 201, 429] and "quota of 2" in answers[2].json()["detail"]
    assert len(review.read_rows(tmp_path / "quota")) == 2


def test_under_load_with_bad_requests_every_accepted_correction_is_kept_once(model_file, tmp_path):
    result = bench_feedback.load(model_file, tmp_path / "feedback", requests=400, clients=32, workers=2, timeout=120)
    assert result["status_5xx"] == 0 and not result["errors"], result
    assert result["requests"] == 400 and 0 < result["bad_planned"] == 400 - result["accepted"], result
    assert result["rows"] == result["accepted"] and result["accepted_missing"] == result["rows_twice"] == 0, result
    assert result["rows_not_accepted"] == result["rows_without_image"] == result["rows_torn"] == 0, result


def test_a_server_killed_while_writing_loses_nothing_it_accepted(model_file, tmp_path):
    for kill in bench_feedback.kills(model_file, tmp_path / "feedback", repeats=2):
        assert kill["answered_201"] > 0, kill
        assert kill["accepted_missing"] == kill["rows_twice"] == kill["rows_torn"] == 0, kill
