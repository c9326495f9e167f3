"""The server's counters and latency histograms, rendered as Prometheus text (format 0.0.4).

    metrics = Metrics()
    metrics.request("/v1/completions", 200, seconds=0.42)
    metrics.tokens(prompt=12, completion=30)
    text = metrics.render(running=3, waiting=0, in_flight=2)   # GET /metrics

Written by hand (a few dozen lines) rather than pulling in a client library; the tests parse
the output with prometheus_client's own parser. Safe to update from any thread.
"""

from __future__ import annotations

import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Upper bounds in seconds; +Inf is added."""


class Histogram:
    """Cumulative-bucket histogram of one quantity."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        i = next((i for i, b in enumerate(self.buckets) if value <= b), len(self.buckets))
        self.counts[i] += 1
        self.total += value
        self.n += 1

    def lines(self, name: str, labels: str) -> list[str]:
        sep = "," if labels else ""
        out, running = [], 0
        for bound, count in zip([*map(_num, self.buckets), "+Inf"], self.counts, strict=True):
            running += count
            out.append(f'{name}_bucket{{{labels}{sep}le="{bound}"}} {running}')
        braces = f"{{{labels}}}" if labels else ""
        out.append(f"{name}_sum{braces} {_num(self.total)}")
        out.append(f"{name}_count{braces} {self.n}")
        return out


def _num(x: float) -> str:
    return repr(float(x))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """Requests, tokens and latencies since the server started."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.latency: dict[str, Histogram] = defaultdict(Histogram)
        self.ttft = Histogram()
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def request(self, endpoint: str, status: int, *, seconds: float) -> None:
        """Count one finished request and its latency (a stream's until its last byte)."""
        with self.lock:
            self.requests[(endpoint, status)] += 1
            self.latency[endpoint].observe(seconds)

    def tokens(self, *, prompt: int = 0, completion: int = 0) -> None:
        with self.lock:
            self.prompt_tokens += prompt
            self.completion_tokens += completion

    def first_token(self, seconds: float) -> None:
        """Time from a sequence's arrival to its first generated token."""
        with self.lock:
            self.ttft.observe(seconds)

    def render(self, *, running: int, waiting: int, in_flight: int) -> str:
        """Everything, in Prometheus' text exposition format."""
        with self.lock:
            out = [
                "# HELP fedlm_requests_total HTTP requests answered, by endpoint and status "
                "(499: the client left before its answer was complete).",
                "# TYPE fedlm_requests_total counter",
            ]
            for (endpoint, status), count in sorted(self.requests.items()):
                out.append(
                    f'fedlm_requests_total{{endpoint="{_escape(endpoint)}",status="{status}"}} {count}'
                )
            out += [
                "# HELP fedlm_prompt_tokens_total Prompt tokens processed.",
                "# TYPE fedlm_prompt_tokens_total counter",
                f"fedlm_prompt_tokens_total {self.prompt_tokens}",
                "# HELP fedlm_completion_tokens_total Tokens generated.",
                "# TYPE fedlm_completion_tokens_total counter",
                f"fedlm_completion_tokens_total {self.completion_tokens}",
                "# HELP fedlm_request_duration_seconds Time to answer a request (streams: to the end).",
                "# TYPE fedlm_request_duration_seconds histogram",
            ]
            for endpoint, hist in sorted(self.latency.items()):
                out += hist.lines("fedlm_request_duration_seconds", f'endpoint="{_escape(endpoint)}"')
            out += [
                "# HELP fedlm_time_to_first_token_seconds From arrival to a sequence's first token.",
                "# TYPE fedlm_time_to_first_token_seconds histogram",
                *self.ttft.lines("fedlm_time_to_first_token_seconds", ""),
                "# HELP fedlm_sequences_running Sequences decoding in the current batch.",
                "# TYPE fedlm_sequences_running gauge",
                f"fedlm_sequences_running {running}",
                "# HELP fedlm_sequences_waiting Sequences queued for a batch row.",
                "# TYPE fedlm_sequences_waiting gauge",
                f"fedlm_sequences_waiting {waiting}",
                "# HELP fedlm_requests_in_flight Requests holding a slot (body, prompt or answer).",
                "# TYPE fedlm_requests_in_flight gauge",
                f"fedlm_requests_in_flight {in_flight}",
            ]
        return "\n".join(out) + "\n"
