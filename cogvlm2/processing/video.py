"""Video input for the CogVLM2 video models: PyAV decoding, decord-compatible frame selection, pixel transform.

The official CogVLM2 video models (``cogvlm2-video-llama3-chat`` / ``-base`` and
``cogvlm2-llama3-caption``) read videos with decord and preprocess them with a
pytorchvideo/torchvision transform.  This module reproduces both without those
dependencies (only ``torch``, ``numpy`` and ``av``):

* :func:`decode_video` selects the *same frames* as the official ``load_video``
  (strategies ``"chat"`` and ``"base"``) and returns them as ``uint8`` ``(C, T, H, W)`` RGB;
* :func:`transform_video` is the official transform, bit-exact in float32 on CPU:
  ``/255`` -> CLIP mean/std normalisation -> short-side bilinear resize -> centre crop
  -> ``(T, C, S, S)``;
* :func:`load_video` chains the two.

Frame selection, as decord does it
----------------------------------
decord indexes a video by *demuxing* every packet of the (best) video stream; the
frame count is the number of packets, frame ``i`` is the packet with the ``i``-th
smallest pts, and its start time in seconds is computed in mixed float32 / float64
exactly like decord's C++ (``timestamp_t`` is ``float``)::

    start_i = float32( float64( float32(pts_i) - float32(stream.start_time) ) * (tb.num / tb.den) )

(``stream.start_time`` is taken as 0 when unknown).  The average fps is the stream's
``avg_frame_rate`` (PyAV ``stream.average_rate``); when the container does not know it,
we fall back to ``frames / duration``.

We therefore decode in two cheap passes instead of keeping every decoded frame:

1. demux only (no decoding) to collect the packets' pts -> timestamps, frame count;
   the selected indices are computed from those (``"chat"`` needs *all* timestamps
   before it can choose anything, because the number of seconds depends on the last one);
2. decode sequentially from the start, converting to RGB only the frames whose index
   was selected, and stop right after the last selected one.

Decoded frames come out in presentation order, so the ``i``-th decoded frame is the
``i``-th frame in pts order, i.e. decord's frame ``i``.  Sequential decoding was
preferred over seeking because seeking in arbitrary containers is not frame-accurate,
and the selected frames lie within the first 24 s (chat) / 60 s (base) anyway.

Checked against decord 0.6.0 (the official loader run verbatim) on mp4/mkv/mpegts
files from mpeg4 and libx264 (with B-frames), constant / NTSC / irregular frame
rates, non-zero start times and an audio stream placed first: same timestamps, same
fps, same indices and pixel-identical RGB frames.  Deliberate differences, all for
inputs decord handles badly anyway: zero-size packets are not counted as frames (they
decode to nothing); a packet without pts uses its dts (then its order); a truncated
file keeps the frames indexed before the error; if the decoder yields fewer frames
than there are packets, a missing selected frame is replaced by the nearest earlier
decoded one (with a ``RuntimeWarning``).  Like decord, rotation metadata is ignored.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import warnings
from dataclasses import dataclass
from fractions import Fraction
from typing import BinaryIO, Callable, Union

import av
import numpy as np
import torch
import torch.nn.functional as F

from .image import CLIP_MEAN, CLIP_STD  # OpenAI CLIP normalisation, as for images

__all__ = [
    "NUM_FRAMES",
    "BASE_CLIP_SECONDS",
    "STRATEGIES",
    "CLIP_MEAN",
    "CLIP_STD",
    "VideoError",
    "VideoInfo",
    "probe_video",
    "frame_timestamps",
    "select_frame_indices",
    "decode_video",
    "transform_video",
    "load_video",
    "video_pixels",
    "frames_digest",
    "scaled_size",
    "VideoLimits",
    "VIDEO_LIMITS",
]

NUM_FRAMES = 24
BASE_CLIP_SECONDS = 60
STRATEGIES = ("chat", "base")

VideoSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO]


class VideoError(ValueError):
    """The input could not be read as a video (empty, undecodable, no video stream, no frames), or it
    exceeds the decoding limits (VideoLimits)."""


@dataclass(frozen=True)
class VideoLimits:
    """What one video may cost to decode; past any limit decoding stops with a VideoError.

    max_frame_pixels   width x height of a frame (DCI 4K); the only full-size frames held at once
                       are those being transformed (one, or the three of a 3-frame selection)
    max_aspect_ratio   long side / short side: the short side is scaled to the tower's size, so a
                       1 x 4096 frame would otherwise become a 224 x 917,504 float tensor
    max_frames         frames (packets) indexed in the first pass
    max_seconds        duration, from the last frame's start time
    max_decode_pixels  frames decoded up to the last selected one x frame pixels (bounds CPU time)
    """

    max_frame_pixels: int = 4096 * 2160
    max_aspect_ratio: float = 32.0
    max_frames: int = 200_000
    max_seconds: float = 4 * 3600.0
    max_decode_pixels: int = 2**36

    def check_size(self, width: int, height: int, desc: str) -> None:
        if width * height > self.max_frame_pixels:
            raise VideoError(f"video {desc} is {width}x{height} pixels per frame "
                             f"(limit {self.max_frame_pixels} pixels, e.g. 4096x2160)")
        if min(width, height) > 0 and max(width, height) / min(width, height) > self.max_aspect_ratio:
            raise VideoError(f"video {desc} is {width}x{height}: aspect ratio over {self.max_aspect_ratio:g}:1")


VIDEO_LIMITS = VideoLimits()


# --------------------------------------------------------------------------- input handling


def _describe(source) -> str:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    if isinstance(source, (str, os.PathLike)):
        return repr(os.fspath(source))
    return f"<file object {getattr(source, 'name', type(source).__name__)!r}>"


def _opener(source: VideoSource) -> tuple[Callable[[], object], str]:
    """Return ``(open_fn, description)``; ``open_fn()`` gives something ``av.open`` accepts,
    positioned at the start of the video, and can be called once per pass."""
    desc = _describe(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise VideoError("empty video data (0 bytes)")
        return (lambda: io.BytesIO(data)), desc
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"video file not found: {path!r}")
        if os.path.isfile(path) and os.path.getsize(path) == 0:
            raise VideoError(f"empty video file: {path!r}")
        return (lambda: path), desc
    if hasattr(source, "read"):
        try:
            at_start = bool(source.seekable()) and source.tell() == 0
        except Exception:
            at_start = False
        if not at_start:
            # Not seekable, or the video starts mid-file (FFmpeg seeks to absolute offsets): read the
            # rest into memory, as decord does for every file object.
            return _opener(source.read())
        end = source.seek(0, io.SEEK_END)
        source.seek(0)
        if end <= 0:
            raise VideoError(f"empty video data {desc}")

        def reopen():  # PyAV never closes a file object it is given
            source.seek(0)
            return source

        return reopen, desc
    raise TypeError(f"unsupported video source type {type(source).__name__}; "
                    "expected a path, bytes or a binary file object")


def _av_open(open_fn, desc):
    try:
        container = av.open(open_fn(), mode="r")
    except av.FFmpegError as e:
        raise VideoError(f"could not open video {desc}: not a readable video container ({e})") from None
    if not container.streams.video:
        container.close()
        raise VideoError(f"no video stream in {desc}")
    try:
        stream = container.streams.best("video")
    except Exception:
        stream = None
    if stream is None:
        stream = container.streams.video[0]
    return container, stream


# --------------------------------------------------------------------------- pass 1: index


@dataclass(frozen=True)
class VideoInfo:
    """What decord knows about a video after indexing it (no frame decoded)."""

    timestamps: list[float]  # start time (s) of each frame in presentation order, decord float32 values
    avg_fps: float  # decord VideoReader.get_avg_fps()
    width: int
    height: int

    @property
    def num_frames(self) -> int:  # len(decord.VideoReader)
        return len(self.timestamps)


def _decord_timestamps(pts: list[int], start_time: int | None, time_base: Fraction) -> list[float]:
    """Packet pts -> seconds, bit-exactly like decord ``IndexKeyframes`` + ``GetFramePTS``."""
    factor = (time_base.numerator / time_base.denominator) if time_base else 0.0
    start = np.float32(start_time or 0)
    p = np.asarray(pts, dtype=np.int64).astype(np.float32)
    ts = ((p - start).astype(np.float64) * factor).astype(np.float32)
    return [float(t) for t in ts]


def _probe(open_fn, desc, limits: VideoLimits | None = None) -> VideoInfo:
    container, stream = _av_open(open_fn, desc)
    try:
        if limits is not None:
            limits.check_size(int(stream.codec_context.width or 0), int(stream.codec_context.height or 0), desc)
        pts: list[int] = []
        try:
            for packet in container.demux(stream):
                if packet.size == 0:  # PyAV's end-of-stream flush packet
                    continue
                if limits is not None and len(pts) >= limits.max_frames:
                    raise VideoError(f"video {desc} is too long: over {limits.max_frames} frames")
                t = packet.pts if packet.pts is not None else packet.dts
                if t is None:  # no timing at all (raw elementary stream): use the packet order
                    t = pts[-1] + 1 if pts else 0
                pts.append(int(t))
        except av.FFmpegError as e:
            if not pts:
                raise VideoError(f"could not read video {desc}: {e}") from None
            # truncated file: keep what was indexed (decord would abort; we are lenient)
        if not pts:
            raise VideoError(f"video {desc} contains no frames")
        pts.sort()
        time_base = stream.time_base or Fraction(0)
        timestamps = _decord_timestamps(pts, stream.start_time, time_base)
        if limits is not None and not timestamps[-1] <= limits.max_seconds:
            raise VideoError(f"video {desc} is too long: {timestamps[-1]:.0f} s (limit {limits.max_seconds:.0f} s)")
        fps = float(stream.average_rate) if stream.average_rate else 0.0
        if not (fps > 0 and math.isfinite(fps)):
            duration = None
            if stream.duration and time_base:
                duration = float(stream.duration * time_base)
            elif container.duration:
                duration = container.duration / av.time_base
            if duration and duration > 0:
                fps = len(pts) / duration
            elif len(pts) > 1 and timestamps[-1] > timestamps[0]:
                fps = (len(pts) - 1) / (timestamps[-1] - timestamps[0])
            else:
                fps = 1.0
        ctx = stream.codec_context
        return VideoInfo(timestamps=timestamps, avg_fps=fps, width=int(ctx.width or 0), height=int(ctx.height or 0))
    finally:
        container.close()


def probe_video(source: VideoSource, limits: VideoLimits | None = None) -> VideoInfo:
    """Index a video without decoding it: frame timestamps, average fps, size."""
    open_fn, desc = _opener(source)
    return _probe(open_fn, desc, limits)


def frame_timestamps(source: VideoSource) -> list[float]:
    """Start time in seconds of every frame, as ``[t[0] for t in vr.get_frame_timestamp(...)]``."""
    return probe_video(source).timestamps


# --------------------------------------------------------------------------- frame selection


def select_frame_indices(timestamps, avg_fps: float, strategy: str = "chat",
                         num_frames: int = NUM_FRAMES) -> list[int]:
    """The official ``load_video`` frame choice, given decord's timestamps and average fps.

    ``"chat"``: for each whole second ``0 .. round(max(t))`` the first frame whose start time is
    closest to it (distance computed in float32 as the official code does on decord's
    float32 values), stopping after ``num_frames`` frames.  ``"base"``: ``num_frames`` indices
    ``np.linspace(0, min(N, int(60 * fps)) - 1, num_frames, dtype=int)``.  Indices may repeat.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown video strategy {strategy!r}; allowed values: 'chat', 'base'")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    ts = np.asarray(timestamps, dtype=np.float32)
    total = len(ts)
    if total == 0:
        raise VideoError("video contains no frames")
    if strategy == "base":
        clip_start_sec, clip_end_sec = 0, BASE_CLIP_SECONDS
        start_frame = int(clip_start_sec * avg_fps)
        end_frame = min(total, int(clip_end_sec * avg_fps))
        ids = np.linspace(start_frame, end_frame - 1, num_frames, dtype=int)
        ids = np.where(ids < 0, ids + total, ids)  # decord indexes negatives from the end
        if (ids < 0).any() or (ids >= total).any():
            raise VideoError(f"cannot select frames: average fps {avg_fps} gives no frame in the first "
                             f"{BASE_CLIP_SECONDS} s")
        return [int(i) for i in ids]
    max_second = round(float(ts.max())) + 1
    ids = []
    for second in range(max_second):
        dist = np.abs(ts - np.float32(second))  # float32, like np.float32 - int in the official code
        ids.append(int(np.argmin(dist)))  # first minimum == min(...) then list.index(...)
        if len(ids) >= num_frames:
            break
    return ids


