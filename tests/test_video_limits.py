"""Bounded video decoding: frames are transformed as they are decoded (same pixels, bounded memory),
and a video past VideoLimits, or one the decoder chokes on, is a VideoError (a 400 at the server)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")

from cogvlm2.processing.video import (  # noqa: E402
    VideoError,
    VideoLimits,
    decode_video,
    frames_digest,
    transform_video,
    video_pixels,
)


def encode(n: int, w: int, h: int, fps: int = 1, noise: bool = True) -> bytes:
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    buf = io.BytesIO()
    rng = np.random.default_rng(n * w + h)
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        if codec == "libx264":
            s.options = {"preset": "ultrafast"}
        for i in range(n):
            rgb = (rng.integers(0, 256, (h, w, 3), dtype=np.uint8) if noise
                   else np.full((h, w, 3), i * 9 % 256, dtype=np.uint8))
            for p in s.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


@pytest.mark.parametrize("n, w, h", [(1, 64, 48), (3, 320, 240), (3, 96, 200), (5, 160, 90), (30, 128, 72)])
@pytest.mark.parametrize("strategy", ["chat", "base"])
def test_frame_by_frame_pixels_equal_the_whole_video_transform(n, w, h, strategy):
    data = encode(n, w, h)
    frames = decode_video(data, strategy)
    pixels, digest = video_pixels(data, 224, strategy)
    assert torch.equal(pixels, transform_video(frames, 224))  # bit for bit, 3-frame selections included
    assert digest == frames_digest(frames)


def test_processor_uses_the_bounded_path_with_the_same_pixels():
    from cogvlm2.processing import Processor
    from cogvlm2.tiny import resolve_tiny

    processor = Processor.from_pretrained(resolve_tiny("tiny-video"))
    data = encode(4, 80, 60)
    from_bytes = processor("what?", video=data)
    from_frames = processor("what?", video=decode_video(data, processor.video_strategy))
    assert torch.equal(from_bytes.pixel_values, from_frames.pixel_values)
    assert from_bytes.vision_hash == from_frames.vision_hash


def test_peak_memory_of_a_large_video_is_bounded(tmp_path):
    """24 frames of 1024x1024 (a few KB): decoding all frames before transforming cost +1 GB peak RSS
    (2048x2048: +3.8 GB); frame by frame it stays a small fraction of that."""
    path = tmp_path / "big.mp4"
    path.write_bytes(encode(24, 1024, 1024, noise=False))
    code = textwrap.dedent(f"""
        import resource
        from cogvlm2.processing.video import video_pixels
        data = open({str(path)!r}, "rb").read()
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        pixels, _ = video_pixels(data, 224)
        assert pixels.shape == (24, 3, 224, 224), pixels.shape
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.split()[-1]) < 300, out.stdout  # MB


@pytest.mark.parametrize("limits, match", [
    (VideoLimits(max_frame_pixels=64 * 64), "pixels per frame"),
    (VideoLimits(max_aspect_ratio=1.5), "aspect ratio"),
    (VideoLimits(max_frames=5), "over 5 frames"),
    (VideoLimits(max_seconds=3), "too long"),
    (VideoLimits(max_decode_pixels=100 * 60 * 3), "decoded pixels"),
])
def test_videos_past_the_limits_are_refused(limits, match):
    data = encode(8, 100, 60)
    with pytest.raises(VideoError, match=match):
        video_pixels(data, 224, "base", limits=limits)
    with pytest.raises(VideoError, match=match):
        decode_video(data, "base", limits=limits)
    assert decode_video(data, "base", limits=None).shape[1] == 24  # no limits: decoded


def test_default_limits_refuse_an_8k_frame_before_decoding_it():
    data = encode(1, 4096, 2304, noise=False)
    with pytest.raises(VideoError, match="pixels per frame"):
        video_pixels(data, 224)


def test_any_decoder_failure_is_a_video_error(monkeypatch):
    """PyAV / numpy can raise more than av.FFmpegError on hostile input: all of it is the input's fault."""
    import cogvlm2.processing.video as V

    data = encode(2, 64, 48)

    def broken(*args, **kwargs):
        raise IndexError("odd stream")

    monkeypatch.setattr(V, "_decord_timestamps", broken)
    with pytest.raises(VideoError, match="IndexError: odd stream"):
        video_pixels(data, 224)
    with pytest.raises(FileNotFoundError):
        video_pixels("/nonexistent/clip.mp4", 224)
