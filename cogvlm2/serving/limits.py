"""What one request may ask of the server: every limit is a constant here, enforced at the HTTP edge.

docs/serving.md lists each one and what a client gets past it.
"""

from __future__ import annotations

from ..processing.image import MAX_IMAGE_PIXELS
from ..processing.video import VIDEO_LIMITS

# sizes
MAX_BODY_BYTES = 48 * 2**20  # a JSON body with a base64 video, or a /video_qa upload, plus form overhead
MAX_IMAGE_BYTES = 20 * 2**20  # one encoded image (data URI after base64 decoding, or downloaded)
MAX_VIDEO_BYTES = 32 * 2**20  # one encoded video
MAX_MESSAGES = 512
MAX_N = 16  # choices per request; each is one engine request
MAX_STOP = 4  # stop strings per request (as OpenAI)
MAX_STOP_CHARS = 256  # per stop string
MAX_HEADER_BYTES = 64 * 2**10  # request line + headers (h11's incomplete-event limit)

FETCH_TIMEOUT_S = 10.0  # whole download of one remote image / video, redirects included
MAX_REDIRECTS = 3

# admission: engine requests admitted but not started yet (preprocessing, or queued in the engine)
MAX_WAITING = 128  # default of `serve --max-waiting`; past it: 503 with Retry-After
RETRY_AFTER_S = 1
MAX_CONCURRENT_PREPROCESS = 2  # requests decoding media / tokenizing at once (threads off the event loop)

# connections and time
MAX_CONNECTIONS = 1024  # default of `serve --max-connections`, lowered to fit the open-file limit
RESERVED_FDS = 64  # file descriptors kept free for the model, logs and media (not counted as connections)
HEADER_TIMEOUT_S = 10.0  # from connecting (or the first byte of a kept-alive request) to the end of its headers
BODY_TIMEOUT_S = 60.0  # from the headers to the end of the body
KEEP_ALIVE_S = 5  # an idle kept-alive connection is closed after this
DRAIN_TIMEOUT_S = 5.0  # on SIGINT / SIGTERM: open requests may finish for this long, then end with an error

__all__ = [
    "MAX_BODY_BYTES", "MAX_IMAGE_BYTES", "MAX_VIDEO_BYTES", "MAX_IMAGE_PIXELS", "VIDEO_LIMITS", "MAX_MESSAGES",
    "MAX_N", "MAX_STOP", "MAX_STOP_CHARS", "MAX_HEADER_BYTES", "FETCH_TIMEOUT_S", "MAX_REDIRECTS", "MAX_WAITING",
    "RETRY_AFTER_S", "MAX_CONCURRENT_PREPROCESS", "MAX_CONNECTIONS", "RESERVED_FDS", "HEADER_TIMEOUT_S",
    "BODY_TIMEOUT_S", "KEEP_ALIVE_S", "DRAIN_TIMEOUT_S",
]
