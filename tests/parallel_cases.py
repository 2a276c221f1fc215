"""The prompts the parallel tests decode, shared by the single-process reference and the ranks.

Image model: a batch of an image prompt (visual-expert routing, one image's tokens sharing a position) and a
text prompt (right padding); video model: a 3-frame video prompt. Greedy, fixed length, logits kept.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from cogvlm2.generation import generate_ids
from cogvlm2.processing import Processor
from cogvlm2.sampling_params import SamplingParams

GOLDEN = Path(os.environ.get("COGVLM2_GOLDEN_DIR", Path(__file__).resolve().parents[2] / "shared" / "golden"))


def _media() -> tuple[Path | object, torch.Tensor]:
    """The golden image and video when present, else deterministic stand-ins of the same kind."""
    from PIL import Image

    if (GOLDEN / "image.png").is_file():
        image = GOLDEN / "image.png"
        video = torch.from_numpy(np.load(GOLDEN / "video_uint8_CTHW.npy"))
    else:
        g = torch.Generator().manual_seed(0)
        image = Image.fromarray(torch.randint(0, 256, (50, 70, 3), generator=g, dtype=torch.uint8).numpy())
        video = torch.randint(0, 256, (3, 3, 40, 52), generator=g, dtype=torch.uint8)
    return image, video


def run_cases(models: dict, max_new_tokens: int = 6) -> dict[str, tuple[list[list[int]], torch.Tensor]]:
    """name -> (greedy tokens per step, logits [steps, B, V] on the CPU)."""
    image, video = _media()
    params = SamplingParams(temperature=0, max_new_tokens=max_new_tokens, ignore_eos=True)
    out = {}
    for name, prompts in (("image+text", lambda p: [p("What is in the image?", image=image), p("Hello there!")]),
                          ("video", lambda p: [p("Describe the video.", video=video)])):
        model = models["tiny-video" if name == "video" else "tiny"]
        proc = Processor.from_pretrained(model.checkpoint_path, model.config)
        logits: list[torch.Tensor] = []
        tokens = list(generate_ids(model, prompts(proc), params, output_logits=logits))
        out[name] = (tokens, torch.stack(logits).cpu())
    return out
