"""REST API and drawing page: `digits serve`, then open http://127.0.0.1:8000/.

  GET  /               the drawing page (pipeline/static/index.html)
  GET  /health         status and the model's identity
  POST /predict        one image: multipart upload (field `file`), or JSON {"pixels": 28x28 array}
  POST /predict/batch  several images: multipart upload (field `files`, repeated)
  GET  /docs           OpenAPI documentation
Bad input is answered with a 4xx and a message, never a 500.
"""

import json
import socket
import threading
import time
from pathlib import Path

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from pipeline import normalize
from pipeline.predictor import Predictor

STATIC = Path(__file__).parent / "static"
MAX_BATCH = 64
MAX_JSON_BYTES = 1024 * 1024  # 28x28 numbers as JSON take about 20 KB


async def json_body(request):
    """The request body, refused with 413 as soon as it is over MAX_JSON_BYTES (before the rest is read)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_JSON_BYTES:
        raise HTTPException(413, f"JSON body of {int(declared):,} bytes is over the {MAX_JSON_BYTES:,}-byte limit")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_JSON_BYTES:
            raise HTTPException(413, f"JSON body is over the {MAX_JSON_BYTES:,}-byte limit")
    return bytes(body)


def answer(probabilities, predictor, name=None):
    result = {"digit": int(np.argmax(probabilities)), "confidence": float(np.max(probabilities)),
              "probabilities": [round(float(p), 6) for p in probabilities], "model": predictor.identity}
    return {"file": name, **result} if name is not None else result


async def uploaded_images(request, field):
    """The images uploaded under `field`, normalised; 4xx on anything else."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise HTTPException(415, f"expected multipart/form-data with field '{field}' (or JSON with 'pixels'), "
                                 f"got content type '{content_type or 'none'}'")
    try:
        form = await request.form(max_files=MAX_BATCH, max_part_size=normalize.MAX_BYTES + 1)
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
            images.append(normalize.to_mnist(normalize.decode(data, name)))
        except normalize.ImageTooLarge as e:
            raise HTTPException(413, str(e)) from None
        except normalize.ImageError as e:
            raise HTTPException(422, str(e)) from None
        names.append(name)
    return images, names


def create_app(predictor: Predictor) -> FastAPI:
    app = FastAPI(title="MNIST digits", description="Recognise handwritten digits with the pipeline's CNN.")

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html")

    @app.get("/health")
    def health():
        return {"status": "ok", "model": predictor.identity, "source": predictor.source,
                "registered_model": predictor.registered}

    @app.post("/predict", openapi_extra={"requestBody": {"content": {
        "multipart/form-data": {"schema": {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}}}},
        "application/json": {"schema": {"type": "object", "properties": {"pixels": {
            "type": "array", "items": {"type": "array", "items": {"type": "number"}}}}}}}}})
    async def predict(request: Request):
        """Predict one digit: upload an image file (any size, either polarity) or send 28x28 pixels."""
        if request.headers.get("content-type", "").startswith("application/json"):
            try:
                body = json.loads(await json_body(request))
                image = normalize.from_array(body["pixels"])
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise HTTPException(400, "body is not valid JSON") from None
            except RecursionError:
                raise HTTPException(400, "JSON body is nested too deeply") from None
            except (KeyError, TypeError):
                raise HTTPException(422, "JSON body must be an object with 'pixels': a 28x28 array of numbers") from None
            except (ValueError, normalize.ImageError) as e:
                raise HTTPException(422, str(e)) from None
            return answer((await run_in_threadpool(predictor.probabilities, [image]))[0], predictor)
        images, names = await uploaded_images(request, "file")
        # The model runs in a worker thread, so the event loop keeps accepting other requests.
        return answer((await run_in_threadpool(predictor.probabilities, images[:1]))[0], predictor)

    @app.post("/predict/batch", openapi_extra={"requestBody": {"content": {"multipart/form-data": {"schema": {
        "type": "object", "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}}}}})
    async def predict_batch(request: Request):
        """Predict several uploaded images at once (form field `files`, repeated; at most 64)."""
        images, names = await uploaded_images(request, "files")
        probabilities = await run_in_threadpool(predictor.probabilities, images)
        return {"predictions": [answer(p, predictor, name) for p, name in zip(probabilities, names)]}

    return app


def serve_in_background(predictor, host="127.0.0.1"):
    """Start the app with uvicorn in a daemon thread on a free port (benchmarks, browser tests).
    Returns the base URL and the server; set `server.should_exit = True` to stop it."""
    import uvicorn

    with socket.socket() as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(predictor), host=host, port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port} within 30 s")
        time.sleep(0.05)
    return f"http://{host}:{port}", server
