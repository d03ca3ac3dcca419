"""REST API and drawing page: `digits serve`, then open http://127.0.0.1:8000/.

  GET  /               the drawing page (pipeline/serving/static/index.html)
  GET  /health         status and the model's identity (also /health/live, /health/ready)
  POST /predict        one image: multipart upload (field `file`), or JSON {"pixels": 28x28 array}
  POST /predict/batch  several images: multipart upload (field `files`, repeated)
  POST /read           a whole number (1-10 digits on a line): multipart upload (field `file`), or
                       JSON {"pixels": rows of grey levels, any width}
  POST /feedback       a person's correction (image and label), kept for fine-tuning; only with
                       `digits serve --feedback DIR` (pipeline/serving/feedback.py), 404 otherwise
  GET  /metrics        Prometheus metrics: requests, latencies, model batch sizes, model identity
  GET  /docs           OpenAPI documentation
Bad input is answered with a 4xx and a message, never a 500. Concurrent requests share model
calls: images that arrive while the model is busy go into its next batch.
"""

import asyncio
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, Field, ValidationError
from starlette.datastructures import UploadFile

from pipeline.core import normalize
from pipeline.serving import answers, feedback
from pipeline.serving.batcher import MicroBatcher
from pipeline.serving.limits import (
    FEEDBACK_MAX_JSON_BYTES,
    MAX_BATCH,
    MAX_JSON_BYTES,
    READ_MAX_COLUMNS,
    READ_MAX_JSON_BYTES,
    READ_MAX_ROWS,
    BodyLimit,
)
from pipeline.serving.predictor import DEFAULT_MODEL, Predictor
from pipeline.serving.reader import DEFAULT_READER, SEGMENT, NumberReader

STATIC = Path(__file__).parent / "static"
IMAGE_FILE_SCHEMA = {
    "type": "string",
    "format": "binary",
    "description": f"an image file PIL can read (PNG, JPEG, BMP, GIF, WebP, TIFF), at most "
    f"{normalize.MAX_BYTES:,} bytes and {normalize.MAX_PIXELS:,} pixels",
}


Pixel = Annotated[float, Field(strict=True, ge=0, le=255)]  # strict: true, false and "1" are not numbers
PixelRow = Annotated[list[Pixel], Field(min_length=28, max_length=28)]


class PixelsBody(BaseModel):
    pixels: Annotated[
        list[PixelRow],
        Field(
            min_length=28,
            max_length=28,
            description=("28 rows of 28 grey levels, white ink on black as in MNIST: 0-1, or 0-255"),
        ),
    ]


ReadRow = Annotated[list[Pixel], Field(min_length=1, max_length=READ_MAX_COLUMNS)]


class ReadPixelsBody(BaseModel):
    pixels: Annotated[
        list[ReadRow],
        Field(
            min_length=1,
            max_length=READ_MAX_ROWS,
            description=f"rows of grey levels (0-1 or 0-255), all of one length: at most {READ_MAX_ROWS} rows "
            f"of {READ_MAX_COLUMNS}; either polarity",
        ),
    ]


class Correction(BaseModel):
    label: Annotated[str, Field(pattern=feedback.LABEL, description='what the image shows: a digit, a number, or "-"')]
    kind: Literal["digit", "number"] = Field(default="digit", description="a digit (/predict) or a number (/read)")
    shown: Annotated[str, Field(pattern=feedback.SHOWN, description="the answer the person was shown")] = ""
    visit: Annotated[str | None, Field(pattern=feedback.VISIT, description="one page visit's id")] = None


class PixelsCorrection(Correction):
    pixels: Annotated[list[ReadRow], Field(min_length=1, max_length=READ_MAX_ROWS, description="rows of grey levels")]


class Stored(BaseModel):
    file: str = Field(description="the image's name in the feedback folder, given by the server")
    label: str
    kind: str


def request_body(content):
    """OpenAPI for a required body the handler reads itself (it takes either of two content types)."""
    return {"requestBody": {"required": True, "content": content}}


def form_schema(field, schema):
    return {"schema": {"type": "object", "required": [field], "properties": {field: schema}}}


def file_or_pixels(pixels_body):
    """OpenAPI for a route that takes one image file (field `file`) or JSON pixels."""
    return request_body(
        {
            "multipart/form-data": form_schema("file", IMAGE_FILE_SCHEMA),
            "application/json": {"schema": pixels_body.model_json_schema()},
        }
    )


