"""Soak test of `cogvlm2 serve`: N concurrent OpenAI-client streams for T seconds, some aborted mid-stream.

    python benchmarks/soak.py --clients 64 --seconds 180                 # starts `cogvlm2 serve --model tiny`
    python benchmarks/soak.py --url http://127.0.0.1:8000 --pid 1234     # an already running server

Each client loops: a chat completion (text, or with an image for image models), streamed; a fraction
of them is abandoned after a few chunks (the client closes the stream: the server must abort the
request and free its KV blocks). Reported: requests completed / aborted on purpose / errors (any
exception, HTTP error or error event), end-to-end latency and time to first token p50 / p99, the
server's RSS before and after, and, once idle, its KV-cache usage (0 = every block back in the pool)
and queue gauges. Exit status 1 when there was an error or KV blocks stayed in use.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def gauges(url: str, key: str | None) -> dict[str, float]:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name.startswith(("cogvlm2_num_requests", "cogvlm2_kv_cache"))}


def image_uri(rng: random.Random) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (rng.randint(16, 320), rng.randint(16, 320)), tuple(rng.randrange(256) for _ in range(3))).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


async def client_loop(i: int, client, model: str, args, deadline: float, stats: dict) -> None:
    rng = random.Random(args.seed * 1000 + i)
    while time.monotonic() < deadline:
        content = f"Client {i}, question {stats['sent']}: tell me something."
        if args.images and rng.random() < args.image_fraction:
            content = [{"type": "text", "text": content}, {"type": "image_url", "image_url": {"url": image_uri(rng)}}]
        abort_after = rng.randint(1, 4) if rng.random() < args.abort_fraction else None
        stats["sent"] += 1
        t0 = time.monotonic()
        ttft = None
        chunks = 0
        try:
            stream = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": content}], stream=True,
                max_tokens=rng.randint(1, args.max_tokens), temperature=rng.choice([0, 0.7, 1.0]),
                seed=rng.randrange(2**31))
            finish = None
            async for chunk in stream:
                chunks += 1
                if ttft is None and chunk.choices and chunk.choices[0].delta.content:
                    ttft = time.monotonic() - t0
                if chunk.choices and chunk.choices[0].finish_reason:
                    finish = chunk.choices[0].finish_reason
                if abort_after is not None and chunks >= abort_after:
                    break
            if abort_after is not None and chunks >= abort_after:
                await stream.close()
                stats["aborted"] += 1
                continue
            if finish not in ("stop", "length"):
                raise RuntimeError(f"stream ended without a finish reason after {chunks} chunks")
            stats["completed"] += 1
            stats["latency"].append(time.monotonic() - t0)
            if ttft is not None:
                stats["ttft"].append(ttft)
        except Exception as e:  # noqa: BLE001 - every failure is counted and shown
            stats["errors"] += 1
            if len(stats["error_samples"]) < 5:
                stats["error_samples"].append(f"{type(e).__name__}: {str(e)[:200]}")


async def soak(url: str, args) -> dict:
    import httpx
    import openai

    key = args.api_key or "unused"
    limits = httpx.Limits(max_connections=args.clients + 8, max_keepalive_connections=args.clients + 8)
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=args.request_timeout,
                                http_client=httpx.AsyncClient(limits=limits, timeout=args.request_timeout))
    models = await client.models.list()
    model = models.data[0].id
    stats = {"sent": 0, "completed": 0, "aborted": 0, "errors": 0, "latency": [], "ttft": [], "error_samples": []}
    deadline = time.monotonic() + args.seconds
    await asyncio.gather(*(client_loop(i, client, model, args, deadline, stats) for i in range(args.clients)))
    await client.close()
    return stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", default=None, help="a running server (default: start `cogvlm2 serve` here)")
    p.add_argument("--pid", type=int, default=None, help="its process id, for RSS (with --url)")
    p.add_argument("--model", default="tiny", help="model of the server started here")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--serve-args", default="", help="more `cogvlm2 serve` arguments (started server)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seconds", type=float, default=180)
    p.add_argument("--max-tokens", type=int, default=64, help="each request asks for 1..this many tokens")
    p.add_argument("--abort-fraction", type=float, default=0.2)
    p.add_argument("--image-fraction", type=float, default=0.3)
    p.add_argument("--request-timeout", type=float, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the result as JSON here")
    args = p.parse_args(argv)

    import httpx

    proc = None
    url, pid = args.url, args.pid
    if url is None:
        port = free_port()
        cmd = [sys.executable, "-m", "cogvlm2.cli", "serve", "--model", args.model, "--port", str(port),
               "--max-model-len", str(args.max_model_len), "--log-level", "warning", *args.serve_args.split()]
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        url, pid = f"http://127.0.0.1:{port}", proc.pid
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited: {proc.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the server did not start in 600 s")
            time.sleep(0.5)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    is_video = httpx.get(f"{url}/v1/models", headers=headers, timeout=30).status_code == 200 and "video" in args.model
    args.images = not is_video
    try:
        rss_before = rss_mb(pid)
        t0 = time.monotonic()
        stats = asyncio.run(soak(url, args))
        elapsed = time.monotonic() - t0
        idle_deadline = time.monotonic() + 60
        while True:  # aborted requests must leave the engine and give their KV blocks back
            g = gauges(url, args.api_key)
            idle = g.get("cogvlm2_num_requests_running", 0) == 0 and g.get("cogvlm2_num_requests_waiting", 0) == 0
            if (idle and g.get("cogvlm2_kv_cache_usage_perc", 0) == 0) or time.monotonic() > idle_deadline:
                break
            time.sleep(0.5)
        rss_after = rss_mb(pid)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    result = {
        "clients": args.clients, "seconds": round(elapsed, 1), "sent": stats["sent"], "completed": stats["completed"],
        "aborted_on_purpose": stats["aborted"], "errors": stats["errors"], "error_samples": stats["error_samples"],
        "latency_p50_s": percentile(stats["latency"], 50), "latency_p99_s": percentile(stats["latency"], 99),
        "ttft_p50_s": percentile(stats["ttft"], 50), "ttft_p99_s": percentile(stats["ttft"], 99),
        "completed_per_s": round(stats["completed"] / elapsed, 2),
        "rss_before_mb": rss_before, "rss_after_mb": rss_after,
        "kv_cache_usage_at_end": g.get("cogvlm2_kv_cache_usage_perc"),
        "running_at_end": g.get("cogvlm2_num_requests_running"), "waiting_at_end": g.get("cogvlm2_num_requests_waiting"),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    ok = result["errors"] == 0 and result["kv_cache_usage_at_end"] == 0
    print("OK: no errors, every KV block back in the pool" if ok else "FAILED: errors or KV blocks still in use")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
