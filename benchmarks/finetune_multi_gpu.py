"""Multi-GPU fine-tuning check and memory figures (2 GPUs): ZeRO-2, ZeRO-3 and FSDP2 on the tiny model
with save + `--resume latest` (the resumed losses must equal the uninterrupted run's), then a full
fine-tune of the visual expert + GLU adapter of the full-size 19B architecture (random bf16 weights)
under ZeRO-3 and FSDP2, with every GPU's peak memory and tokens/s; and (--lora-scaling) the 19B LoRA
on one GPU against the same per-GPU batch on --nproc GPUs: tokens/s of each and the speed-up.

Every run is the real CLI (`accelerate launch ... -m cogvlm2.finetune finetune`), one after another,
each under its own time limit; results are appended to OUT/finetune_multi_gpu.json as they come, so a
run cut short still reports what finished.

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl   # carried deepspeed
    PYTHONPATH=/tmp/site:. python3 benchmarks/finetune_multi_gpu.py --out $OUT [--budget 450]

The 19B checkpoint is written once to --work (random weights, ~39 GB, the official key names and the
bundled Llama-3 tokenizer). Its runs skip the final 39 GB model write (--no-save-final) and save no
checkpoint (the optimizer state of 7B trained parameters is ~110 GB); save / resume is what the tiny
runs check. A later call on the same machine reuses that checkpoint when it is still there (it lives
outside the repository) and rebuilds it otherwise.

LoRA scaling (--lora-scaling zero2,fsdp2[,ddp]): every example is one 1344² image + about --text-tokens
text tokens (half prompt, half answer), all the same length, so every rank does the same work; the
baseline is the plain one-GPU trainer (`python -m cogvlm2.finetune finetune`, no launcher), each
multi-GPU run has the same batch per GPU. tokens/s is the trainer's own `train/tokens_per_s` (all
ranks' tokens over the step's wall time, data loading included), the median over the steps after
--scaling-warmup; speed-up = multi-GPU tokens/s / one-GPU tokens/s (ideal: --nproc).
--scaling-model tiny runs the same on the tiny model (a CPU smoke test: `--lora-scaling ddp`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "cogvlm2" / "finetune" / "configs"
BACKENDS = {"zero2": "zero2.yaml", "zero3": "zero3.yaml", "zero3_offload": "zero3_offload.yaml", "fsdp2": "fsdp2.yaml"}
# launchers without an accelerate config: the one-process trainer, and torchrun (plain DDP)
LAUNCHERS = ("single", "ddp")


class Runner:
    def __init__(self, out: Path, work: Path, budget: float, nproc: int):
        self.out, self.work, self.nproc = out, work, nproc
        self.deadline = time.time() + budget
        self.results: dict = {"provenance": provenance(), "runs": []}
        self.port = 29700

    def left(self) -> float:
        return self.deadline - time.time()

    def save(self) -> None:
        (self.out / "finetune_multi_gpu.json").write_text(json.dumps(self.results, indent=1) + "\n")

    def finetune(self, name: str, backend: str, args: list[str], limit: float) -> dict:
        """One `accelerate launch` of the finetune CLI; the tail of its log is appended to OUT/runs.log."""
        self.port += 1
        trainer = ["-m", "cogvlm2.finetune", "finetune", "--no-progress", "--no-tensorboard", *args]
        if backend == "single":
            cmd = [sys.executable, *trainer]
        elif backend == "ddp":
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(self.nproc),
                   "--master_port", str(self.port), *trainer]
        else:
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / BACKENDS[backend]),
                   "--num_processes", str(self.nproc), "--main_process_port", str(self.port), *trainer]
        env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": "0"} if backend == "single" else {}))
        t0 = time.time()
        limit = max(10.0, min(limit, self.left()))
        # on timeout the launcher AND its per-GPU workers go (kill_tree), freeing the GPUs
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)
        try:
            log, _ = proc.communicate(timeout=limit)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            log, _ = proc.communicate()
            rc = "timeout"
        with open(self.out / "runs.log", "a") as f:  # one file: the device tool returns at most 8
            f.write(f"\n===== {name}: {' '.join(cmd)}\n{log[-40000:]}\n")
        row = {"name": name, "backend": backend, "rc": rc, "seconds": round(time.time() - t0, 1), "args": args}
        print(f"{name}: rc={rc} in {row['seconds']} s", flush=True)
        return row


def kill_tree(pid: int) -> None:
    """SIGKILL a launcher and every process under it (torchrun starts its workers in their own sessions,
    so killing the launcher's process group would leave them holding the GPUs)."""
    import psutil

    try:
        parent = psutil.Process(pid)
        procs = parent.children(recursive=True) + [parent]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def provenance() -> dict:
    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=ROOT).stdout.strip()
    except OSError:  # no git (or no .git) on the machine: COMMIT from the environment
        commit = ""
    try:
        import deepspeed

        ds = deepspeed.__version__
    except ImportError:
        ds = None
    import accelerate

    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit or os.environ.get("COMMIT", ""),
            "torch": torch.__version__, "deepspeed": ds, "accelerate": accelerate.__version__,
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}