# --------------------------------------------------------------------------- pass 2: decode


def _decode_selected(open_fn, desc, indices: list[int], width: int, height: int,
                     keep: Callable[[np.ndarray], object] = lambda arr: arr,
                     limits: VideoLimits | None = None) -> list:
    """keep(frame) for each selected index, in the order of `indices`; a frame is (H, W, 3) uint8
    RGB and only one full-size frame exists at a time unless `keep` holds on to it."""
    wanted = set(indices)
    last = max(indices)
    kept: dict[int, object] = {}
    container, stream = _av_open(open_fn, desc)
    stream.thread_type = "AUTO"
    n = 0
    try:
        try:
            for frame in container.decode(stream):
                if limits is not None:
                    limits.check_size(frame.width, frame.height, desc)
                if n in wanted:
                    if width <= 0 or height <= 0:
                        width, height = frame.width, frame.height
                    if frame.width != width or frame.height != height:  # mid-stream size change
                        arr = frame.to_ndarray(format="rgb24", width=width, height=height)
                    else:
                        arr = frame.to_ndarray(format="rgb24")
                    kept[n] = keep(arr)
                n += 1
                if n > last:
                    break
        except av.FFmpegError as e:
            if not kept:
                raise VideoError(f"could not decode video {desc}: {e}") from None
            warnings.warn(f"decoding {desc} stopped early: {e}", RuntimeWarning, stacklevel=3)
    finally:
        container.close()
    if not kept:
        raise VideoError(f"could not decode any frame of video {desc}")
    missing = [i for i in indices if i not in kept]
    if missing:
        # The decoder produced fewer frames than the container has packets (broken / truncated
        # stream).  Use the nearest earlier decoded frame rather than failing.
        warnings.warn(f"video {desc}: decoder returned only {n} frames; frames {sorted(set(missing))} "
                      "replaced by the nearest earlier decoded frame", RuntimeWarning, stacklevel=3)
        have = sorted(kept)
        for i in set(missing):
            earlier = [k for k in have if k <= i]
            kept[i] = kept[earlier[-1]] if earlier else kept[have[0]]
    return [kept[i] for i in indices]


