"""Every error leaves the server as OpenAI's JSON: `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import logging
from http import HTTPStatus

from .protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)

# pydantic names union branches in error locations; they are not request fields.
_UNION_TAGS = {"system", "developer", "user", "assistant", "text", "image_url", "video_url", "refusal"}


class APIError(Exception):
    """A request we refuse, with the status and OpenAI error fields to answer with."""

    def __init__(self, message: str, status: int = 400, type: str | None = None, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def to_response(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code))


def error_for_status(status: int, detail: str | None = None, headers: dict[str, str] | None = None) -> APIError:
    phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
    return APIError(detail or phrase, status=status, headers=headers)


def _param(loc: tuple) -> str | None:
    """('body', 'messages', 0, 'user', 'content', 'list[...]', 1, 'image_url', 'image_url', 'url')
    -> 'messages.0.content.1.image_url.url' (union branch names dropped)."""
    out: list[str] = []
    prev = None
    for item in loc:
        skip = (
            (isinstance(item, str) and ("[" in item or item in ("body", "str", "int", "float", "bool", "none")))
            or (isinstance(item, str) and isinstance(prev, int) and item in _UNION_TAGS)
        )
        prev = item
        if not skip:
            out.append(str(item))
    return ".".join(out) or None


def validation_error(errors: list[dict]) -> APIError:
    """The most specific of pydantic's errors (the deepest location: for `str | list[...]` the branch
    that matched the input's shape), as one clear 400."""
    if not errors:
        return APIError("invalid request")
    err = max(errors, key=lambda e: len(e.get("loc", ())))
    if err.get("type") == "json_invalid":
        reason = (err.get("ctx") or {}).get("error", "")
        return APIError(f"invalid JSON body: {reason}".rstrip(": "), code="invalid_json")
    param = _param(tuple(err.get("loc", ())))
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    if err.get("type") == "missing" and param:
        msg = f"{param}: this field is required"
    elif param and not msg.startswith(f"{param}:"):
        msg = f"{param}: {msg}"
    return APIError(msg, param=param)


def install_error_handlers(app) -> None:
    """Map APIError, FastAPI's 422 validation errors and Starlette's HTTP errors (404 route, 405) to
    OpenAI's format; anything unexpected becomes a 500 without internals in the message."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    def respond(err: APIError) -> JSONResponse:
        metrics = getattr(app.state, "metrics", None)
        if metrics is not None:
            metrics.errors.labels(status=str(err.status)).inc()
        return JSONResponse(err.to_response().model_dump(), status_code=err.status, headers=err.headers or None)

    async def on_api_error(request, exc: APIError):
        return respond(exc)

    async def on_validation_error(request, exc: RequestValidationError):
        return respond(validation_error(list(exc.errors())))

    async def on_http_error(request, exc: StarletteHTTPException):
        detail = exc.detail if isinstance(exc.detail, str) else None
        return respond(error_for_status(exc.status_code, detail, dict(exc.headers or {})))  # 405 keeps its Allow

    async def on_unexpected(request, exc: Exception):
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return respond(APIError(f"internal server error ({type(exc).__name__})", status=500))

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