def state_of(folder: Path) -> dict | None:
    path = folder / "trainer_state.json"
    return json.loads(path.read_text()) if path.is_file() else None


def tiny_runs(r: Runner, backends: list[str]) -> None:
    from cogvlm2.finetune.toy import make_colour_dataset

    data = make_colour_dataset(r.work / "colours", n=48, seed=0)
    common = ["--model", "tiny", "--data", str(data), "--max-steps", "6", "--batch-size", "2", "--save-every", "3",
              "--lr", "1e-2", "--lora-dropout", "0", "--num-workers", "1", "--eval-fraction", "0.1",
              "--lora-targets", "vision_expert_qkv,language_expert_qkv,lm_head"]
    for backend in backends:
        if r.left() < 60:
            break
        a, b = r.work / f"tiny-{backend}-a", r.work / f"tiny-{backend}-b"
        for d in (a, b):
            shutil.rmtree(d, ignore_errors=True)
        row = r.finetune(f"tiny-{backend}", backend, common + ["--output", str(a)], 150)
        full = state_of(a)
        if full is not None and (a / "checkpoint-3").is_dir():
            shutil.copytree(a / "checkpoint-3", b / "checkpoint-3")
            resume = r.finetune(f"tiny-{backend}-resume", backend, common + ["--output", str(b), "--resume", "latest"], 150)
            resumed = state_of(b)
            row["resume_rc"] = resume["rc"]
            if resumed is not None:
                la, lb = [h["loss"] for h in full["history"]], [h["loss"] for h in resumed["history"]]
                row["losses"], row["resumed_losses"] = la, lb
                row["resume_exact"] = la == lb
                row["resume_max_abs_diff"] = max(abs(x - y) for x, y in zip(la, lb)) if len(la) == len(lb) else None
            row["adapter_saved"] = (b / "adapter" / "adapter_model.safetensors").is_file()
        if full is not None:
            row["peak_memory_gib_per_rank"] = full.get("peak_memory_gib_per_rank")
            row["eval"] = full.get("eval", [])[-1:] or None
        r.results["runs"].append(row)
        r.save()


