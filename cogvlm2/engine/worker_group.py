"""TensorParallelGroup: the EngineWorker of N tensor-parallel ranks, one process and one device per rank.

Process model. The engine's process is rank 0, the driver: it holds a `Worker` of its own (its shard, its
1/N of the KV heads) and spawns ranks 1..N-1 (`multiprocessing` spawn, daemonic), each running
`_rank_main`: a `Worker` built from the same `ModelSpec` with its `ParallelContext`, so every rank reads
only its slices of the checkpoint. The ranks meet in one torch.distributed group (NCCL on GPUs, rank r on
cuda:r; gloo on the CPU), which carries only the model's collectives (all-reduces, the logits
all-gather, captured in the decode CUDA graphs on GPUs).

Control. Every driver call goes to every rank over its pipe with the same arguments; the ranks run the
same code on the same inputs, so their collectives pair up:

    load / num_kv_blocks / init_cache     request and reply (num_kv_blocks: the minimum over the ranks)
    add_adapter / remove_adapter          request and reply (every rank, same order: same slots)
    launch(batch)                         one message per rank per step, no reply

A step's message is the ScheduledBatch's host metadata as plain ints: per row (request id, start,
tokens, sample, the token ids appended since the last message, the block-table change as (kept prefix,
new blocks)), and the step's K/V row copies (prefix-cache tail hits). The ranks keep mirror `Sequence`s,
created once per request from its EngineInputs (pixel tensors travel once, through shared memory) and
dropped when the request finishes. In steady decode a row costs a few ints; no tensor is pickled per
step. A lookahead step (async scheduling) reads its input ids from each rank's own previous sampled ids,
which are equal on every rank.

Sampling. The logits are all-gathered in the model, and every rank's sampler draws its noise from a
generator seeded with one seed from the driver (seeded requests use their own generators), so every rank
samples the same ids and `collect` returns the driver's: no token broadcast, no extra sync.

Failures. A rank that dies is an error, not a hang: a watchdog thread waits on the ranks' process
sentinels and, on NCCL, aborts the communicator so that a collective waiting for the dead rank returns
(gloo raises by itself when the peer's socket closes, or after `timeout_s`). Any failure inside a step
leaves the ranks out of step, so the group stops: that call and every later one raise
`WorkerGroupError` naming the rank (the engine then fails the requests with that error). Ranks ignore
SIGINT (Ctrl-C reaches the driver, whose exit stops the group) and exit when the driver's process
disappears. LoRA adapters are loaded by every rank, each keeping its part of A and B (add / remove go to
every rank like load).

Every wait is bounded, NCCL and CUDA graphs included:
- the driver waits for a step's ids by polling its CUDA event (never blocking inside CUDA, so the GIL
  stays free for the watchdog), for at most `timeout_s`: NCCL's own watchdog does not time collectives
  captured in a CUDA graph, so a rank that is alive but stuck would otherwise hang the replay forever;
- the process groups are created with TORCH_NCCL_ASYNC_ERROR_HANDLING=0: PyTorch's NCCL watchdog would
  otherwise tear the whole driver process down (the server with it) when it sees the dead peer's error
  before our watchdog aborts the communicator, and `_abort_process_group` is documented for that mode;
- after a failure the communicator is aborted (once, under a lock: the watchdog and the driver's stop may
  race) before the driver frees its model and CUDA graphs, and the group is never `destroy`ed then (a
  destroy may wait for the collectives that will never complete);
- ranks get `SHUTDOWN_S` to exit (1 s after a failure), then are killed; replies wait at most
  STARTUP_TIMEOUT_S while their rank lives; `_blame` waits 2 s for a death to show.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from multiprocessing.connection import wait as wait_any
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ..config import ModelConfig
from ..model.parallel import ParallelContext, check_sizes
from .attention import Attend
from .config import EngineConfig
from .runner import LaunchedStep
from .sampler import Sampler
from .scheduler import ScheduledBatch
from .sequence import Sequence
from .worker import EngineWorker, ModelSpec, Worker

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 900.0  # spawning, importing and loading a rank (the 19B shard from a slow disk)
COLLECTIVE_TIMEOUT_S = 300.0  # a collective or a step waiting longer than this for a rank fails the group
SHUTDOWN_S = 10.0  # a clean shutdown waits this long for the ranks to exit before killing them (1 s after a failure)
POLL_S = 0.05  # replies, start-up
SPIN_S, POLL_STEP_S = 0.002, 50e-6  # waiting for a step's ids on a GPU


class WorkerGroupError(RuntimeError):
    """A rank of the tensor-parallel group failed or died; the group is stopped."""


@dataclass
class _Sent:
    """What the ranks' mirror of one sequence holds: its first num_tokens ids and this block table."""

    seq: Sequence
    num_tokens: int
    table: list[int] = field(default_factory=list)


