"""Prometheus metrics of one server: per-request counters and latencies, engine gauges read at scrape time."""

from __future__ import annotations

from ..engine.protocol import EngineClient, RequestOutput

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)


class Metrics:
    """Own registry per server (several apps in one process, as in tests, never collide)."""

    def __init__(self, engine: EngineClient, model_name: str):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        label = {"model_name": model_name}
        self.requests = Counter("cogvlm2_requests", "Engine requests finished, by finish reason",
                                ["model_name", "finish_reason"], registry=r)
        self.prompt_tokens = Counter("cogvlm2_prompt_tokens", "Prompt tokens processed (vision tokens included)",
                                     ["model_name"], registry=r).labels(**label)
        self.generation_tokens = Counter("cogvlm2_generation_tokens", "Tokens generated",
                                         ["model_name"], registry=r).labels(**label)
        self.ttft = Histogram("cogvlm2_time_to_first_token_seconds", "Time from arrival to the first token",
                              ["model_name"], buckets=_LATENCY_BUCKETS, registry=r).labels(**label)
        self.tpot = Histogram("cogvlm2_time_per_output_token_seconds", "Mean time between output tokens of a request",
                              ["model_name"], buckets=_LATENCY_BUCKETS, registry=r).labels(**label)
        self.e2e = Histogram("cogvlm2_e2e_request_latency_seconds", "Time from arrival to the last token",
                             ["model_name"], buckets=_LATENCY_BUCKETS, registry=r).labels(**label)
        self.errors = Counter("cogvlm2_http_errors", "Requests answered with an error, by HTTP status",
                              ["status"], registry=r)
        self.model_name = model_name
        for name, doc, read in (
            ("cogvlm2_num_requests_running", "Requests in the running batch", lambda: engine.stats().num_running),
            ("cogvlm2_num_requests_waiting", "Requests waiting to be scheduled", lambda: engine.stats().num_waiting),
            ("cogvlm2_kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1)", lambda: engine.stats().kv_usage),
        ):
            Gauge(name, doc, ["model_name"], registry=r).labels(**label).set_function(read)

    def observe(self, out: RequestOutput | None, prompt_len: int) -> None:
        """One engine request ended; `out` is its last output (None when it produced none)."""
        reason = (out.finish_reason if out is not None and out.finished else None) or "abort"
        self.requests.labels(model_name=self.model_name, finish_reason=reason).inc()
        self.prompt_tokens.inc(prompt_len)
        n = len(out.token_ids) if out is not None else 0
        self.generation_tokens.inc(n)
        m = out.metrics if out is not None else None
        if m is None or m.first_token_time is None:
            return
        self.ttft.observe(m.first_token_time - m.arrival_time)
        if m.finished_time is not None:
            self.e2e.observe(m.finished_time - m.arrival_time)
            if n > 1:
                self.tpot.observe((m.finished_time - m.first_token_time) / (n - 1))

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
