"""Multi-GPU fine-tuning check and memory figures (2 GPUs): ZeRO-2, ZeRO-3 and FSDP2 on the tiny model
with save + `--resume latest` (the resumed losses must equal the uninterrupted run's), then a full
fine-tune of the visual expert + GLU adapter of the full-size 19B architecture (random bf16 weights)
under ZeRO-3 and FSDP2, with every GPU's peak memory and tokens/s.

Every run is the real CLI (`accelerate launch ... -m cogvlm2.finetune finetune`), one after another,
each under its own time limit; results are appended to OUT/finetune_multi_gpu.json as they come, so a
run cut short still reports what finished.

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl   # carried deepspeed
    PYTHONPATH=/tmp/site:. python3 benchmarks/finetune_multi_gpu.py --out $OUT [--budget 450]

The 19B checkpoint is written once to --work (random weights, ~39 GB, the official key names and the
bundled Llama-3 tokenizer). Its runs skip the final 39 GB model write (--no-save-final) and save no
checkpoint (the optimizer state of 7B trained parameters is ~110 GB); save / resume is what the tiny
runs check.
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
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / BACKENDS[backend]),
               "--num_processes", str(self.nproc), "--main_process_port", str(self.port),
               "-m", "cogvlm2.finetune", "finetune", "--no-progress", "--no-tensorboard", *args]
        t0 = time.time()
        limit = max(10.0, min(limit, self.left()))
        # on timeout the launcher AND its per-GPU workers go (kill_tree), freeing the GPUs
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--work", default="/tmp/finetune_multi_gpu")
    p.add_argument("--budget", type=float, default=450, help="seconds for everything (the runs stop starting after)")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--tiny", default="zero2,zero3,fsdp2", help="backends for the tiny save/resume runs ('' = none)")
    p.add_argument("--full", default="zero3,fsdp2", help="backends for the 19B full fine-tune ('' = none)")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps of each 19B run")
    args = p.parse_args()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    r = Runner(out, work, args.budget, args.nproc)
    r.save()
    tiny_runs(r, [b for b in args.tiny.split(",") if b])
    if args.full:
        full_size_runs(r, [b for b in args.full.split(",") if b], args.steps)
    r.save()
    print(json.dumps(r.results, indent=1))


if __name__ == "__main__":
    main()