class TensorParallelGroup:
    """EngineWorker over `spec.tensor_parallel_size` ranks (see the module docstring)."""

    def __init__(self, spec: ModelSpec, attend: Attend | None = None, timeout_s: float = COLLECTIVE_TIMEOUT_S):
        n = spec.tensor_parallel_size
        device = torch.device(spec.resolved_device())
        self.backend = "nccl" if device.type == "cuda" else "gloo"
        if self.backend == "nccl" and torch.cuda.device_count() < n:
            raise ValueError(f"tensor_parallel_size {n} needs {n} GPUs; {torch.cuda.device_count()} visible")
        from ..tiny import checkpoint_folder

        if not callable(spec.model):  # a factory's model is checked when each rank builds it
            check_sizes(ModelConfig.from_file(checkpoint_folder(str(spec.model)) / "config.json"), n, spec.shard_vision)
        if dist.is_available() and dist.is_initialized():
            raise RuntimeError("this process already belongs to a torch.distributed group; the tensor-parallel "
                               "engine starts its own (run it outside torchrun)")
        self.spec, self.size, self.timeout_s = spec, n, timeout_s
        self._error: str | None = None  # set once the group is stopped
        self._closing = False
        self._sent: dict[str, _Sent] = {}
        self._release: set[str] | None = None  # vision features the ranks drop before the next step
        self._died = threading.Event()  # set by the watchdog
        self._abort_lock = threading.Lock()
        self._aborted = False
        self.procs, self.conns = [], []
        store = dist.TCPStore("127.0.0.1", 0, n, is_master=True, wait_for_workers=False,
                              timeout=timedelta(seconds=timeout_s))
        ctx = mp.get_context("spawn")
        try:
            for rank in range(1, n):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_rank_main, name=f"cogvlm2-tp-rank{rank}", daemon=True,
                                   args=(rank, n, store.port, self.backend, spec, attend, child, os.getpid(), timeout_s,
                                         _tf32_flags()))
                proc.start()
                child.close()
                self.procs.append(proc)
                self.conns.append(parent)
            self._wait_until_joined(store)
            if self.backend == "nccl":
                torch.cuda.set_device(0)
            with _no_nccl_teardown():
                dist.init_process_group(self.backend, store=store, rank=0, world_size=n,
                                        timeout=timedelta(seconds=timeout_s),
                                        device_id=torch.device("cuda", 0) if self.backend == "nccl" else None)
        except BaseException:
            self.shutdown()
            raise
        self.ctx = ParallelContext(0, n, shard_vision=spec.shard_vision)
        self.local = Worker(spec, attend, self.ctx)
        self._watchdog = threading.Thread(target=self._watch, name="cogvlm2-tp-watchdog", daemon=True)
        self._watchdog.start()
        atexit.register(self.shutdown)

    # EngineWorker: what the engine reads ------------------------------------------------------------

    @property
    def model(self):
        return self.local.model

    @property
    def runner(self):
        return self.local.runner

    @property
    def model_config(self) -> ModelConfig:
        return self.local.model_config

    @property
    def device(self) -> torch.device:
        return self.local.device

    @property
    def dtype(self) -> torch.dtype:
        return self.local.dtype

    # LoRA adapters: every rank loads its part of each (model.lora.shard_adapter) into the same slot ------

    @property
    def adapters(self) -> dict[str, str]:
        return self.local.adapters

    def adapter_slot(self, name: str | None) -> int:
        return self.local.adapter_slot(name)

    def add_adapter(self, name: str, path: str | Path) -> str:
        """On every rank in the same order (equal slots; the decode graphs, captured again when the slot
        tables grow, are captured on every rank together). A bad adapter is refused on rank 0 before any
        rank changes."""
        self._check()
        self.local.check_adapter(name, path)  # a ValueError here: nothing sent, no rank changed
        return self._call("add_adapter", self.local.add_adapter, name, str(path))[0]

    def remove_adapter(self, name: str) -> None:
        self.local.adapter_slot(name)  # ValueError for an unknown name, before any rank changes
        self._call("remove_adapter", self.local.remove_adapter, name)

    # load, memory, cache: every rank, same arguments ---------------------------------------------

    def load(self) -> None:
        self._call("load", self.local.load)

    def num_kv_blocks(self, config: EngineConfig) -> int:
        """The fewest blocks any rank can hold (each rank profiles its own device)."""
        return min(self._call("num_kv_blocks", self.local.num_kv_blocks, config))

    def init_cache(self, config: EngineConfig, num_blocks: int) -> None:
        seed = int.from_bytes(os.urandom(7), "little")
        self._call("init_cache", lambda *a: _init_cache(self.local, *a), config, num_blocks, seed)

    def _call(self, command: str, local: Callable, *args) -> list:
        """Run command on every rank (the driver's part while the others run theirs); each rank's result."""
        self._check()
        self._send((command, *args))
        try:
            results = [local(*args)]
        except Exception as e:
            raise self._stop(self._blame(f"rank 0 failed in {command}: {type(e).__name__}: {e}")) from e
        for rank, conn in enumerate(self.conns, 1):
            results.append(self._reply(rank, conn, command))
        return results

    # steps ------------------------------------------------------------------------------------------

    def launch(self, batch: ScheduledBatch, source: torch.Tensor | None = None) -> LaunchedStep:
        self._check()
        self._send(("step", self._encode(batch)))
        try:
            return self.local.launch(batch, source)
        except Exception as e:
            raise self._stop(self._blame(f"rank 0 failed in a step: {type(e).__name__}: {e}")) from e

    def collect(self, step: LaunchedStep) -> list[int | None]:
        self._check()
        if step.ready is not None:
            self._wait(step.ready)
        try:
            ids = self.local.collect(step)
        except Exception as e:
            raise self._stop(self._blame(f"rank 0 failed in a step: {type(e).__name__}: {e}")) from e
        self._check()  # ids computed while a rank was dying are not to be trusted
        return ids

    def _wait(self, ready: torch.cuda.Event) -> None:
        """Wait for a step's ids without blocking inside CUDA, so that a rank dying meanwhile (whose collective
        would never complete) is seen: spin (yielding the GIL) for SPIN_S, then poll every POLL_STEP_S, for at
        most timeout_s (a collective inside a CUDA graph has no other timeout)."""
        start = time.perf_counter()
        while not ready.query():
            if self._died.is_set():
                raise self._stop(self._blame("a rank died during a step"))
            waited = time.perf_counter() - start
            if waited > self.timeout_s:
                raise self._stop(f"a step did not complete within {self.timeout_s:.0f} s (a rank is stuck)")
            time.sleep(0 if waited < SPIN_S else POLL_STEP_S)

    def release_vision(self, keep: Callable[[], set[str]]) -> None:
        runner = self.local.runner
        if runner is not None and runner.vision_cache:
            self._release = keep()
            runner.release_vision(self._release)

    def _encode(self, batch: ScheduledBatch) -> tuple:
        """The step's host metadata for the ranks: (new sequences, dropped ids, vision to keep, rows,
        input_rows, kv_copies). Only what changed since the last message travels."""
        news, rows = [], []
        in_batch = {s.request_id for s in batch.seqs}
        drops = [rid for rid, s in self._sent.items() if s.seq.is_finished and rid not in in_batch]
        for rid in drops:
            del self._sent[rid]
        for seq, start, n, sample in zip(batch.seqs, batch.starts, batch.num_new_tokens, batch.samples):
            sent = self._sent.get(seq.request_id)
            if sent is None or sent.seq is not seq:  # a new request (or a new one reusing a finished one's id)
                news.append((seq.request_id, seq.inputs, seq.params, seq.adapter_slot, seq.adapter_id))
                sent = self._sent[seq.request_id] = _Sent(seq, seq.num_prompt_tokens)
            tokens = seq.token_ids[sent.num_tokens:]
            sent.num_tokens = len(seq.token_ids)
            table, held = seq.block_table, sent.table
            if len(table) == len(held) and table[-1:] == held[-1:] and table == held:
                keep, blocks = len(held), []
            else:
                keep = len(held) if len(held) <= len(table) and table[:len(held)] == held else 0
                blocks = table[keep:]
                sent.table = list(table)
            rows.append((seq.request_id, start, n, sample, tokens, keep, blocks))
        release, self._release = self._release, None
        return news, drops, release, rows, batch.input_rows, batch.kv_copies

    # failures and shutdown ------------------------------------------------------------------------

    def _send(self, message: tuple) -> None:
        for rank, conn in enumerate(self.conns, 1):
            try:
                conn.send(message)
            except (BrokenPipeError, ConnectionError, EOFError, OSError) as e:
                raise self._stop(self._death(rank) or f"rank {rank} cannot be reached: {e}") from e

    def _reply(self, rank: int, conn, command: str):
        proc, deadline = self.procs[rank - 1], time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if conn.poll(POLL_S):
                try:
                    status, value = conn.recv()
                except (EOFError, OSError):
                    raise self._stop(self._death(rank) or f"rank {rank} closed its pipe") from None
                if status == "error":
                    raise self._stop(f"rank {rank} failed in {command}: {value}")
                return value
            if not proc.is_alive():
                raise self._stop(self._death(rank))
            if time.monotonic() > deadline:
                raise self._stop(f"rank {rank} did not answer {command} within {STARTUP_TIMEOUT_S:.0f} s")

    def _death(self, rank: int) -> str | None:
        """'rank r died (exit code c)' with the error the rank reported, if it has died."""
        proc, conn = self.procs[rank - 1], self.conns[rank - 1]
        if proc.is_alive():
            return None
        proc.join(1)
        message = f"tensor-parallel rank {rank} (pid {proc.pid}) died (exit code {proc.exitcode})"
        try:
            while conn.poll():
                status, value = conn.recv()
                if status == "error":
                    message += f": {value}"
        except (EOFError, OSError):
            pass
        return message

    def _check(self) -> None:
        """Raise if the group is stopped, a rank died or a rank reported an error."""
        if self._error is not None:
            raise WorkerGroupError(self._error)
        if self._closing:
            raise WorkerGroupError("the tensor-parallel group was shut down")
        for rank, (proc, conn) in enumerate(zip(self.procs, self.conns), 1):
            if not proc.is_alive():
                raise self._stop(self._death(rank))
            try:
                if not conn.poll():
                    continue
                status, value = conn.recv()  # ranks only speak during a step to report an error
            except (EOFError, OSError):  # a killed rank's pipe closes before its exit is seen
                raise self._stop(self._blame(f"rank {rank} closed its pipe")) from None
            raise self._stop(f"rank {rank} failed: {value}")

    def _stop(self, message: str) -> WorkerGroupError:
        """Stop the group (its ranks may be out of step); the error to raise, now and on every later call."""
        if self._error is None:
            self._error = f"the tensor-parallel group stopped: {message}"
            logger.error(self._error)
            self.shutdown()
        return WorkerGroupError(self._error)

    def _blame(self, default: str) -> str:
        """The death of a rank when one explains a failure of the driver (a collective whose peer left
        raises before the peer's exit is seen: wait a moment for it), else `default`."""
        deadline = time.monotonic() + 2.0
        while True:
            dead = [m for m in (self._death(r) for r in range(1, self.size)) if m]
            if dead or time.monotonic() > deadline:
                return dead[0] if dead else default
            time.sleep(POLL_S)

    def _watch(self) -> None:
        """Wait for a rank to die; unblock the driver if it is inside a collective with it."""
        wait_any([p.sentinel for p in self.procs])
        if self._closing:
            return
        logger.error("a tensor-parallel rank died: %s", [self._death(r) for r in range(1, self.size)])
        self._abort()  # before _died: the driver, woken by it, frees the model only once the kernels can end
        self._died.set()

    def _abort(self) -> None:
        """Abort the NCCL communicator (once), so that collectives waiting for a dead or stuck rank return;
        gloo raises by itself once the peer's sockets close."""
        with self._abort_lock:
            if self._aborted or self.backend != "nccl" or not dist.is_initialized():
                return
            self._aborted = True
            # the peer all-reduce first: its barrier would wait for the dead rank forever, and aborting
            # NCCL frees memory, which waits for the device, spinning kernel included (found on 2 H200s)
            ctx = getattr(self, "ctx", None)
            if ctx is not None and ctx.peer is not None:
                ctx.peer.unblock()
            try:
                dist.distributed_c10d._abort_process_group()
            except Exception:  # noqa: BLE001 - best effort: the sentinel check still reports the death
                logger.exception("could not abort the NCCL communicator")

    def _wait_until_joined(self, store: dist.TCPStore) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while store.add("joined", 0) < self.size - 1:
            for rank, proc in enumerate(self.procs, 1):
                if not proc.is_alive():
                    raise WorkerGroupError(self._death(rank) + " while starting (the ranks are spawned: a script "
                                           "that starts a tensor-parallel engine must do so under "
                                           "`if __name__ == '__main__':`, which the ranks' import of it skips)")
            if time.monotonic() > deadline:
                raise WorkerGroupError(f"the tensor-parallel ranks did not start within {STARTUP_TIMEOUT_S:.0f} s")
            time.sleep(POLL_S)

    def shutdown(self) -> None:
        """Stop the ranks, leave the process group and free the driver's model and KV cache (idempotent;
        also at interpreter exit). Every later call raises WorkerGroupError."""
        if self._closing:
            return
        self._closing = True
        atexit.unregister(self.shutdown)
        if self._error is not None:
            self._abort()  # the kernels of an unfinished collective end before their buffers are freed
        local = getattr(self, "local", None)
        if local is not None:
            local.model = local.runner = None
        for conn in self.conns:
            try:
                conn.send(("shutdown",))
            except (BrokenPipeError, ConnectionError, EOFError, OSError):
                pass
        deadline = time.monotonic() + (SHUTDOWN_S if self._error is None else 1.0)
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        for conn in self.conns:
            conn.close()
        if dist.is_initialized() and not self._aborted:  # an aborted group is already gone
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - a broken communicator may refuse; the process is leaving it
                logger.debug("destroy_process_group failed", exc_info=True)


