"""AsyncLLM: concurrent streams on one background engine thread; leaving a stream aborts and frees it;
bad requests fail alone; streamed text deltas add up to the final, UTF-8-clean text."""

from __future__ import annotations

import asyncio
import threading

import pytest

from cogvlm2.engine import AsyncLLM, EngineConfig, LLMEngine
from cogvlm2.llm import load_processor_and_model
from cogvlm2.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def tiny():
    return load_processor_and_model("tiny", device="cpu")


async def collect(llm: AsyncLLM, rid: str, x, p: SamplingParams, stop_after: int | None = None):
    outs = []
    async for out in llm.generate(rid, x, p):
        outs.append(out)
        if stop_after is not None and len(outs) >= stop_after:
            break
    return outs


async def wait_idle(llm: AsyncLLM, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.02)):
        s = llm.stats()
        if s.num_running == s.num_waiting == 0 and s.kv_blocks_free == s.kv_blocks_total:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"engine not idle: {llm.stats()}")


def test_async_streams(tiny):
    model, processor = tiny

    async def main():
        async with AsyncLLM(LLMEngine(model, EngineConfig(max_num_batched_tokens=32), processor)) as llm:
            loop_thread = threading.current_thread()
            p = SamplingParams(max_new_tokens=24, temperature=1.0, seed=7, ignore_eos=True)
            jobs = [collect(llm, f"r{i}", processor(f"Question number {i}"), p) for i in range(4)]
            jobs.append(collect(llm, "leaver", processor("I will leave early"), SamplingParams(max_new_tokens=200), 3))
            results = await asyncio.gather(*jobs)
            assert llm._thread is not loop_thread
            for outs in results[:4]:
                final = outs[-1]
                assert final.finished and final.finish_reason == "length" and len(final.token_ids) == 24
                assert sum((o.delta_token_ids for o in outs), []) == final.token_ids
                assert "".join(o.delta_text for o in outs) == final.text
                assert final.text == processor.tokenizer.decode(final.token_ids)
                assert not any("\ufffd" in o.delta_text for o in outs) or "\ufffd" in final.text
            assert len(results[4]) == 3 and not results[4][-1].finished
            await wait_idle(llm)  # the leaver was aborted and its blocks freed

            # cancellation of the consuming task aborts too
            task = asyncio.create_task(collect(llm, "cancelled", processor("cancel me"),
                                                SamplingParams(max_new_tokens=5000, ignore_eos=True)))
            await asyncio.sleep(0.2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await wait_idle(llm)

            # a bad request fails alone; the loop keeps serving
            with pytest.raises(ValueError, match="max_model_len"):
                await collect(llm, "too-long", processor("word " * 9000), SamplingParams())
            ok = await collect(llm, "after", processor("still alive?"), SamplingParams(max_new_tokens=3))
            assert ok[-1].finished

            # abort() from the server side ends the stream with finish_reason "abort"
            async def abort_soon():
                await asyncio.sleep(0.1)
                await llm.abort("server-abort")
            outs, _ = await asyncio.gather(
                collect(llm, "server-abort", processor("long one"), SamplingParams(max_new_tokens=2000, ignore_eos=True)),
                abort_soon())
            assert outs[-1].finish_reason == "abort"
            await wait_idle(llm)
            cfg = model.config  # positions + the image's vision tokens, 3 of which take their own position
            assert llm.max_model_len == cfg.max_position_embeddings + cfg.vision.tokens_per_image - 3

    asyncio.run(main())


def test_final_only_delivers_one_whole_output(tiny):
    """final_only (batch captioning on Ray): one output per request, the finished one, equal to the last
    output of the same request streamed; the engine thread hands over one item instead of one per token."""
    model, processor = tiny

    async def main():
        async with AsyncLLM(LLMEngine(model, EngineConfig(max_num_batched_tokens=64), processor)) as llm:
            delivered = []
            deliver = llm._deliver
            llm._deliver = lambda rid, item: delivered.append(rid) or deliver(rid, item)
            p = SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True)
            x = processor("Say something long")
            streamed = await collect(llm, "streamed", x, p)
            finals = [o async for o in llm.generate("final", x, p, final_only=True)]
            assert len(streamed) == 16 and len(finals) == 1
            (final,) = finals
            assert final.finished and final.token_ids == streamed[-1].token_ids and final.text == streamed[-1].text
            # the engine thread still produced every step's output; only the finished one crossed over
            assert delivered.count("streamed") == 16 and delivered.count("final") == 16
            await wait_idle(llm)

    asyncio.run(main())
