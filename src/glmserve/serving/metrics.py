"""Prometheus metrics: HTTP requests by route and status, token latencies observed by the chat
service, and the engines' own numbers (queue, running, KV usage, prefix-cache hits, token
counts) read from AsyncEngine.stats() at scrape time, so the token path pays nothing for them."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = CONTENT_TYPE_LATEST
TTFT_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
INTER_TOKEN_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
E2E_BUCKETS_S = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

# stats() key -> (metric name, help); gauges are point-in-time, counters only grow.
ENGINE_GAUGES = {
    "num_running": ("glmserve_num_requests_running", "Sequences in the running batch"),
    "num_waiting": ("glmserve_num_requests_waiting", "Sequences queued in the engine's scheduler"),
    "num_unfinished": ("glmserve_num_requests_unfinished", "Sequences admitted by the server, not finished"),
    "kv_cache_usage": ("glmserve_kv_cache_usage_ratio", "Fraction of KV cache blocks in use"),
    "num_free_blocks": ("glmserve_kv_cache_free_blocks", "KV cache blocks free or evictable"),
    "num_blocks": ("glmserve_kv_cache_blocks", "KV cache blocks in the pool"),
    "prefix_cache_hit_rate": (
        "glmserve_prefix_cache_hit_rate",
        "Prefix-cache hits over lookups, since start",
    ),
    "generation_tokens_per_s": ("glmserve_generation_tokens_per_second", "Generated tokens/s, last 10 s"),
}
ENGINE_COUNTERS = {
    "num_prompt_tokens": ("glmserve_prompt_tokens", "Prompt tokens admitted"),
    "num_generated_tokens": ("glmserve_generation_tokens", "Tokens generated"),
    "num_preemptions": ("glmserve_num_preemptions", "Sequences preempted for lack of KV blocks"),
}


class EngineCollector(Collector):
    def __init__(self, read_stats: Callable[[], Mapping[str, Mapping[str, float]]]):
        self.read_stats = read_stats  # () -> {model name: stats}

    def collect(self) -> Iterator:
        stats_by_model = self.read_stats()
        for table, family in ((ENGINE_GAUGES, GaugeMetricFamily), (ENGINE_COUNTERS, CounterMetricFamily)):
            for key, (name, help_text) in table.items():
                metric = family(name, help_text, labels=["model"])
                for model, stats in stats_by_model.items():
                    if key in stats:
                        metric.add_metric([model], float(stats[key]))
                yield metric


class ServerMetrics:
    """One registry per app, so several apps in one process (tests, the UI) never collide."""

    def __init__(self, read_stats: Callable[[], Mapping[str, Mapping[str, float]]]):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "glmserve_http_requests",
            "HTTP requests by route and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            "glmserve_time_to_first_token_seconds",
            "From admission to the first token",
            ["model"],
            buckets=TTFT_BUCKETS_S,
            registry=self.registry,
        )
        self.inter_token_latency = Histogram(
            "glmserve_inter_token_latency_seconds",
            "Between consecutive outputs of a sequence",
            ["model"],
            buckets=INTER_TOKEN_BUCKETS_S,
            registry=self.registry,
        )
        self.request_latency = Histogram(
            "glmserve_e2e_request_latency_seconds",
            "From admission to the last token of a sequence",
            ["model"],
            buckets=E2E_BUCKETS_S,
            registry=self.registry,
        )
        self.registry.register(EngineCollector(read_stats))

    def record_request(self, method: str, route: str, status: int) -> None:
        self.requests.labels(method, route, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
