"""`open_engine` (serve, web) warns with each embedded model's own note: tiny-video's is about moving
shapes, not the image model's pictures."""

from __future__ import annotations

import argparse
import asyncio
import logging

import pytest

from cogvlm2.launch import open_engine
from cogvlm2.tiny import note


@pytest.mark.parametrize("name", ["tiny", "tiny-video"])
def test_open_engine_warns_with_the_models_own_note(name, caplog):
    args = argparse.Namespace(model=name, device="cpu", dtype="float32", quant=None, lora=None, max_model_len=None,
                              max_num_seqs=2, num_kv_blocks=None)

    async def start():
        async with open_engine(args) as (engine, processor, folder):
            return processor.media_kinds

    with caplog.at_level(logging.WARNING, logger="cogvlm2.launch"):
        kinds = asyncio.run(start())
    assert note(name) in caplog.text
    others = {"tiny": "tiny-video", "tiny-video": "tiny"}
    assert note(others[name]) not in caplog.text
    assert ("video" in kinds) == (name == "tiny-video")