def _selected_frames(source: VideoSource, strategy: str, num_frames: int, limits: VideoLimits | None,
                     keep_for: Callable[[int], Callable[[np.ndarray], object]] | None = None) -> list:
    """Probe, select, decode: keep(frame) per selected index, with keep = keep_for(number of selected
    frames) (default: the frame itself). Every failure to read the input is a VideoError (FFmpeg and
    PyAV raise many kinds); a missing path stays FileNotFoundError."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown video strategy {strategy!r}; allowed values: 'chat', 'base'")
    open_fn, desc = _opener(source)
    try:
        info = _probe(open_fn, desc, limits)
        indices = select_frame_indices(info.timestamps, info.avg_fps, strategy, num_frames)
        if limits is not None and (max(indices) + 1) * info.width * info.height > limits.max_decode_pixels:
            raise VideoError(f"video {desc}: decoding its first {max(indices) + 1} frames of {info.width}x"
                             f"{info.height} exceeds the limit of {limits.max_decode_pixels} decoded pixels")
        keep = keep_for(len(indices)) if keep_for is not None else (lambda arr: arr)
        return _decode_selected(open_fn, desc, indices, info.width, info.height, keep, limits)
    except (VideoError, FileNotFoundError):
        raise
    except Exception as e:  # noqa: BLE001 - any decoder failure on untrusted input is the input's fault
        raise VideoError(f"could not decode video {desc}: {type(e).__name__}: {e}") from None


def decode_video(source: VideoSource, strategy: str = "chat", num_frames: int = NUM_FRAMES,
                 limits: VideoLimits | None = VIDEO_LIMITS) -> torch.Tensor:
    """Decode the frames the official CogVLM2 ``load_video`` would pick.

    ``source``: a path, the file's bytes, or a binary file object (read from its current position).
    Returns ``uint8`` RGB frames, layout ``(C, T, H, W)`` (``T <= num_frames``; frames may repeat).
    Raises :class:`VideoError` for empty / undecodable input or input past ``limits`` (None: no
    limits), ``ValueError`` for an unknown strategy, ``FileNotFoundError`` for a missing path.
    """
    frames = _selected_frames(source, strategy, num_frames, limits)
    return torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2)


def _frame_digest(frame: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> 16 bytes identifying it (shape included)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(np.asarray(frame.shape, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(frame).tobytes())
    return h.digest()


def _combine(digests: list[bytes]) -> str:
    return hashlib.blake2b(b"".join(digests), digest_size=16).hexdigest()


def frames_digest(frames: torch.Tensor) -> str:
    """Content hash of uint8 ``(C, T, H, W)`` frames; equals the digest `video_pixels` gives."""
    return _combine([_frame_digest(frames[:, t].permute(1, 2, 0).numpy()) for t in range(frames.shape[1])])


def video_pixels(source: VideoSource, image_size: int, strategy: str = "chat", num_frames: int = NUM_FRAMES,
                 limits: VideoLimits | None = VIDEO_LIMITS) -> tuple[torch.Tensor, str]:
    """``load_video`` in bounded memory, and the selected frames' content hash (``frames_digest``).

    Each selected frame is transformed as soon as it is decoded, so only one full-size frame (and
    its float copies) exists at a time instead of all of them: the pixels are bit-identical to
    ``transform_video(decode_video(...))``. One exception keeps that true: torch's CPU bilinear
    kernel takes a different path (equally valid, not bit-equal) for an interpolated tensor of
    exactly 3 channels, which is what a 3-frame ``(C, T, H, W)`` tensor is; those 3 frames are
    transformed together, as the official transform does.
    """
    def keep_for(count: int):
        def keep(arr: np.ndarray) -> tuple[bytes, torch.Tensor]:
            frame = torch.from_numpy(arr).permute(2, 0, 1)[:, None]  # (3, 1, H, W) uint8
            return _frame_digest(arr), frame if count == 3 else transform_video(frame, image_size)
        return keep

    kept = _selected_frames(source, strategy, num_frames, limits, keep_for)
    digest = _combine([d for d, _ in kept])
    if len(kept) == 3:
        return transform_video(torch.cat([f for _, f in kept], 1), image_size), digest
    return torch.cat([f for _, f in kept]), digest


# --------------------------------------------------------------------------- transform


def scaled_size(height: int, width: int, image_size: int) -> tuple[int, int]:
    """pytorchvideo ``short_side_scale`` output size.

    The shorter side becomes ``image_size``; the other is ``math.floor(long / short * image_size)``
    computed in float64 (``(float(h) / w) * size``).  When ``h == w`` both are ``image_size``.
    """
    if width < height:
        return int(math.floor((float(height) / width) * image_size)), image_size
    return image_size, int(math.floor((float(width) / height) * image_size))


def transform_video(frames: torch.Tensor, image_size: int) -> torch.Tensor:
    """The official video transform: uint8 ``(C, T, H, W)`` -> float32 ``(T, 3, S, S)``.

    ``x / 255.0`` -> ``(x - mean) / std`` per channel (CLIP) -> bilinear resize of the short side
    to ``image_size`` (``F.interpolate`` on the 4-D ``(C, T, H, W)`` tensor, ``align_corners=False``,
    no antialias; normalisation happens *before* resizing) -> centre crop ``S x S`` with offsets
    ``int(round((H - S) / 2.0))`` / ``int(round((W - S) / 2.0))`` -> transpose to ``(T, C, S, S)``.
    """
    if frames.dim() != 4 or frames.shape[0] != 3:
        raise ValueError(f"expected a (3, T, H, W) video tensor, got shape {tuple(frames.shape)}")
    if frames.dtype != torch.uint8:
        raise ValueError(f"expected uint8 frames, got {frames.dtype}")
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    x = frames.cpu() / 255.0  # float32
    mean = torch.as_tensor(CLIP_MEAN, dtype=x.dtype)[:, None, None, None]
    std = torch.as_tensor(CLIP_STD, dtype=x.dtype)[:, None, None, None]
    x = (x - mean) / std
    _, _, h, w = x.shape
    new_h, new_w = scaled_size(h, w, image_size)
    x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False)
    i = int(round((new_h - image_size) / 2.0))
    j = int(round((new_w - image_size) / 2.0))
    x = x[..., i:i + image_size, j:j + image_size]
    return x.transpose(0, 1).contiguous()


def load_video(source: VideoSource, image_size: int, strategy: str = "chat",
               num_frames: int = NUM_FRAMES) -> torch.Tensor:
    """``transform_video(decode_video(source, strategy, num_frames), image_size)`` -> ``(T, 3, S, S)`` float32."""
    return transform_video(decode_video(source, strategy=strategy, num_frames=num_frames), image_size)
