"""What one request may ask of the server: every limit is a constant here, enforced at the HTTP edge."""

from __future__ import annotations

from ..processing.image import MAX_IMAGE_PIXELS

MAX_BODY_BYTES = 48 * 2**20  # a JSON body with a base64 video, or a /video_qa upload, plus form overhead
MAX_IMAGE_BYTES = 20 * 2**20  # one encoded image (data URI after base64 decoding, or downloaded)
MAX_VIDEO_BYTES = 32 * 2**20  # one encoded video
MAX_MESSAGES = 512
MAX_N = 16  # choices per request; each is one engine request
MAX_STOP = 4  # stop strings per request (as OpenAI)
MAX_STOP_CHARS = 256  # per stop string

FETCH_TIMEOUT_S = 10.0  # whole download of one remote image / video, redirects included
MAX_REDIRECTS = 3

__all__ = [
    "MAX_BODY_BYTES", "MAX_IMAGE_BYTES", "MAX_VIDEO_BYTES", "MAX_IMAGE_PIXELS", "MAX_MESSAGES", "MAX_N",
    "MAX_STOP", "MAX_STOP_CHARS", "FETCH_TIMEOUT_S", "MAX_REDIRECTS",
]
