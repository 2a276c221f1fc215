"""Tests for cogvlm2.processing.video: decord-compatible frame selection with PyAV, official transform."""

from __future__ import annotations

import io
import math
import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cogvlm2.processing import video as V
from cogvlm2.processing.video import (
    BASE_CLIP_SECONDS,
    NUM_FRAMES,
    VideoError,
    decode_video,
    frame_timestamps,
    load_video,
    probe_video,
    scaled_size,
    select_frame_indices,
    transform_video,
)

GOLDEN_DIR = Path(os.environ.get("COGVLM2_GOLDEN_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "golden"))

W, H = 32, 24


# --------------------------------------------------------------------------- helpers


def _encoders() -> list[str]:
    found = []
    for name in ("libx264", "mpeg4"):
        try:
            av.Codec(name, "w")
        except Exception:
            continue
        found.append(name)
    return found


ENCODERS = _encoders()
if not ENCODERS:  # pragma: no cover
    pytest.skip("PyAV has neither a libx264 nor an mpeg4 encoder", allow_module_level=True)
ENCODER = ENCODERS[0]


def colour(i: int) -> np.ndarray:
    """Solid RGB colour encoding frame index i (< 512) as three base-8 digits, 32 levels apart."""
    return np.array([(i % 8) * 32 + 16, ((i // 8) % 8) * 32 + 16, ((i // 64) % 8) * 32 + 16], np.uint8)


def frame_ids(frames: torch.Tensor) -> list[int]:
    """Recover the frame indices from decoded (C, T, H, W) uint8 frames (lossy codec: tolerance 16)."""
    assert frames.dtype == torch.uint8 and frames.shape[0] == 3
    means = frames.double().mean(dim=(2, 3)).T.numpy()  # (T, 3)
    digits = np.clip(np.round((means - 16) / 32), 0, 7).astype(int)
    ids = (digits[:, 0] + 8 * digits[:, 1] + 64 * digits[:, 2]).tolist()
    for m, i in zip(means, ids):  # every channel close to the colour of the recovered index
        assert np.abs(m - colour(i)).max() < 12, (m, i)
    return ids


def write_video(path, pts: list[int], time_base: Fraction, codec: str = ENCODER, rate=None,
                width: int = W, height: int = H) -> Path:
    """Write frames i = 0..len(pts)-1 with colour(i) and presentation time pts[i] * time_base."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.time_base = time_base
        for i, p in enumerate(pts):
            frame = av.VideoFrame.from_ndarray(np.broadcast_to(colour(i), (height, width, 3)).copy(), format="rgb24")
            frame.pts, frame.time_base = p, time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return Path(path)


def write_cfr(path, fps: int, n: int, codec: str = ENCODER) -> Path:
    return write_video(path, list(range(n)), Fraction(1, fps), codec=codec, rate=fps)


def official_chat_ids(timestamps, num_frames=NUM_FRAMES) -> list[int]:
    """The official 'chat' loop, verbatim, on decord-style float32 timestamps."""
    timestamps = [np.float32(t) for t in timestamps]
    max_second = round(max(timestamps)) + 1
    frame_id_list = []
    for second in range(max_second):
        closest_num = min(timestamps, key=lambda x: abs(x - second))
        frame_id_list.append(timestamps.index(closest_num))
        if len(frame_id_list) >= num_frames:
            break
    return frame_id_list


def official_base_ids(total_frames, fps, num_frames=NUM_FRAMES) -> list[int]:
    start_frame = int(0 * fps)
    end_frame = min(total_frames, int(60 * fps))
    return np.linspace(start_frame, end_frame - 1, num_frames, dtype=int).tolist()


# --------------------------------------------------------------------------- 'chat' strategy


@pytest.mark.parametrize("codec", ENCODERS)
def test_chat_picks_frame_closest_to_each_second(tmp_path, codec):
    path = write_cfr(tmp_path / "v.mp4", fps=10, n=53, codec=codec)  # 10 fps x 5.3 s
    ts = frame_timestamps(path)
    assert len(ts) == 53
    np.testing.assert_allclose(ts, np.arange(53) / 10, atol=1e-6)
    expected = official_chat_ids(ts)
    assert expected == [0, 10, 20, 30, 40, 50]  # max_second = round(5.2) + 1 = 6
    assert select_frame_indices(ts, 10.0, "chat") == expected
    frames = decode_video(path, "chat")
    assert frames.dtype == torch.uint8 and tuple(frames.shape) == (3, 6, H, W)
    assert frame_ids(frames) == expected


def test_chat_at_most_num_frames(tmp_path):
    path = write_cfr(tmp_path / "v30.mp4", fps=4, n=120)  # 30 s
    frames = decode_video(path, "chat")
    assert frames.shape[1] == NUM_FRAMES
    assert frame_ids(frames) == list(range(0, 4 * NUM_FRAMES, 4))
    few = decode_video(path, "chat", num_frames=5)
    assert frame_ids(few) == [0, 4, 8, 12, 16]


def test_chat_irregular_timestamps(tmp_path):
    # ms timestamps; the first frame is at 200 ms and is shifted to 0 like decord does.
    rel = [0, 500, 1500, 1800, 2100, 3400, 4000, 4400, 4500]
    path = write_video(tmp_path / "vfr.mp4", [200 + t for t in rel], Fraction(1, 1000))
    ts = frame_timestamps(path)
    np.testing.assert_allclose(ts, np.array(rel) / 1000, atol=1e-6)
    expected = official_chat_ids(ts)
    # second 1: 0.5 and 1.5 tie -> the first; round(4.5) == 4 (half to even) -> seconds 0..4 only
    assert expected == [0, 1, 4, 5, 6]
    assert frame_ids(decode_video(path, "chat")) == expected
    # a frame rate is still known (mp4 computes an average); 'base' works on it too
    info = probe_video(path)
    assert info.avg_fps > 0
    assert frame_ids(decode_video(path, "base")) == official_base_ids(len(rel), info.avg_fps)


def test_chat_duplicates_for_low_frame_rate():
    # 0.5 fps: seconds 1 and 2 are both closest to the frame at 2 s or tie -> indices repeat
    ts = [0.0, 2.0, 4.0]
    assert select_frame_indices(ts, 0.5, "chat") == official_chat_ids(ts) == [0, 0, 1, 1, 2]


def test_select_matches_official_on_random_timestamps():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 80))
        ts = np.sort(rng.uniform(0, 40, n)).astype(np.float32)
        ts -= ts[0]
        ts = [float(t) for t in ts]
        assert select_frame_indices(ts, 5.0, "chat") == official_chat_ids(ts)
        fps = float(rng.uniform(0.5, 60))
        assert select_frame_indices(ts, fps, "base") == official_base_ids(n, fps)


def test_timestamps_follow_decord_float32_arithmetic():
    # decord: float32(float64(float32(pts) - float32(start)) * tb) -- pts above 2**24 lose precision
    pts = [2**24 + 1, 2**24 + 3]
    got = V._decord_timestamps(pts, 1, Fraction(1, 90000))
    want = [float(np.float32(np.float64(np.float32(p) - np.float32(1)) * (1 / 90000))) for p in pts]
    assert got == want
    assert V._decord_timestamps([5, 7], None, Fraction(1, 2)) == [2.5, 3.5]


# --------------------------------------------------------------------------- 'base' strategy


def test_base_short_clip(tmp_path):
    path = write_cfr(tmp_path / "short.mp4", fps=10, n=53)
    expected = np.linspace(0, 52, 24, dtype=int).tolist()
    frames = decode_video(path, "base")
    assert tuple(frames.shape) == (3, 24, H, W)
    assert frame_ids(frames) == expected


def test_base_long_clip_uses_first_60_seconds(tmp_path):
    path = write_cfr(tmp_path / "long.mp4", fps=2, n=140)  # 70 s
    info = probe_video(path)
    assert info.num_frames == 140 and info.avg_fps == 2.0
    expected = np.linspace(0, 2 * BASE_CLIP_SECONDS - 1, 24, dtype=int).tolist()
    assert expected[-1] == 119
    assert select_frame_indices(info.timestamps, info.avg_fps, "base") == expected
    assert frame_ids(decode_video(path, "base")) == expected
    # and 'chat' on the same video: one frame every 2 frames, capped at 24
    assert frame_ids(decode_video(path, "chat")) == list(range(0, 48, 2))


def test_base_fewer_frames_than_requested_repeats(tmp_path):
    path = write_cfr(tmp_path / "tiny.mp4", fps=5, n=7)
    expected = np.linspace(0, 6, 24, dtype=int).tolist()
    assert frame_ids(decode_video(path, "base")) == expected


# --------------------------------------------------------------------------- sources


def test_sources_path_bytes_fileobj(tmp_path):
    path = write_cfr(tmp_path / "s.mp4", fps=10, n=25)
    ref = decode_video(path)
    data = path.read_bytes()
    assert torch.equal(decode_video(str(path)), ref)
    assert torch.equal(decode_video(data), ref)
    assert torch.equal(decode_video(bytearray(data)), ref)
    with open(path, "rb") as f:
        assert torch.equal(decode_video(f), ref)
        assert not f.closed
    buf = io.BytesIO(b"junk" + data)
    buf.seek(4)  # read from the current position
    assert torch.equal(decode_video(buf), ref)

    class NonSeekable(io.RawIOBase):
        def __init__(self, b):
            self._b = io.BytesIO(b)

        def readable(self):
            return True

        def readinto(self, out):
            chunk = self._b.read(len(out))
            out[:len(chunk)] = chunk
            return len(chunk)

    assert torch.equal(decode_video(NonSeekable(data)), ref)


# --------------------------------------------------------------------------- errors


def test_random_bytes_raise_video_error():
    rng = np.random.default_rng(1)
    with pytest.raises(VideoError, match="could not"):
        decode_video(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())


def test_empty_inputs_raise_video_error(tmp_path):
    with pytest.raises(VideoError, match="empty"):
        decode_video(b"")
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(VideoError, match="empty"):
        decode_video(empty)
    with pytest.raises(VideoError, match="empty"):
        decode_video(io.BytesIO())


def test_truncated_or_streamless_inputs(tmp_path):
    data = write_cfr(tmp_path / "t.mp4", fps=10, n=20).read_bytes()
    with pytest.raises(VideoError):
        decode_video(data[:64])  # header only, no moov / frames
    # a container without a video stream
    audio = tmp_path / "audio.wav"
    with av.open(str(audio), "w") as c:
        s = c.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for p in s.encode(frame):
            c.mux(p)
        for p in s.encode():
            c.mux(p)
    with pytest.raises(VideoError, match="no video stream"):
        decode_video(audio)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        decode_video(tmp_path / "nope.mp4")


def test_unknown_strategy(tmp_path):
    with pytest.raises(ValueError, match="'chat', 'base'"):
        decode_video(b"whatever", strategy="fast")
    with pytest.raises(ValueError, match="'chat', 'base'"):
        select_frame_indices([0.0], 1.0, "nope")


# --------------------------------------------------------------------------- transform


def _reference_transform(frames: torch.Tensor, size: int) -> torch.Tensor:
    """Straight re-statement of the official Compose (x/255, NormalizeVideo, ShortSideScale, CenterCropVideo)."""
    x = frames / 255.0
    mean = torch.tensor(V.CLIP_MEAN)[:, None, None, None]
    std = torch.tensor(V.CLIP_STD)[:, None, None, None]
    x = (x - mean) / std
    c, t, h, w = x.shape
    if w < h:
        new_h, new_w = int(math.floor((float(h) / w) * size)), size
    else:
        new_h, new_w = size, int(math.floor((float(w) / h) * size))
    x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False)
    i, j = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return x[..., i:i + size, j:j + size].transpose(0, 1)


def test_transform_matches_golden():
    src, ref = GOLDEN_DIR / "video_uint8_CTHW.npy", GOLDEN_DIR / "video" / "video_chat.npz"
    if not (src.exists() and ref.exists()):
        pytest.skip(f"golden files not found under {GOLDEN_DIR}")
    frames = torch.from_numpy(np.load(src))
    want = torch.from_numpy(np.load(ref)["pixel_values"])
    got = transform_video(frames, 32)
    assert got.dtype == torch.float32 and got.shape == want.shape == (3, 3, 32, 32)
    assert (got - want).abs().max().item() <= 1e-6


@pytest.mark.parametrize("h,w,size", [(40, 52, 32), (52, 40, 32), (24, 32, 16), (33, 17, 16), (30, 30, 30),
                                      (30, 30, 14), (7, 100, 8), (100, 7, 8), (17, 19, 24)])
def test_transform_shapes_and_reference(h, w, size):
    g = torch.Generator().manual_seed(h * 1000 + w)
    frames = torch.randint(0, 256, (3, 4, h, w), dtype=torch.uint8, generator=g)
    out = transform_video(frames, size)
    assert out.dtype == torch.float32 and tuple(out.shape) == (4, 3, size, size)
    assert torch.equal(out, _reference_transform(frames, size))


def test_scaled_size():
    assert scaled_size(30, 30, 224) == (224, 224)
    assert scaled_size(480, 640, 224) == (224, 298)  # floor(640 / 480 * 224) = floor(298.67)
    assert scaled_size(640, 480, 224) == (298, 224)
    assert scaled_size(40, 52, 32) == (32, 41)
    for s in range(1, 300):  # h == w is always exact
        assert scaled_size(37, 37, s) == (s, s)


def test_transform_square_identity_size_is_normalisation_only():
    frames = torch.randint(0, 256, (3, 2, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    out = transform_video(frames, 16)
    mean = torch.tensor(V.CLIP_MEAN)[:, None, None, None]
    std = torch.tensor(V.CLIP_STD)[:, None, None, None]
    assert torch.equal(out, ((frames / 255.0 - mean) / std).transpose(0, 1))


def test_transform_rejects_bad_input():
    with pytest.raises(ValueError):
        transform_video(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), 8)
    with pytest.raises(ValueError):
        transform_video(torch.zeros(3, 2, 8, 8), 8)


def test_load_video_end_to_end(tmp_path):
    path = write_cfr(tmp_path / "e2e.mp4", fps=10, n=31)
    out = load_video(path, 16)
    assert tuple(out.shape) == (4, 3, 16, 16) and out.dtype == torch.float32
    assert torch.equal(out, transform_video(decode_video(path), 16))
    assert tuple(load_video(path, 16, strategy="base", num_frames=8).shape) == (8, 3, 16, 16)


# --------------------------------------------------------------------------- optional: decord itself


def test_matches_decord_official_loader(tmp_path):
    decord = pytest.importorskip("decord")

    def official_load_video(video_data: bytes, strategy="chat"):
        num_frames = 24
        vr = decord.VideoReader(io.BytesIO(video_data), ctx=decord.cpu(0))
        total_frames = len(vr)
        if strategy == "base":
            start_frame = int(0 * vr.get_avg_fps())
            end_frame = min(total_frames, int(60 * vr.get_avg_fps()))
            frame_id_list = np.linspace(start_frame, end_frame - 1, num_frames, dtype=int)
        else:
            timestamps = [t[0] for t in vr.get_frame_timestamp(np.arange(total_frames))]
            max_second = round(max(timestamps)) + 1
            frame_id_list = []
            for second in range(max_second):
                closest = min(timestamps, key=lambda x: abs(x - second))
                frame_id_list.append(timestamps.index(closest))
                if len(frame_id_list) >= num_frames:
                    break
        return torch.from_numpy(vr.get_batch(frame_id_list).asnumpy()).permute(3, 0, 1, 2)

    videos = [
        write_cfr(tmp_path / "a.mp4", fps=10, n=53),
        write_cfr(tmp_path / "b.mp4", fps=2, n=140),
        write_video(tmp_path / "c.mp4", [200, 700, 1700, 2000, 2300, 3600, 4200, 4600, 4700], Fraction(1, 1000)),
    ]
    for p in videos:
        data = p.read_bytes()
        for strategy in ("chat", "base"):
            assert torch.equal(decode_video(data, strategy), official_load_video(data, strategy)), (p, strategy)
