"""Processor: templates, placeholders, positions and routing; image and video inputs; detokenizer."""

import io

import av
import numpy as np
import pytest
import torch
from PIL import Image

from cogvlm2.config import VISION_TOKEN_ID
from cogvlm2.model import load_model
from cogvlm2.tiny import checkpoint_folder
from cogvlm2.processing import ImageError, Processor
from cogvlm2.processing.detokenizer import IncrementalDetokenizer
from cogvlm2.processing.prompt import format_prompt, position_ids, vision_expert_mask


@pytest.fixture(scope="module")
def image_proc():
    m = load_model(checkpoint_folder("tiny"), progress=False)
    return Processor.from_pretrained(m.checkpoint_path, m.config)


@pytest.fixture(scope="module")
def video_proc():
    m = load_model(checkpoint_folder("tiny-video"), progress=False)
    return Processor.from_pretrained(m.checkpoint_path, m.config)


def test_templates_with_history():
    history = [("What is it?", "A cat."), ("Colour?", "Black.")]
    assert format_prompt("Why?", history, "chat") == (
        "Question: What is it? Answer: A cat.\nQuestion: Colour? Answer: Black.\nQuestion: Why? Answer:")
    assert format_prompt("Why?", history, "vqa") == (
        "Question: What is it? Short answer: A cat.\nQuestion: Colour? Short answer: Black.\n"
        "Question: Why? Short answer:")
    assert format_prompt("Why?", history, "base") == "Why?"
    with pytest.raises(ValueError, match="template"):
        format_prompt("q", (), "nope")


def test_text_only_prompt(image_proc):
    x = image_proc("Hello there", [("Hi", "Hello!")])
    tok = image_proc.tokenizer
    assert x.input_ids == [128000] + tok.encode("Question: Hi Answer: Hello!\nQuestion: Hello there Answer:")
    assert x.token_type_ids == [0] * len(x) and x.position_ids == list(range(len(x)))
    assert x.pixel_values is None and x.vision_hash is None and not any(x.vision_expert_mask)


def test_image_prompt(image_proc):
    img = Image.new("RGB", (300, 200), (200, 30, 40))
    x = image_proc("Describe.", image=img)
    n = image_proc.config.vision.tokens_per_image  # 4x4 + boi + eoi = 18 (tiny: 112 px, patch 14)
    assert n == 18 and x.input_ids[1:1 + n] == [VISION_TOKEN_ID] * n
    assert x.token_type_ids[:n + 2] == [0] + [1] * n + [0]
    assert x.position_ids[:n + 2] == [0, 1] + [2] * (n - 2) + [3, 4]  # boi, shared patches, eoi, text
    assert x.vision_expert_mask[:n + 2] == [False] + [True] * (n - 1) + [False, False]  # eoi -> language
    assert x.pixel_values.shape == (1, 3, 112, 112) and x.next_position == max(x.position_ids) + 1
    # The same pixels give the same hash; different pixels a different one.
    assert image_proc("Other.", image=img.copy()).vision_hash == x.vision_hash
    assert image_proc("Describe.", image=Image.new("RGB", (300, 200), 0)).vision_hash != x.vision_hash


def test_image_formats_and_errors(image_proc, tmp_path):
    rgba = Image.new("RGBA", (40, 90), (10, 200, 30, 0))
    buf = io.BytesIO()
    rgba.save(buf, "PNG")
    x = image_proc("q", image=buf.getvalue())  # alpha dropped, not composited (as the official demo)
    expected = image_proc("q", image=rgba.convert("RGB"))
    assert torch.equal(x.pixel_values, expected.pixel_values)
    with pytest.raises(ImageError, match="cannot decode"):
        image_proc("q", image=b"not an image")
    with pytest.raises(ImageError, match="cannot open"):
        image_proc("q", image=str(tmp_path / "missing.png"))
    with pytest.raises(ValueError, match="video"):
        image_proc("q", video=torch.zeros(3, 2, 8, 8, dtype=torch.uint8))


def test_answer_labels(image_proc):
    x = image_proc("What colour?", image=Image.new("RGB", (8, 8)), answer="Red.")
    answer = image_proc.tokenizer.encode("Red.") + [128001]
    assert x.input_ids[-len(answer):] == answer
    assert x.labels == [-100] * (len(x) - len(answer)) + answer


def test_position_and_routing_rules():
    types = [0, 1, 1, 1, 1, 0, 1, 1, 1, 0, 0]
    assert position_ids(types) == [0, 1, 2, 2, 3, 4, 5, 6, 7, 8, 9]
    assert vision_expert_mask(types) == [False, True, True, True, False, False, True, True, False, False, False]
    # Padding (valid=False) never advances the position.
    assert position_ids([0, 1, 1, 1, 0, 0, 0], [True] * 5 + [False] * 2) == [0, 1, 2, 3, 4, 4, 4]


def _write_mp4(path, seconds: float, fps: int):
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(int(seconds * fps)):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), (i * 9) % 250, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def test_video_prompt_chat_and_base(video_proc, tmp_path):
    path = tmp_path / "clip.mp4"
    _write_mp4(path, seconds=4.5, fps=10)  # chat strategy: one frame per second, 0..4 -> 5 frames
    tok = video_proc.tokenizer
    x = video_proc("What happens?", video=str(path), template="chat", video_strategy="chat")
    assert x.pixel_values.shape == (5, 3, 112, 112)
    expected = [128000]
    for t in range(5):
        expected += [VISION_TOKEN_ID] * 18 + tok.encode(str(t))
    assert x.input_ids == expected + tok.encode("Question: What happens? Answer:")
    assert x.position_ids[:22] == [0, 1] + [2] * 16 + [3, 4, 5, 6]  # eoi, "0", then the next boi
    base = video_proc("Describe.", video=path.read_bytes(), template="base", video_strategy="base")
    assert base.pixel_values.shape == (24, 3, 112, 112)  # base strategy: 24 frames over the clip
    assert base.input_ids == [128000] + [VISION_TOKEN_ID] * (24 * 18) + tok.encode("Describe.")
    assert max(base.position_ids) == 3 + len(tok.encode("Describe."))  # one run of 24 frames spans 3 positions


def test_detokenizer_never_splits_a_character(image_proc):
    tok = image_proc.tokenizer
    text = "héllo 你好 🤖 done"
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
