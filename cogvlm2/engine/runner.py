"""ModelRunner: one ScheduledBatch -> device tensors -> forward -> logits of the sampling rows -> token ids.

Per step, all integer metadata (ids, positions, KV slots, block tables, lengths, vision indices) is
built in host lists, packed into one tensor and copied to the device once (pinned, non_blocking on
CUDA). The tokens are laid out by the one batch builder (`model.batch.flatten`); visual-expert routing
stays on the host: the runs of the prompts' precomputed segments that fall in this step. Image / video
features are encoded once per (vision hash, LoRA adapter) and kept until no unfinished sequence has vision
tokens left to prefill, so chunked prefill never re-encodes an image
and concurrent requests with the same image share one encoding. The last block_size feature rows of the
VISION_TAILS most recently encoded images outlive that: a later prompt over the same image (a new
question, a regenerated answer) whose cached KV blocks end a few tokens before the image does needs only
those rows, not a second pass of the vision tower. A step that must encode many media runs the tower in passes
of at most VISION_PIXELS pixels. Pure-decode steps take a shorter
path (one token per sequence, no routing) and replay a CUDA graph when one was captured for a large
enough batch size. A step whose tokens are all text (no vision features, no visual-expert
routing) and fit a captured batch size, e.g. a later chat turn over a cached image, also replays a
decode graph: each of its tokens becomes a decode-shaped row with its own context length.

A step is `launch`ed (everything enqueued, the sampled ids copied into a pinned buffer behind a CUDA
event) and later `collect`ed (wait for the event, read the ids): the only host sync of a step. In
between the engine may launch the next step, whose input ids are read from this step's sampled ids
on the device. On the CPU launch runs synchronously and collect only reads the ids: same control flow.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from ..model.batch import FlatTokens, ForwardBatch, TokenSpan, flatten
from ..model.cogvlm import CogVLM2ForCausalLM
from ..model.lora import lora_signature
from .attention import Attend, AttentionMetadata, KVCache, PagedAttention, attend_reference
from .config import VISION_PIXELS, EngineConfig
from . import vision_graph
from .cuda_graph import DecodeGraphs, DecodeRows
from .memory import num_kv_blocks
from .sampler import Sampler
from .scheduler import ScheduledBatch
from .sequence import Sequence

NUM_LANDING_BUFFERS = 2  # pinned buffers for sampled ids, used in turn (see ModelRunner._to_host)


@dataclass
class LaunchedStep:
    """A step enqueued on the device whose sampled ids are on their way to the host.

    sampled  [n_sample] long ids on the device (a lookahead step reads its input ids here); None
             when no row samples
    host     where the ids land: a pinned buffer on CUDA (valid once `ready` fired), else `sampled`
    """

    batch: ScheduledBatch
    sampled: torch.Tensor | None = None
    host: torch.Tensor | None = None
    ready: torch.cuda.Event | None = None


class ModelRunner:
    def __init__(self, model: CogVLM2ForCausalLM, config: EngineConfig, attend: Attend = attend_reference,
                 num_blocks: int | None = None):
        self.model = model
        self.config = config
        self.device = model.device
        self.attend = attend
        cfg = model.config
        self.graphs = None
        self.vision_graph: vision_graph.VisionGraph | None = None
        self._capture_vision_graph()  # before the KV cache is sized: its memory pool counts as in use
        blocks = num_blocks if num_blocks is not None else num_kv_blocks(model, config, attend)
        # this rank's KV heads (tensor parallelism), each layer's cache on its stage's device (pipeline)
        self.kv = KVCache(cfg.num_hidden_layers, blocks, config.block_size, model.num_local_kv_heads, cfg.head_dim,
                          model.dtype, model.layer_devices())
        self.sampler = Sampler()
        # (vision hash, adapter id) -> features [num_vision_tokens, D]
        self.vision_cache: dict[tuple[str, str | None], torch.Tensor] = {}
        # (vision hash, adapter id) -> (first row, the last block_size rows of its features), least recently used first
        self.vision_tails: OrderedDict[tuple[str, str | None], tuple[int, torch.Tensor]] = OrderedDict()
        self._landing: list[tuple[torch.Tensor, torch.cuda.Event]] = []
        self._turn = 0
        if self.device.type == "cuda":
            self._landing = [(torch.empty(config.max_num_seqs, dtype=torch.long, pin_memory=True), torch.cuda.Event())
                             for _ in range(NUM_LANDING_BUFFERS)]
            self.capture_graphs()
        self._active_slot = 0  # the LoRA slot the model's device scalar holds (0: no adapter)

    def _graphs_allowed(self) -> bool:
        """CUDA, not enforce_eager, one device (pipeline stages run eagerly), a model that supports graphs."""
        return self.device.type == "cuda" and not self.config.enforce_eager and \
            len(set(self.model.layer_devices())) == 1 and getattr(self.model, "supports_cuda_graphs", True)

    def capture_graphs(self) -> None:
        """(Re-)capture the decode CUDA graphs, and the vision tower's when the LoRA tables or wrapped linears it
        was captured with changed."""
        if self._graphs_allowed():
            self.graphs = None  # the old graphs' memory goes back to the pool first
            self.graphs = DecodeGraphs(self.model, self.kv, self.config, self.attend)
            if self.vision_graph is not None and self.vision_graph.lora != lora_signature(self.model):
                self._capture_vision_graph()

    def _capture_vision_graph(self) -> None:
        """The vision tower's one-medium pass as a CUDA graph (vision_graph.py); not under pipeline stages, nor under
        tensor parallelism (its collectives inside a capture are untested on two GPUs)."""
        self.vision_graph = None
        tp = getattr(self.model, "tp", None)
        if vision_graph.VISION_GRAPH and self._graphs_allowed() and getattr(self.model, "stages", None) is None and \
                (tp is None or tp.world_size == 1):
            self.vision_graph = vision_graph.VisionGraph(self.model, vision_graph.graph_frames(self.model))

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, source: torch.Tensor | None = None) -> LaunchedStep:
        """Enqueue one step (forward, lm_head, sampler, the ids' copy to the host) without waiting for
        the device. A lookahead batch (input_rows set) reads its input ids from `source`, the
        previous step's `sampled`."""
        assert batch.input_rows is None or source is not None, "a lookahead batch reads source"
        source = None if batch.input_rows is None else source  # a lookahead of admitted sequences only reads none
        if batch.kv_copies:  # prefix-cache tail hits: their rows' K/V, before any row of this step attends
            self.kv.copy_rows(batch.kv_copies)
        sampling = [s for s, sample in zip(batch.seqs, batch.samples) if sample]
        groups = self._adapter_groups(batch)
        logits = None
        if len(groups) > 1:  # several LoRA adapters: one forward per adapter (eager), rows put back in order
            logits = self._logits_of_groups(batch, groups, source)
        elif self._is_plain_decode(batch):
            self._activate(batch.seqs[0].adapter_slot)
            rows = self._decode_rows(batch, source)
            if self.graphs is not None and self.graphs.fits(len(batch)):
                hidden = self.graphs.run(rows)
            else:
                hidden = self._forward_decode(rows)
        elif self.graphs is not None and self.graphs.fits(sum(batch.num_new_tokens)) and self._is_plain_text(batch):
            # short text-only chunks (a later turn over a cached image, a short text prompt): every
            # token is a decode-shaped row, so the step replays a decode graph instead of ~30 eager
            # ops per layer
            self._activate(batch.seqs[0].adapter_slot)
            rows, last = self._text_rows(batch, source)
            hidden = self._take(self.graphs.run(rows), last)
        else:
            self._activate(batch.seqs[0].adapter_slot)
            hidden = self._forward_eager(batch, source)
        if not sampling:
            return LaunchedStep(batch)
        if logits is None:
            logits = self.model.compute_logits(hidden)
        pending = None if source is None else self._pending(batch, source, logits.shape[1])
        sampled = self.sampler(logits, sampling, pending)  # [n_sample] on the device
        return LaunchedStep(batch, sampled, *self._to_host(sampled))

    @staticmethod
    def _adapter_groups(batch: ScheduledBatch) -> dict[int, list[int]]:
        """Row indices of the batch per LoRA slot (one group when every sequence uses the same one)."""
        groups: dict[int, list[int]] = {}
        for i, seq in enumerate(batch.seqs):
            groups.setdefault(seq.adapter_slot, []).append(i)
        return groups

    def _activate(self, slot: int) -> None:
        if slot != self._active_slot:
            self.model.lora_slots.activate(slot)
            self._active_slot = slot

    def _logits_of_groups(self, batch: ScheduledBatch, groups: dict[int, list[int]],
                          source: torch.Tensor | None) -> torch.Tensor:
        """Logits of the sampling rows [n_sample, V], in batch order: per adapter, its forward and its
        logits while its slot is active (an adapter may target lm_head too)."""
        logits, order = [], []
        for slot, rows in groups.items():
            sub = ScheduledBatch([batch.seqs[i] for i in rows], [batch.starts[i] for i in rows],
                                 [batch.num_new_tokens[i] for i in rows], [batch.samples[i] for i in rows],
                                 input_rows=None if source is None else [batch.input_rows[i] for i in rows])
            self._activate(slot)
            if self._is_plain_decode(sub):
                hidden = self._forward_decode(self._decode_rows(sub, source))
            else:
                hidden = self._forward_eager(sub, source)
            logits.append(self.model.compute_logits(hidden))
            order += [i for i in rows if batch.samples[i]]
        position = {row: k for k, row in enumerate(order)}  # batch row -> its row in the concatenation
        (index,) = self._to_device([[position[i] for i in range(len(batch)) if batch.samples[i]]])
        return torch.cat(logits).index_select(0, index)

    def collect(self, step: LaunchedStep) -> list[int | None]:
        """Wait for a launched step's ids: one per sequence, None for those that do not sample."""
        if step.sampled is None:
            return [None] * len(step.batch)
        if step.ready is not None:
            step.ready.synchronize()  # the one host sync of a step
        it = iter(step.host.tolist())
        return [next(it) if sample else None for sample in step.batch.samples]

    def _to_host(self, sampled: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """Start copying the ids to the host: (where they land, the event that fires once they did).

        The landing buffers are used in turn. The engine launches a step only after collecting every
        step but the one launched just before, so a buffer is rewritten two launches later, after
        the host read it."""
        if not self._landing:
            return sampled, None
        buffer, ready = self._landing[self._turn]
        self._turn = (self._turn + 1) % len(self._landing)
        host = buffer[:sampled.numel()]
        host.copy_(sampled, non_blocking=True)
        ready.record(torch.cuda.current_stream(sampled.device))  # the ids' device: the last stage's under PP
        return host, ready

    @staticmethod
    def _is_plain_decode(batch: ScheduledBatch) -> bool:
        """One sampled token per sequence, each past its sequence's vision tokens: plain Llama (no
        routing, no vision features), CUDA-graph shaped. Asked of the step's token position, not of
        num_computed_tokens, which lags by one step for a lookahead batch."""
        return batch.is_decode and all(not s.vision_token_idx or start > s.vision_token_idx[-1]
                                       for s, start in zip(batch.seqs, batch.starts))

    @staticmethod
    def _is_plain_text(batch: ScheduledBatch) -> bool:
        """Every token of the step is a language-expert text token with no vision features (any
        chunk length): the step is plain Llama, like decode."""
        for seq, start, n in zip(batch.seqs, batch.starts, batch.num_new_tokens):
            a, b = seq.vision_range(start, start + n)
            if b > a or any(seq.expert_mask(start, start + n)):
                return False
        return True

    def _text_rows(self, batch: ScheduledBatch, source: torch.Tensor | None = None) -> tuple[DecodeRows, list[int]]:
        """A plain-text step as decode rows, one per token: token t of a sequence attends to its
        first t + 1 cached tokens, which include this step's earlier rows (every row's K/V is
        written before any row attends). Also the row of each sampling sequence's last token.
        In a lookahead step the decoding sequences' ids come from `source` on the device."""
        bs = self.config.block_size
        ids, pos, slots, context, tables, last = [], [], [], [], [], []
        at, in_flight = [], []
        for seq, start, n, sample, r in zip(batch.seqs, batch.starts, batch.num_new_tokens, batch.samples,
                                            batch.input_rows or [None] * len(batch)):
            end, table = start + n, seq.block_table
            if r is not None:
                at.append(len(ids))
                in_flight.append(r)
                ids.append(0)
            else:
                ids += seq.token_ids[start:end]
            pos += seq.positions(start, end)
            slots += [table[t // bs] * bs + t % bs for t in range(start, end)]
            context += range(start + 1, end + 1)
            tables += [table] * n
            if sample:
                last.append(len(pos) - 1)
        return (self._with_in_flight(ids, at, in_flight, source), pos, slots, context, tables), last

    def _forward_decode(self, rows: DecodeRows) -> torch.Tensor:
        """Hidden states [n, D] of a pure-decode batch, eagerly (no CUDA graph): plain Llama, no routing."""
        ids, pos, slots, context, tables = rows
        n, w, null = len(pos), max(len(t) for t in tables), self.kv.null_block
        flat_tables = list(itertools.chain.from_iterable(t + [null] * (w - len(t)) for t in tables))
        on_device = isinstance(ids, torch.Tensor)
        ids_d, pos_d, slots_d, ctx_d, tables_d, qsl_d = self._to_device(
            [[] if on_device else ids, pos, slots, context, flat_tables, list(range(n + 1))])
        ids_d = ids if on_device else ids_d
        meta = AttentionMetadata(slots_d, tables_d.view(n, w), ctx_d, qsl_d, [1] * n, context)
        return self.model(ForwardBatch(ids_d, pos_d, PagedAttention(self.kv, meta, self.attend)))

    def _forward_eager(self, batch: ScheduledBatch, source: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states of the sampling rows [n_sample, D]. A lookahead batch's decoding sequences take their
        id from `source` on the device."""
        h = HostInputs.build(batch, self.config.block_size, self.kv.null_block)
        t = h.tokens
        (ids, pos, slots, qsl, ctx, tables, logits_idx, embed_idx, at, rows) = self._to_device(
            [t.input_ids, t.positions, h.slots, t.cu_seqlens, h.context, h.tables, h.logits_idx, t.vision_embed_idx,
             h.in_flight, h.in_flight_rows])
        if h.in_flight:  # as `_with_in_flight`, on the indices uploaded with the rest
            ids.index_copy_(0, at, source.index_select(0, rows))
        meta = AttentionMetadata(slots, tables.view(len(batch), -1), ctx, qsl, batch.num_new_tokens, h.context)
        fb = ForwardBatch(ids, pos, PagedAttention(self.kv, meta, self.attend),
                          vision_embeds=self._vision_embeds(h.vision_parts) if h.vision_parts else None,
                          vision_embed_idx=embed_idx if h.vision_parts else None, expert_segments=t.expert_segments)
        return self.model(fb).index_select(0, logits_idx)

    def _decode_rows(self, batch: ScheduledBatch, source: torch.Tensor | None) -> DecodeRows:
        """(ids, positions, slots, context lens, block tables) of a pure-decode batch: one token per
        sequence. A lookahead batch's ids are a device tensor taken from `source`."""
        bs = self.config.block_size
        pos, slots = [], []
        for seq, start in zip(batch.seqs, batch.starts):
            pos += seq.positions(start, start + 1)
            slots.append(seq.block_table[start // bs] * bs + start % bs)
        if source is not None and None not in batch.input_rows:
            ids = self._take(source, batch.input_rows)
        else:  # host ids; in a lookahead step that admitted sequences, the decoding ones' come from source
            rows = batch.input_rows or [None] * len(batch)
            at = [i for i, r in enumerate(rows) if r is not None]
            ids = self._with_in_flight([0 if r is not None else seq.token_ids[start] for seq, start, r in
                                        zip(batch.seqs, batch.starts, rows)], at, [rows[i] for i in at], source)
        return ids, pos, slots, [start + 1 for start in batch.starts], [s.block_table for s in batch.seqs]

    def _with_in_flight(self, ids: list[int], at: list[int], rows: list[int],
                        source: torch.Tensor | None) -> list[int] | torch.Tensor:
        """ids as they are (a host list) when none is in flight, else on the device with ids[at[j]] =
        source[rows[j]] (a lookahead step's decoding sequences, whose ids never visit the host)."""
        if not at:
            return ids
        ids_d, at_d, rows_d = self._to_device([ids, at, rows])
        return ids_d.index_copy_(0, at_d, source.index_select(0, rows_d))

    def _pending(self, batch: ScheduledBatch, source: torch.Tensor, vocab: int) -> torch.Tensor | None:
        """A lookahead step's ids still on the device, one per sampling sequence (the sampler's penalties count
        them): the decoding sequences' rows of `source`; `vocab`, the pad the penalties ignore, for sequences
        admitted into the step (their ids are all on the host). None when no sampling sequence decodes."""
        rows = [r for r, sample in zip(batch.input_rows, batch.samples) if sample]
        at = [i for i, r in enumerate(rows) if r is not None]
        if len(at) == len(rows):
            return self._take(source, rows)
        return self._with_in_flight([vocab] * len(rows), at, [rows[i] for i in at], source) if at else None

    def _take(self, t: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """t[rows] on the device; consecutive rows are a view, with no host-to-device copy (a lookahead
        step's ids in steady decode: every row of the previous step's, in order)."""
        if not rows:
            return t[:0]
        if rows == list(range(rows[0], rows[0] + len(rows))):
            return t[rows[0]:rows[0] + len(rows)]
        (index,) = self._to_device([rows])
        return t.index_select(0, index)

    def _to_device(self, arrays: list[list[int]]) -> list[torch.Tensor]:
        """Many host int lists -> device long tensors with ONE host-to-device copy."""
        flat = torch.tensor(list(itertools.chain.from_iterable(arrays)), dtype=torch.long)
        if self.device.type == "cuda":
            flat = flat.pin_memory()
        return list(flat.to(self.device, non_blocking=True).split([len(a) for a in arrays]))

    def _vision_embeds(self, parts: list[tuple[Sequence, int, int]]) -> torch.Tensor:
        """Features [M, D] for the vision tokens of this step, encoding each missing image once (none whose
        rows this step needs are all in its cached tail). Features are kept per (vision hash, adapter id): a
        LoRA adapter may change the vision tower."""
        missing: dict[tuple[str, str | None], torch.Tensor] = {}
        for seq, a, _ in parts:
            key = (seq.vision_hash, seq.adapter_id)
            if key not in self.vision_cache and not (key in self.vision_tails and a >= self.vision_tails[key][0]):
                missing.setdefault(key, seq.inputs.pixel_values)
        for group in _tower_passes(list(missing.items())):
            pixels = self._upload([p for _, p in group])
            if self.vision_graph is not None and self.vision_graph.fits(pixels):
                feats = self.vision_graph.run(pixels)  # [frames, tokens_per_image, D]
            else:
                feats = self.model.encode_images(pixels)
            for (key, p), f in zip(group, feats.split([p.shape[0] for _, p in group])):
                f = self.vision_cache[key] = f.reshape(-1, f.shape[-1])
                start = max(0, len(f) - self.config.block_size)
                self.vision_tails[key] = (start, f[start:].clone())
                while len(self.vision_tails) > VISION_TAILS:
                    self.vision_tails.popitem(last=False)
        rows = []
        for seq, a, b in parts:
            key = (seq.vision_hash, seq.adapter_id)
            if key in self.vision_cache:
                rows.append(self.vision_cache[key][a:b])
            else:
                start, tail = self.vision_tails[key]
                rows.append(tail[a - start:b - start])
            if key in self.vision_tails:
                self.vision_tails.move_to_end(key)
        return torch.cat(rows)

    def _upload(self, pixels: list[torch.Tensor]) -> torch.Tensor:
        """The images / frames of a step, joined, on the device. On CUDA they are joined into pinned memory:
        a copy from pageable memory blocks the host until the GPU has run everything queued before it
        (22 MB of float32 per 1344^2 image), so the host could not prepare the next step meanwhile."""
        if self.device.type != "cuda" or len({p.dtype for p in pixels}) > 1 or any(p.is_cuda for p in pixels):
            return torch.cat(pixels).to(self.device, non_blocking=True)
        host = torch.empty((sum(p.shape[0] for p in pixels), *pixels[0].shape[1:]), dtype=pixels[0].dtype,
                           pin_memory=True)
        return torch.cat(pixels, out=host).to(self.device, non_blocking=True)

    def release_vision(self, keep: set[str]) -> None:
        """Drop cached features whose vision hash no unfinished sequence still needs."""
        for key in [key for key in self.vision_cache if key[0] not in keep]:
            del self.vision_cache[key]


VISION_TAILS = 512  # images whose last feature rows the runner keeps (block_size x hidden each: 128 KB for the 19B)


def _tower_passes(media: list[tuple[object, torch.Tensor]]) -> list[list[tuple[object, torch.Tensor]]]:
    """(feature key, pixels [frames, 3, H, W]) in order, cut into runs of at most VISION_PIXELS pixels (a medium
    larger than that alone)."""
    groups: list[list[tuple[object, torch.Tensor]]] = []
    size = VISION_PIXELS
    for h, p in media:
        n = p.shape[0] * p.shape[-1] * p.shape[-2]
        if not groups or size + n > VISION_PIXELS:
            groups.append([])
            size = 0
        groups[-1].append((h, p))
        size += n
    return groups


@dataclass
class HostInputs:
    """A step's metadata as host lists: the flat tokens (laid out by the batch builder) and their KV cache."""

    tokens: FlatTokens = field(default_factory=FlatTokens)  # ids, positions, cu_seqlens, routing, vision slots
    slots: list[int] = field(default_factory=list)  # KV cache slot of each new token
    context: list[int] = field(default_factory=list)  # cached tokens per sequence after the step
    tables: list[int] = field(default_factory=list)  # [B * W] block tables padded with the null block
    logits_idx: list[int] = field(default_factory=list)  # last token of each sampling sequence
    vision_parts: list[tuple[Sequence, int, int]] = field(default_factory=list)  # (seq, feature rows a:b)
    in_flight: list[int] = field(default_factory=list)  # a lookahead step's tokens still on the device: flat index
    in_flight_rows: list[int] = field(default_factory=list)  # ... and row of the previous step's sampled ids

    @classmethod
    def build(cls, batch: ScheduledBatch, block_size: int, null_block: int) -> "HostInputs":
        rows = batch.input_rows or [None] * len(batch)
        h = cls(tokens=flatten(_span(seq, start, n, r is not None) for seq, start, n, r in
                               zip(batch.seqs, batch.starts, batch.num_new_tokens, rows)))
        width = max(len(s.block_table) for s in batch.seqs)
        for seq, start, n, sample, end_offset, r in zip(batch.seqs, batch.starts, batch.num_new_tokens,
                                                        batch.samples, h.tokens.cu_seqlens[1:], rows):
            if r is not None:
                h.in_flight.append(end_offset - 1)
                h.in_flight_rows.append(r)
            end, table = start + n, seq.block_table
            h.slots += [table[t // block_size] * block_size + t % block_size for t in range(start, end)]
            h.tables += table + [null_block] * (width - len(table))
            h.context.append(end)
            if sample:
                h.logits_idx.append(end_offset - 1)
            a, b = seq.vision_range(start, end)
            if b > a:
                h.vision_parts.append((seq, a, b))
        return h


def _span(seq: Sequence, start: int, n: int, in_flight: bool) -> TokenSpan:
    """Tokens start..start+n-1 of seq; in_flight: its one token is a lookahead step's, still on the device (not in
    token_ids yet): a placeholder id that the runner overwrites on the device."""
    span = seq.span(start, start + n)
    if in_flight:
        span.input_ids = [0]
    return span