class Prediction(BaseModel):
    digit: int = Field(ge=0, le=9)
    confidence: float = Field(ge=0, le=1, description="the calibrated probability of `digit`")
    not_sure: bool = Field(
        description="`confidence` is below the threshold at which answers were 99.9 % right on validation, "
        "or the image is not a digit: `digit` is only the best guess"
    )
    not_a_digit: bool = Field(
        description="the image does not look like one handwritten digit (noise, a blank scan, a line, "
        "letters, several digits): `digit` is meaningless"
    )
    probabilities: list[float] = Field(min_length=10, max_length=10, description="one per digit 0-9")
    model: str = Field(description="identity of the model that answered (file hash or MLflow URI)")


class FilePrediction(Prediction):
    file: str


class BatchPredictions(BaseModel):
    predictions: list[FilePrediction]


class ReadDigit(BaseModel):
    box: list[int] = Field(min_length=4, max_length=4, description="left, top, right, bottom in pixels (exclusive)")
    digit: int = Field(ge=0, le=9, description="the best guess (meaningless when `not_a_digit`)")
    confidence: float = Field(ge=0, le=1)
    not_sure: bool
    not_a_digit: bool


class Reading(BaseModel):
    number: str = Field(description='the digits left to right; "?" where a mark is not a digit')
    sure: bool = Field(
        description="the number can be trusted: its confidence reaches the line reader's calibrated "
        'threshold and no mark is "?" (with the segmenting reader: every digit is sure)'
    )
    confidence: float | None = Field(
        default=None, ge=0, le=1, description="the whole number's calibrated confidence (line reader only)"
    )
    digits: list[ReadDigit]
    model: str
    reader: str = Field(description="the reader's identity: the line reader's sha256, or `segment`")


class Problem(BaseModel):
    detail: str


PROBLEMS = {
    400: {
        "model": Problem,
        "description": "the body cannot be parsed (broken multipart, invalid or too deeply nested JSON)",
    },
    413: {"model": Problem, "description": "the body, a file or an image's pixel count is over its limit"},
    415: {"model": Problem, "description": "the content type is not one the route accepts"},
    422: {
        "model": Problem,
        "description": "the body parses but is not what the route needs (no file, not an "
        "image, a blank image, pixels of the wrong shape or range)",
    },
}


def answer(probabilities, not_a_digit, predictor, name=None):
    result = {
        **answers.digit_answer(probabilities, not_a_digit, predictor),
        "probabilities": [round(float(p), 6) for p in probabilities],
        "model": predictor.identity,
    }
    return {"file": name, **result} if name is not None else result


async def json_body(request, schema, expected, limit=MAX_JSON_BYTES):
    """A JSON body validated against `schema`; 4xx naming the first problem otherwise."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPException(413, f"JSON body is over the {limit:,}-byte limit")
    try:
        return schema.model_validate_json(body)
    except ValidationError as e:
        first = e.errors()[0]
        if first["type"] == "json_invalid":  # includes nesting deeper than the parser's limit
            raise HTTPException(400, f"body is not valid JSON: {first['msg']}") from None
        raise HTTPException(422, f"{first_problem(e, 'body')}; expected {expected}") from None


def first_problem(error, whole):
    """A pydantic ValidationError as one line: where its first problem is (`whole` when the whole
    input), what it is, and how many more there are."""
    first = error.errors()[0]
    where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in first["loc"]).lstrip(".")
    more = f" (and {error.error_count() - 1} more problems)" if error.error_count() > 1 else ""
    return f"{where or whole}: {first['msg']}{more}"


def rectangle(pixels):
    """JSON pixel rows as a float32 array; 422 when the rows differ in length."""
    if len({len(row) for row in pixels}) > 1:
        raise HTTPException(422, "pixels: rows have different lengths; expected a rectangle")
    return np.asarray(pixels, np.float32)


async def json_pixels(request):
    """The 28x28 image of a JSON body {"pixels": [[...], ...]}; 4xx on anything else."""
    pixels = (await json_body(request, PixelsBody, '{"pixels": 28 rows of 28 numbers in [0, 255]}')).pixels
    try:
        return normalize.from_array(pixels)
    except normalize.ImageError as e:
        raise HTTPException(422, str(e)) from None


async def uploaded_images(request, field, prepare=normalize.to_mnist, text_fields=None):
    """The images uploaded under `field`, decoded and prepared (brought to MNIST form), and their
    names; 4xx on anything else. With `text_fields`, also the form's values of those fields."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise HTTPException(
            415,
            f"expected multipart/form-data with field '{field}' (or JSON with 'pixels'), "
            f"got content type '{content_type or 'none'}'",
        )
    try:
        form = await request.form(max_files=MAX_BATCH, max_part_size=normalize.MAX_BYTES + 1)
    except HTTPException:
        raise
    except Exception as e:  # malformed multipart bodies raise several starlette/multipart errors
        raise HTTPException(400, f"could not read the multipart body: {e}") from None
    uploads = [u for u in form.getlist(field) if isinstance(u, UploadFile)]
    if not uploads:
        raise HTTPException(422, f"no file in form field '{field}'")
    images, names = [], []
    for upload in uploads:
        data = await upload.read(normalize.MAX_BYTES + 1)
        name = upload.filename or "upload"
        try:
            images.append(prepare(normalize.decode(data, name)))
        except normalize.ImageTooLarge as e:
            raise HTTPException(413, str(e)) from None
        except normalize.ImageError as e:
            raise HTTPException(422, str(e)) from None
        names.append(name)
    if text_fields is None:
        return images, names
    return images, names, {k: form.get(k) for k in text_fields if isinstance(form.get(k), str)}


