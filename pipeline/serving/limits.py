"""Request body limits per route, enforced before a body is read past them (413). The numbers live
here, beside the middleware that reads them; the routes' OpenAPI documents quote them."""

from fastapi import HTTPException
from fastapi.responses import JSONResponse

from pipeline.core import normalize

MAX_BATCH = 64
MAX_JSON_BYTES = 1024 * 1024  # 28x28 numbers as JSON take about 20 KB
READ_MAX_ROWS, READ_MAX_COLUMNS = 256, 2048  # the largest pixel array /read takes as JSON
READ_MAX_JSON_BYTES = 8 * 1024 * 1024  # that many numbers of up to 7 characters ("254.5, ") fit
FEEDBACK_MAX_JSON_BYTES = READ_MAX_JSON_BYTES
MULTIPART_OVERHEAD = 64 * 1024  # boundaries and part headers around the files
BODY_LIMITS = {  # bytes a request body may have, by route; 413 beyond
    "/predict": normalize.MAX_BYTES + MULTIPART_OVERHEAD,
    "/predict/batch": 4 * normalize.MAX_BYTES + MULTIPART_OVERHEAD,
    "/read": normalize.MAX_BYTES + MULTIPART_OVERHEAD,
    "/feedback": normalize.MAX_BYTES + MULTIPART_OVERHEAD,
}
OTHER_ROUTES_BODY_LIMIT = 64 * 1024


class BodyLimit:
    """ASGI middleware: a request body over its route's limit gets 413 without being read further,
    whether it declares its length or streams chunks. (Starlette and uvicorn have no such limit.)"""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = BODY_LIMITS.get(scope["path"], OTHER_ROUTES_BODY_LIMIT)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            return await too_large(int(declared), limit)(scope, receive, send)
        seen = 0

        async def counted_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise HTTPException(413, f"request body is over the {limit:,}-byte limit of {scope['path']}")
            return message

        await self.app(scope, counted_receive, send)


def too_large(size, limit):
    return JSONResponse({"detail": f"request body of {size:,} bytes is over the {limit:,}-byte limit"}, 413)
