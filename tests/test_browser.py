"""The pages in a real headless Chromium: draw a digit with mouse strokes, and the page must show
what the API answers for the same canvas image; /docs renders with no internet."""

import base64
import io

import pytest

from tests.helpers import CHROMIUM, CHROMIUM_ARGS, offline_page

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium); .ci/run installs it"
    ),
]


def served(model, reader="segment", feedback=None):
    """(url, predictor, its reader of numbers) of a server answering with `model` and `reader`
    (keeping corrections in the folder `feedback`, if given), stopped when the generator closes."""
    from bench.servers import serve_in_background
    from pipeline.serving.feedback import Feedback
    from pipeline.serving.predictor import Predictor
    from pipeline.serving.reader import NumberReader

    predictor = Predictor(model)
    number_reader = NumberReader(reader, predictor)
    kept = feedback and Feedback(feedback, predictor.identity)
    url, uvicorn_server = serve_in_background(predictor, number_reader=number_reader, kept=kept)
    yield url, predictor, number_reader
    uvicorn_server.should_exit = True


@pytest.fixture(scope="module")
def server(model_file):
    yield from served(model_file)


@pytest.fixture(scope="module")
def reading_server(trained_model_file, trained_reader_file):
    yield from served(trained_model_file, trained_reader_file)


def drawn_answer(url, strokes, mode="digit", correction=None):
    """Draw `strokes` (lists of canvas points) with the mouse, wait until the page shows the answer
    for the last one, and return what it shows: digit, verdict, bar labels, and the canvas PNG.
    With `correction`, then answer the page's "Wrong? It is ..." with it and wait for its thanks."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(url)
        page.wait_for_selector(".bar")
        if mode != "digit":
            page.check(f"input[name=mode][value={mode}]")
        box = page.locator("#pad").bounding_box()
        for stroke in strokes:
            page.mouse.move(box["x"] + stroke[0][0], box["y"] + stroke[0][1])
            page.mouse.down()
            for x, y in stroke[1:]:
                page.mouse.move(box["x"] + x, box["y"] + y, steps=12)
            page.mouse.up()
        # The page marks which stroke its shown answer covers; wait until it covers the last one.
        page.wait_for_function(
            "(pad => pad.dataset.drawn && pad.dataset.answered === pad.dataset.drawn)(document.getElementById('pad'))",
            timeout=30000,
        )
        shown = {
            "digit": page.locator("#digit").inner_text(),
            "verdict": page.locator("#confidence").inner_text(),
            "bars": page.locator(".bar em").all_inner_texts(),
            "boxes": page.locator("#boxes span").all_inner_texts(),
            "png": base64.b64decode(
                page.evaluate("document.getElementById('pad').toDataURL('image/png')").split(",")[1]
            ),
            "offers_correction": page.locator("#correct").is_visible(),
        }
        if correction is not None:
            page.fill("#truth", correction)
            page.click("#correct button")
            page.wait_for_function("document.getElementById('thanks').textContent !== ''", timeout=30000)
            shown["thanks"] = page.locator("#thanks").inner_text()
        browser.close()
    return shown


def test_drawing_shows_the_apis_prediction(server):
    from fastapi.testclient import TestClient

    from pipeline.serving.api import create_app

    url, predictor, _ = server
    # A '7': a top bar, then a diagonal down to the left.
    shown = drawn_answer(url, [[(70, 60), (210, 60)], [(210, 60), (120, 240)]])
    with TestClient(create_app(predictor)) as client:
        api = client.post("/predict", files={"file": ("canvas.png", shown["png"], "image/png")}).json()
    assert int(shown["digit"]) == api["digit"]
    assert len(shown["bars"]) == 10
    assert shown["bars"][api["digit"]] == f"{api['probabilities'][api['digit']] * 100:.1f}%"
    # The untrained test model is never sure (see conftest.model_file), and the page says so.
    assert api["not_sure"] and shown["verdict"].startswith("Not sure: best guess")
    assert not shown["offers_correction"]  # feedback is off unless `digits serve --feedback DIR`


def test_a_correction_drawn_on_the_page_lands_in_the_feedback_folder(model_file, tmp_path):
    import numpy as np
    from PIL import Image

    from pipeline.serving import review

    url, _, _ = next(feedback_server := served(model_file, feedback=tmp_path / "feedback"))
    try:
        shown = drawn_answer(url, [[(70, 60), (210, 60)], [(210, 60), (120, 240)]], correction="7")
    finally:
        feedback_server.close()
    assert shown["offers_correction"] and shown["thanks"] == "Thank you: kept"
    (row,) = review.read_rows(tmp_path / "feedback")
    assert (row["label"], row["kind"], row["answer"], row["reason"]) == ("7", "digit", shown["digit"], "feedback")
    assert row["group"] and row["group"] != "127.0.0.1"  # the page visit's id
    kept = np.asarray(Image.open(tmp_path / "feedback" / row["file"]))
    drawn = np.asarray(Image.open(io.BytesIO(shown["png"])).convert("L"))
    assert kept.shape == drawn.shape and np.abs(kept.astype(int) - drawn).max() <= 1


def test_a_line_is_shown_as_not_a_digit(server):
    url, _, _ = server
    shown = drawn_answer(url, [[(20, 140), (260, 140)]])
    assert shown["verdict"] == "Not a digit" and shown["digit"] == "\u2014"


@pytest.mark.parametrize(
    ("name", "one_at"),
    [("apart", 330), ("touching", 185)],  # the 1's stroke crosses the 4's bar when drawn at 185
)
def test_a_written_number_is_read_by_the_line_reader(reading_server, name, one_at):
    """Number mode: "4 1 7" written on the wide pad, apart or with the 1 touching the 4: the page
    shows what the line reader answers through the API for the same canvas, a box per digit. Apart,
    even the briefly trained reader of the tests reads 417."""
    from fastapi.testclient import TestClient

    from pipeline.serving.api import create_app

    url, predictor, number_reader = reading_server
    four = [[(120, 50), (70, 150), (175, 150)], [(150, 80), (150, 200)]]
    one = [[(one_at, 50), (one_at, 200)]]
    seven = [[(one_at + 60, 55), (one_at + 170, 55)], [(one_at + 170, 55), (one_at + 90, 200)]]
    shown = drawn_answer(url, four + one + seven, mode="number")
    with TestClient(create_app(predictor, number_reader)) as client:
        api = client.post("/read", files={"file": ("canvas.png", shown["png"], "image/png")}).json()
    assert api["reader"] == number_reader.identity != "segment"
    assert shown["digit"] == api["number"]
    labels = ["not" if d["not_a_digit"] else str(d["digit"]) for d in api["digits"]]  # "not a digit"
    assert [label.split()[0] for label in shown["boxes"]] == labels
    if name == "apart":
        assert api["number"] == "417"


def test_api_docs_render_without_internet(server, tmp_path):
    from playwright.sync_api import sync_playwright

    url, _, _ = server
    with sync_playwright() as p:
        browser, page, refused = offline_page(p, [url])
        page.goto(f"{url}/docs")
        page.wait_for_selector(".opblock", timeout=30000)
        operations = page.locator(".opblock-summary-path").all_inner_texts()
        page.screenshot(path=tmp_path / "docs.png", full_page=True)
        browser.close()
    assert {"/predict", "/predict/batch", "/read", "/health/ready"} <= set(operations)
    assert refused == []  # Swagger UI's files come from the server itself