def model_metrics(predictor):
    """The app's own Prometheus registry (tests and benchmarks create several apps in one process),
    with the model's batch sizes and seconds per call, and which model answers. Returns the
    registry and the function the batcher calls after each model call."""
    from prometheus_client import CollectorRegistry, Gauge, Histogram

    registry = CollectorRegistry()
    batch_sizes = Histogram(
        "digits_model_batch_size",
        "Images per model call",
        buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        registry=registry,
    )
    batch_seconds = Histogram(
        "digits_model_batch_seconds",
        "Seconds per model call",
        buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25),
        registry=registry,
    )
    model_info = Gauge(
        "digits_model_info",
        "The model that answers (always 1)",
        ["model", "source"],
        multiprocess_mode="max",
        registry=registry,
    )
    model_info.labels(predictor.identity, predictor.source).set(1)

    def record(size, seconds):
        batch_sizes.observe(size)
        batch_seconds.observe(seconds)

    return registry, record


def health_routes(predictor, state, feedback_on=False):
    router = APIRouter()

    @router.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html")

    @router.get("/health")
    def health():
        return {
            "status": "ok",
            "model": predictor.identity,
            "source": predictor.source,
            "runtime": predictor.runtime,
            "registered_model": predictor.registered,
            "feedback": feedback_on,
            "calibration": predictor.calibration
            and {key: predictor.calibration[key] for key in ("temperature", "not_sure_below", "accepted_accuracy")},
        }

    @router.get("/health/live")
    def live():
        """The process answers."""
        return {"status": "ok"}

    @router.get("/health/ready", responses={503: {"model": Problem, "description": "not ready: starting or stopping"}})
    def ready():
        """Ready for traffic: the model is loaded and has answered its warm-up call."""
        if not state["ready"]:
            raise HTTPException(503, "the model is not ready")
        return {"status": "ready", "model": predictor.identity}

    return router


def digit_routes(predictor, batcher):
    router = APIRouter()

    @router.post("/predict", response_model=Prediction, responses=PROBLEMS, openapi_extra=file_or_pixels(PixelsBody))
    async def predict(request: Request):
        """Predict one digit: upload an image file (any size, either polarity) or send 28x28 pixels
        (0-1 or 0-255, white ink on black, as MNIST)."""
        if request.headers.get("content-type", "").startswith("application/json"):
            image = await json_pixels(request)
        else:
            images, _ = await uploaded_images(request, "file")
            image = images[0]
        probabilities, not_a_digit = await batcher([image])
        return answer(probabilities[0], not_a_digit[0], predictor)

    @router.post(
        "/predict/batch",
        response_model=BatchPredictions,
        responses=PROBLEMS,
        openapi_extra=request_body(
            {
                "multipart/form-data": form_schema(
                    "files", {"type": "array", "minItems": 1, "maxItems": MAX_BATCH, "items": IMAGE_FILE_SCHEMA}
                )
            }
        ),
    )
    async def predict_batch(request: Request):
        """Predict several uploaded images at once (form field `files`, repeated; at most 64 files,
        4 times the one-file limit in all)."""
        images, names = await uploaded_images(request, "files")
        probabilities, not_a_digit = await batcher(images)
        return {
            "predictions": [
                answer(p, flag, predictor, name)
                for p, flag, name in zip(probabilities, not_a_digit, names, strict=True)
            ]
        }

    return router