def _init_cache(worker: Worker, config: EngineConfig, num_blocks: int, seed: int) -> None:
    """init_cache, then the sampler's noise from a generator seeded alike on every rank."""
    worker.init_cache(config, num_blocks)
    worker.runner.sampler = Sampler(torch.Generator(worker.device).manual_seed(seed))


# the ranks ---------------------------------------------------------------------------------------

class _no_nccl_teardown:
    """Create process groups with TORCH_NCCL_ASYNC_ERROR_HANDLING=0 (read when a ProcessGroupNCCL is built; the
    previous value is restored after): the group handles NCCL errors itself (see the module docstring)."""

    KEY = "TORCH_NCCL_ASYNC_ERROR_HANDLING"

    def __enter__(self) -> None:
        self.previous = os.environ.get(self.KEY)
        os.environ[self.KEY] = "0"

    def __exit__(self, *exc) -> None:
        if self.previous is None:
            os.environ.pop(self.KEY, None)
        else:
            os.environ[self.KEY] = self.previous


def _tf32_flags() -> tuple[bool, bool]:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def _rank_main(rank: int, size: int, port: int, backend: str, spec: ModelSpec, attend: Attend | None, conn,
               parent_pid: int, timeout_s: float, tf32: tuple[bool, bool]) -> None:
    """A rank process: join the group, then serve the driver's messages until shutdown. It computes with
    the driver's TF32 settings, so every rank rounds alike."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
    try:
        device_id = None
        if backend == "nccl":
            torch.cuda.set_device(rank)
            device_id = torch.device("cuda", rank)
        store = dist.TCPStore("127.0.0.1", port, size, is_master=False, timeout=timedelta(seconds=timeout_s))
        store.add("joined", 1)
        with _no_nccl_teardown():
            dist.init_process_group(backend, store=store, rank=rank, world_size=size,
                                    timeout=timedelta(seconds=timeout_s), device_id=device_id)
        _Rank(Worker(spec, attend, ParallelContext(rank, size, shard_vision=spec.shard_vision)), conn).serve()
    except Exception as e:  # noqa: BLE001 - reported to the driver, then the rank exits
        try:
            conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        except (BrokenPipeError, ConnectionError, OSError):
            pass
        os._exit(1)
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass


def _exit_with_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)


class _Rank:
    """One non-driver rank: its Worker and the mirror of the engine's sequences."""

    def __init__(self, worker: Worker, conn):
        self.worker, self.conn = worker, conn
        self.seqs: dict[str, Sequence] = {}
        self.in_flight: list[LaunchedStep] = []

    def serve(self) -> None:
        while True:
            try:
                command, *args = self.conn.recv()
            except EOFError:  # the driver is gone
                return
            if command == "shutdown":
                return
            if command == "step":
                self.step(*args[0])  # an exception here ends the rank: the driver reports it
                continue
            try:
                result = {"load": self.worker.load, "num_kv_blocks": self.worker.num_kv_blocks,
                          "init_cache": lambda *a: _init_cache(self.worker, *a),
                          "add_adapter": self.worker.add_adapter,
                          "remove_adapter": self.worker.remove_adapter}[command](*args)
            except Exception as e:  # noqa: BLE001 - the driver raises it
                self.conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
                continue
            self.conn.send(("ok", result))

    def step(self, news, drops, release, rows, input_rows, kv_copies) -> None:
        for rid, inputs, params, slot, adapter_id in news:  # the adapter id keys its image features, as on rank 0
            self.seqs[rid] = Sequence(rid, inputs, params, adapter_slot=slot, adapter_id=adapter_id)
        for rid in drops:
            self.seqs.pop(rid, None)
        if release is not None:
            self.worker.runner.release_vision(release)
        batch = ScheduledBatch(input_rows=input_rows, kv_copies=kv_copies)
        for rid, start, n, sample, tokens, keep, blocks in rows:
            seq = self.seqs[rid]
            seq.token_ids += tokens
            if blocks or keep != len(seq.block_table):
                seq.block_table = seq.block_table[:keep] + blocks
            batch.seqs.append(seq)
            batch.starts.append(start)
            batch.num_new_tokens.append(n)
            batch.samples.append(sample)
        source = self.in_flight[-1].sampled if input_rows is not None else None
        self.in_flight.append(self.worker.launch(batch, source))
        if len(self.in_flight) > 2:  # as the driver: a step's buffers are reused two launches later
            self.worker.collect(self.in_flight.pop(0))


def make_worker(model: ModelSpec | nn.Module, attend: Attend | None = None) -> EngineWorker:
    """The worker of a spec: a group of processes for tensor parallelism, else the in-process Worker
    (pipeline stages included: one process drives every stage). Lives here, above both, so that
    worker.py never imports this file back."""
    if isinstance(model, ModelSpec) and model.tensor_parallel_size > 1:
        return TensorParallelGroup(model, attend)
    return Worker(model, attend)