def make_19b(folder: Path) -> Path:
    """A random-weight checkpoint of the official 19B architecture, written once."""
    if (folder / "config.json").is_file():
        return folder
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import full_size_config, random_model

    from cogvlm2.checkpoint import save_weights
    from cogvlm2.tiny import bundled_tokenizer_path

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    config = full_size_config("cogvlm2-llama3-chat-19B")
    model = random_model(config, "cuda", torch.bfloat16)
    state = {k: v.to("cpu") for k, v in model.state_dict().items()}
    del model
    torch.cuda.empty_cache()
    save_weights(state, tmp)
    (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    shutil.copyfile(bundled_tokenizer_path(), tmp / "tokenizer.json")
    tmp.rename(folder)
    return folder


def full_size_runs(r: Runner, backends: list[str], steps: int) -> None:
    from cogvlm2.finetune.toy import make_colour_dataset

    if r.left() < 150:  # writing the checkpoint alone takes about a minute
        r.results["runs"].append({"name": "19b", "skipped": f"{r.left():.0f} s left of the time budget"})
        r.save()
        return
    t0 = time.time()
    model = make_19b(r.work / "cogvlm2-19b-random")
    r.results["make_19b_seconds"] = round(time.time() - t0, 1)
    r.save()
    data = make_colour_dataset(r.work / "colours-19b", n=16, seed=0)
    for backend in backends:
        if r.left() < 90:
            r.results["runs"].append({"name": f"19b-{backend}", "skipped": "time budget spent"})
            break
        out = r.work / f"19b-{backend}"
        shutil.rmtree(out, ignore_errors=True)
        args = ["--model", str(model), "--data", str(data), "--output", str(out), "--method", "full",
                "--train-modules", "vision_expert,adapter", "--lr", "1e-5", "--max-steps", str(steps),
                "--batch-size", "1", "--num-workers", "2", "--no-save-final", "--log-every", "1"]
        row = r.finetune(f"19b-{backend}", backend, args, 330)
        state = state_of(out)
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] \
            if (out / "metrics.jsonl").is_file() else []
        if state is not None:
            row["peak_memory_gib_per_rank"] = state.get("peak_memory_gib_per_rank")
            row["losses"] = [h["loss"] for h in state["history"]]
        row["steps"] = [{k: m.get(k) for k in ("step", "train/tokens_per_s", "memory/peak_gib", "memory/reserved_gib")}
                        for m in metrics if "train/loss" in m]
        r.results["runs"].append(row)
        r.save()