def number_routes(number_reader):
    router = APIRouter()

    @router.post("/read", response_model=Reading, responses=PROBLEMS, openapi_extra=file_or_pixels(ReadPixelsBody))
    async def read_number(request: Request):
        """Read a whole number written on a line (a ZIP code, an amount; 1-10 digits): the string,
        and each digit's box, answer and flags. The number is sure only when every digit is."""
        if request.headers.get("content-type", "").startswith("application/json"):
            body = await json_body(
                request, ReadPixelsBody, '{"pixels": rows of numbers in [0, 255], any width}', READ_MAX_JSON_BYTES
            )
            image = rectangle(body.pixels)
        else:
            images, _ = await uploaded_images(request, "file", prepare=lambda image: image)
            image = images[0]
        try:
            found = await run_in_threadpool(number_reader.read, image)
        except normalize.ImageError as e:
            raise HTTPException(422, str(e)) from None
        return {**found.as_dict(), "model": number_reader.predictor.identity, "reader": number_reader.identity}

    return router


def feedback_routes(kept):
    router = APIRouter()
    multipart = form_schema("file", IMAGE_FILE_SCHEMA)
    multipart["schema"]["required"].append("label")
    multipart["schema"]["properties"] |= Correction.model_json_schema()["properties"]
    content = {"multipart/form-data": multipart, "application/json": {"schema": PixelsCorrection.model_json_schema()}}

    @router.post(
        "/feedback",
        status_code=201,
        response_model=Stored,
        responses={
            **PROBLEMS,
            429: {"model": Problem, "description": "too many from this client, or the folder is full"},
        },
        openapi_extra=request_body(content),
    )
    async def post_feedback(request: Request):
        """A person's correction: an image (file or pixels) and what it really shows, kept in the
        feedback folder for `digits finetune`."""
        client = request.client.host if request.client else "unknown"
        kept.admit(client)
        if request.headers.get("content-type", "").startswith("application/json"):
            body = await json_body(request, PixelsCorrection, '{"pixels": rows, "label": "7"}', FEEDBACK_MAX_JSON_BYTES)
            correction, image = body, rectangle(body.pixels)
        else:
            images, _, fields = await uploaded_images(request, "file", lambda image: image, Correction.model_fields)
            try:
                correction = Correction.model_validate(fields)
            except ValidationError as e:
                raise HTTPException(422, first_problem(e, "form")) from None
            image = images[0]
        name = await run_in_threadpool(kept.keep, image, correction, client)
        return {"file": name, "label": correction.label, "kind": correction.kind}

    return router


def create_app(predictor: Predictor, number_reader: NumberReader | None = None, kept=None) -> FastAPI:
    """The app answering with `predictor`; `/read` with `number_reader` (default: the segmenting
    reader on `predictor`); `/feedback` only with `kept`, a feedback.Feedback."""
    from prometheus_fastapi_instrumentator import Instrumentator

    registry, record = model_metrics(predictor)
    batcher = MicroBatcher(predictor.predict, record)
    state = {"ready": False}

    @asynccontextmanager
    async def lifespan(app):
        task = asyncio.create_task(batcher.run())
        await batcher(np.zeros((1, 28, 28), np.float32))  # the first call through the whole path
        state["ready"] = True
        yield
        state["ready"] = False
        task.cancel()

    # FastAPIOffline: /docs served with Swagger UI's files from the package, not from a CDN.
    app = FastAPIOffline(
        title="MNIST digits", description="Recognise handwritten digits with the pipeline's CNN.", lifespan=lifespan
    )
    app.add_middleware(BodyLimit)
    # Request counts by route and status, and a latency histogram; a client's abort is not a 5xx.
    Instrumentator(excluded_handlers=["/metrics"], registry=registry).instrument(app).expose(
        app, include_in_schema=False
    )
    number_reader = number_reader or NumberReader(SEGMENT, predictor)
    routers = [health_routes(predictor, state, kept is not None), digit_routes(predictor, batcher)]
    routers += [number_routes(number_reader)] + ([feedback_routes(kept)] if kept is not None else [])
    for router in routers:
        app.include_router(router)
    return app


def app_from_environment():
    """App factory for `uvicorn --factory` and `digits serve --workers N`: each worker process loads
    the model named by DIGITS_MODEL, on DIGITS_RUNTIME (default onnx), with DIGITS_THREADS threads,
    and the reader of numbers named by DIGITS_READER (default models/reader.onnx; or `segment`);
    feedback as DIGITS_FEEDBACK* say (feedback.from_environment)."""
    import os

    model, runtime = os.environ.get("DIGITS_MODEL", DEFAULT_MODEL), os.environ.get("DIGITS_RUNTIME", "onnx")
    predictor = Predictor(model, runtime)
    reader = NumberReader(os.environ.get("DIGITS_READER", DEFAULT_READER), predictor)
    return create_app(predictor, reader, feedback.from_environment(predictor.identity))
