"""The one batch builder (spans -> flat tokens) and the one routing form (expert segments, each expert called once)."""

import random

import pytest
import torch

from cogvlm2.engine.inputs import EngineInputs
from cogvlm2.engine.sequence import Sequence
from cogvlm2.finetune.objective import CausalLMLoss
from cogvlm2.finetune.packing import pack
from cogvlm2.model import load_model
from cogvlm2.model.attention import PackedAttention
from cogvlm2.model.batch import ForwardBatch, TokenSpan, clip_segments, complement, flatten
from cogvlm2.model.cogvlm import route
from cogvlm2.processing import Processor
from cogvlm2.sampling_params import SamplingParams
from cogvlm2.tiny import checkpoint_folder


def test_flatten_offsets_and_joins_runs():
    a = TokenSpan([1, 2, 3, 4], [0, 1, 1, 2], [(1, 4)], [1, 2])
    b = TokenSpan([5, 6, 7], [0, 1, 2], [(0, 2)], [0])  # its run continues a's last run
    c = TokenSpan([8, 9], [3, 4])
    flat = flatten([a, b, c])
    assert flat.input_ids == list(range(1, 10)) and flat.positions == [0, 1, 1, 2, 0, 1, 2, 3, 4]
    assert flat.cu_seqlens == [0, 4, 7, 9]
    assert flat.expert_segments == [(1, 6)]
    assert flat.vision_embed_idx == [1, 2, 4]
    batch = flat.to_batch(PackedAttention(flat.cu_seqlens))
    assert batch.input_ids.tolist() == flat.input_ids and batch.vision_embed_idx is None
    assert batch.language_segments == [(0, 1), (6, 9)]
    assert batch.routed_runs == [(False, 0, 1), (True, 0, 5), (False, 1, 3)]


def test_bad_spans_and_segments_are_refused():
    with pytest.raises(ValueError, match="positions"):
        flatten([TokenSpan([1, 2], [0])])
    for bad in ([(0, 0)], [(2, 1)], [(0, 2), (1, 3)], [(3, 5)]):
        with pytest.raises(ValueError, match="sorted, disjoint"):
            flatten([TokenSpan([1, 2, 3, 4], [0, 1, 2, 3], bad)])
    with pytest.raises(ValueError, match="together"):
        ForwardBatch(torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long), None,
                     vision_embeds=torch.zeros(1, 4))


def test_segment_helpers():
    assert clip_segments([(1, 4), (6, 9)], 3, 7) == [(0, 1), (3, 4)]
    assert clip_segments(None, 0, 5) == [] and clip_segments([(1, 4)], 4, 6) == []
    assert complement([(0, 2), (5, 7)], 7) == [(2, 5)] and complement([], 3) == [(0, 3)]


class _Counted(torch.nn.Module):
    def __init__(self, scale: float):
        super().__init__()
        self.scale, self.calls = scale, 0

    def forward(self, x):
        self.calls += 1
        return x * self.scale


@pytest.mark.parametrize("segments", [[], [(0, 10)], [(2, 5)], [(0, 1), (3, 4), (6, 10)], [(1, 3), (5, 6), (8, 10)]])
def test_route_calls_each_expert_once_and_keeps_token_order(segments):
    x = torch.randn(10, 3)
    batch = ForwardBatch(torch.zeros(10, dtype=torch.long), torch.zeros(10, dtype=torch.long), None,
                         expert_segments=segments)
    language, vision = _Counted(2.0), _Counted(-1.0)
    out = route(x, batch, language, vision)
    routed = torch.zeros(10, dtype=torch.bool)
    for a, b in segments:
        routed[a:b] = True
    assert torch.equal(out, torch.where(routed[:, None], -x, 2 * x))
    assert vision.calls == (1 if segments else 0) and language.calls == (0 if segments == [(0, 10)] else 1)
    assert torch.equal(route(x, batch, language, None), 2 * x)  # a model without the expert ignores routing


def test_packed_forward_calls_each_expert_once_per_layer():
    """ZeRO-3 gathers an expert's shards at each call: a packed batch of several images must call every expert
    module once per forward, whatever the number of images (and give the same loss as one example at a time)."""
    model = load_model(checkpoint_folder("tiny"), progress=False)
    proc = Processor.from_pretrained(model.checkpoint_path, model.config)
    rng = random.Random(0)
    xs = [proc(q, image=_image(rng), answer=a) for q, a in (("Colour?", "red"), ("And this?", "blue"),
                                                             ("Third?", "green"))]
    batch = pack(xs)
    assert len(batch.expert_segments) == 3 and len(complement(batch.expert_segments, batch.num_tokens)) == 4
    calls: dict[str, int] = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
             for name, m in model.named_modules()
             if name.endswith(("vision_mlp", "language_mlp", "expert_query_key_value", "expert_dense"))]
    loss = CausalLMLoss(model)
    with torch.no_grad():
        packed = loss(batch)
    for h in hooks:
        h.remove()
    assert len(calls) == 6 * model.config.num_hidden_layers and set(calls.values()) == {1}
    with torch.no_grad():
        separate = sum(loss(pack([x])) for x in xs)
    torch.testing.assert_close(packed, separate, rtol=1e-4, atol=1e-4)


def test_sequence_span_crosses_into_generated_tokens():
    """A chunk of prompt + generated tokens: the prompt's runs and vision slots clipped and made local, generated
    tokens at their positions with no routing."""
    types = [0, 1, 1, 1, 1, 0, 0]
    x = EngineInputs([10, 11, 12, 13, 14, 15, 16], types, [0, 1, 2, 2, 3, 4, 5], expert_segments=[(1, 4)])
    seq = Sequence("r", x, SamplingParams())
    seq.token_ids += [20, 21]
    span = seq.span(3, 9)
    assert span.input_ids == [13, 14, 15, 16, 20, 21] and span.positions == [2, 3, 4, 5, 6, 7]
    assert span.expert_segments == [(0, 1)] and span.vision_slots == [0, 1]
    assert seq.span(7, 9) == TokenSpan([20, 21], [6, 7], [], [])
    assert x.span(2, 5) == TokenSpan([12, 13, 14], [2, 2, 3], [(0, 2)], [0, 1, 2])


def _image(rng: random.Random):
    from PIL import Image

    return Image.new("RGB", (64, 48), tuple(rng.randrange(256) for _ in range(3)))