def long_dataset(path: Path, n: int, text_tokens: int) -> Path:
    """n examples of equal length: one colour-square image (1344² after processing), a prompt and an
    answer of about text_tokens / 2 words each (one token per word with the Llama-3 tokenizer)."""
    from cogvlm2.finetune.toy import make_colour_dataset

    make_colour_dataset(path, n=n, seed=0)
    words = ["red", "green", "blue", "square", "grey", "corner", "left", "right"]
    half = max(1, text_tokens // 2)
    text = lambda k: " ".join(words[(k + i) % len(words)] for i in range(half))  # noqa: E731
    lines = []
    for i, line in enumerate(path.read_text().splitlines()):
        row = json.loads(line)
        row["conversations"] = [{"role": "user", "content": "Describe the picture: " + text(i)},
                                {"role": "assistant", "content": text(i + 1)}]
        lines.append(json.dumps(row))
    path.write_text("\n".join(lines) + "\n")
    return path


def steady_tokens_per_s(out: Path, warmup: int) -> tuple[float | None, list[float]]:
    """Median of the trainer's train/tokens_per_s over the steps after `warmup` (and every step's value)."""
    path = out / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    rates = [m["train/tokens_per_s"] for m in rows if "train/tokens_per_s" in m]
    steady = sorted(rates[warmup:])
    return (steady[len(steady) // 2] if steady else None), [round(x, 1) for x in rates]


def lora_scaling_runs(r: Runner, backends: list[str], steps: int, warmup: int, text_tokens: int,
                      model_name: str) -> None:
    """The same LoRA run (same data, same batch per GPU) on one GPU and on r.nproc GPUs per backend."""
    if model_name == "19b":
        if r.left() < 150:
            r.results["runs"].append({"name": "lora-scaling", "skipped": f"{r.left():.0f} s left of the time budget"})
            r.save()
            return
        t0 = time.time()
        model = str(make_19b(r.work / "cogvlm2-19b-random"))
        r.results["make_19b_seconds"] = round(time.time() - t0, 1)
    else:
        model = model_name
    data = long_dataset(r.work / "long" / "long.jsonl", n=max(16, 2 * r.nproc * steps), text_tokens=text_tokens)
    baseline = None
    for backend in ["single", *backends]:
        if r.left() < 60:
            r.results["runs"].append({"name": f"lora-scaling-{backend}", "skipped": "time budget spent"})
            break
        out = r.work / f"lora-{model_name}-{backend}"
        shutil.rmtree(out, ignore_errors=True)
        args = ["--model", model, "--data", str(data), "--output", str(out), "--method", "lora",
                "--lora-targets", "vision_expert_qkv,language_expert_qkv", "--lr", "1e-4", "--max-steps", str(steps),
                "--batch-size", "1", "--num-workers", "2", "--no-save-final", "--log-every", "1",
                "--no-compiled-ops"]  # the same eager ops on one GPU as on several (one process defaults to on)
        row = r.finetune(f"lora-scaling-{backend}", backend, args, 300)
        row["processes"] = 1 if backend == "single" else r.nproc
        row["tokens_per_s"], row["tokens_per_s_per_step"] = steady_tokens_per_s(out, warmup)
        state = state_of(out)
        if state is not None:
            row["peak_memory_gib_per_rank"] = state.get("peak_memory_gib_per_rank")
            row["losses"] = [h["loss"] for h in state["history"]]
        if backend == "single":
            baseline = row["tokens_per_s"]
        elif baseline and row["tokens_per_s"]:
            row["speedup"] = round(row["tokens_per_s"] / baseline, 3)
            print(f"lora-scaling-{backend}: {row['tokens_per_s']:,.0f} tokens/s on {r.nproc} processes vs "
                  f"{baseline:,.0f} on one: x{row['speedup']:.2f}", flush=True)
        r.results["runs"].append(row)
        r.save()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--work", default="/tmp/finetune_multi_gpu")
    p.add_argument("--budget", type=float, default=450, help="seconds for everything (the runs stop starting after)")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--tiny", default="zero2,zero3,fsdp2", help="backends for the tiny save/resume runs ('' = none)")
    p.add_argument("--full", default="zero3,fsdp2", help="backends for the 19B full fine-tune ('' = none)")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps of each 19B run")
    p.add_argument("--lora-scaling", default="", help="multi-process backends of the LoRA speed-up runs, e.g. "
                   "zero2,fsdp2 (each against the one-GPU trainer; '' = none)")
    p.add_argument("--scaling-model", default="19b", help="19b (the random 19B checkpoint) or tiny (smoke test)")
    p.add_argument("--scaling-steps", type=int, default=14, help="optimizer steps of each LoRA scaling run")
    p.add_argument("--scaling-warmup", type=int, default=4, help="first steps left out of the tokens/s median")
    p.add_argument("--text-tokens", type=int, default=2048, help="text tokens per LoRA scaling example")
    args = p.parse_args()
    for b in [x for x in (args.lora_scaling or "").split(",") if x]:
        if b not in BACKENDS and b not in LAUNCHERS:
            p.error(f"--lora-scaling: unknown backend {b!r} (choose from {', '.join([*BACKENDS, 'ddp'])})")
    if args.scaling_model not in ("19b", "tiny"):
        p.error("--scaling-model must be 19b or tiny")
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    r = Runner(out, work, args.budget, args.nproc)
    r.save()
    tiny_runs(r, [b for b in args.tiny.split(",") if b])
    if args.lora_scaling:
        lora_scaling_runs(r, [b for b in args.lora_scaling.split(",") if b], args.scaling_steps, args.scaling_warmup,
                          args.text_tokens, args.scaling_model)
    if args.full:
        full_size_runs(r, [b for b in args.full.split(",") if b], args.steps)
    r.save()
    print(json.dumps(r.results, indent=1))


if __name__ == "__main__":
    main()
