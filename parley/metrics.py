"""Prometheus metrics: one registry per process, fed by every role it runs.

`Metrics` implements the observers the rooms declare where they are used
(`api.context.EdgeMetrics` for the edge, `actors.turn.TurnObserver` for the
worker's turns, `events.log.LogObserver` for the worker's appends,
`actors.webhooks.WebhookObserver` for its turn-end webhooks), so no room
imports prometheus-client or this module; the wiring (parley/services.py) hands
the same `Metrics` to each role, and the edge's GET /metrics exposes it. With
`parley dev` (every role in one process) that is everything; a process without
an edge serves it on its own port (`serve_metrics`).

Labels are bounded: routes are route templates (an unmatched path is
`unmatched`), models are catalogue names, outcomes and limits fixed words.
Every call here is a few counter updates: nothing blocks or raises.
"""

from __future__ import annotations

from collections.abc import Iterator

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from actors.webhooks import Outcome as WebhookOutcome
from events.vocabulary import BillingRejected, Cancelled, Done, Failed, TurnEnd

# seconds: from a quick local model's first token to a slow provider's whole answer
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0, 300.0)
# how late a loop's timer ran: a token's latency targets are milliseconds
_LOOP_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# seconds from a turn's end to its webhook's attempt: at once, through the retries
# (1 s, 2 s, 4 s ... an hour apart), to a receiver away for a day
_WEBHOOK_BUCKETS = (0.05, 0.25, 1.0, 5.0, 30.0, 120.0, 600.0, 3600.0, 4 * 3600.0, 86400.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        # edge
        self.http_requests = Counter(
            "parley_http_requests",
            "HTTP requests answered, by route template, method and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.http_seconds = Histogram(
            "parley_http_request_duration_seconds",
            "time to answer a request (an event stream: until it closed)",
            ["route", "method"],
            buckets=_HTTP_BUCKETS,
            registry=r,
        )
        self.viewers = Gauge("parley_sse_viewers", "open SSE streams on this edge", registry=r)
        self.limited_requests = Counter(
            "parley_limited_requests",
            "requests refused by a per-user limit (rate, streams, turns)",
            ["limit"],
            registry=r,
        )
        self.read_at_scrape = _ReadAtScrape()
        r.register(self.read_at_scrape)
        # every role (parley/stalls.py)
        self.loop_stalls = Counter(
            "parley_event_loop_stalls",
            "times one piece of code held this process's event loop for over a second",
            registry=r,
        )
        self.loop_stalled_seconds = Counter(
            "parley_event_loop_stalled_seconds",
            "how long those stalls held the event loop, in all",
            registry=r,
        )
        self.loop_lag_seconds = Histogram(
            "parley_event_loop_lag_seconds",
            "how late this process's event loop ran a timer due every 0.1 s: the wait "
            "every callback of it has (a loop short of CPU, or kept busy)",
            buckets=_LOOP_LAG_BUCKETS,
            registry=r,
        )
        # worker
        self.turns = Counter(
            "parley_turns", "turns ended, by model and outcome", ["model", "outcome"], registry=r
        )
        self.active = Gauge("parley_turns_active", "turns running in this worker", registry=r)
        self.tokens = Counter(
            "parley_tokens",
            "tokens consumed by ended turns, by model and direction (input, output)",
            ["model", "direction"],
            registry=r,
        )
        self.model_seconds = Histogram(
            "parley_model_call_duration_seconds",
            "one streamed model call, request to last byte",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.chains_broken = Counter(
            "parley_append_chains_broken",
            "appends whose events, sent together, another writer's entry came between "
            "(the rest went one at a time: a round trip more each)",
            registry=r,
        )
        self.first_token_seconds = Histogram(
            "parley_time_to_first_token_seconds",
            "a turn's start (its `started` decided) to the model's first text",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )

        self.webhook_attempts = Counter(
            "parley_webhook_attempts",
            "turn-end webhook attempts, by outcome: delivered (2xx), refused (any other "
            "status, a redirect too), unanswered (no connection, a timeout, a cut answer)",
            ["outcome"],
            registry=r,
        )
        self.webhook_age_seconds = Histogram(
            "parley_webhook_attempt_end_age_seconds",
            "how long after its turn ended a webhook attempt ended, by outcome",
            ["outcome"],
            buckets=_WEBHOOK_BUCKETS,
            registry=r,
        )

    # ------------------------------------------------------------ api.context.EdgeMetrics

    def http_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.http_requests.labels(route, method, str(status)).inc()
        self.http_seconds.labels(route, method).observe(seconds)

    def sse_viewers(self, delta: int) -> None:
        self.viewers.inc(delta)

    def limited(self, limit: str) -> None:
        self.limited_requests.labels(limit).inc()

    def projection(self, *, lags: dict[str, int] | None, errors: int | None) -> None:
        """What the scrape about to be rendered read; None: not readable now, so left
        out of it (a last value kept would hide a lag growing through an outage)."""
        self.read_at_scrape.lags = lags
        self.read_at_scrape.errors = errors

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    # ------------------------------------------------------------ events.log.LogObserver

    def chain_broken(self) -> None:
        self.chains_broken.inc()

    # ------------------------------------------------------------ actors.webhooks.WebhookObserver

    def webhook_attempt(self, outcome: WebhookOutcome, end_age_s: float) -> None:
        self.webhook_attempts.labels(outcome).inc()
        self.webhook_age_seconds.labels(outcome).observe(end_age_s)

    # ------------------------------------------------------------ actors.turn.TurnObserver

    def turn_started(self, model: str) -> None:
        self.active.inc()

    def first_token(self, model: str, seconds: float) -> None:
        self.first_token_seconds.labels(model).observe(seconds)

    def model_call(self, model: str, seconds: float) -> None:
        self.model_seconds.labels(model).observe(seconds)

    def turn_ended(self, model: str, end: TurnEnd | None) -> None:
        self.active.dec()
        if end is not None:  # else counted where its end is written (`turn_closed`)
            self._count(model, end)

    def turn_closed(self, model: str, end: TurnEnd) -> None:
        self._count(model, end)

    def _count(self, model: str, end: TurnEnd) -> None:
        """Each turn once, as its end in the log says, with the tokens it records."""
        self.turns.labels(model, outcome(end)).inc()
        if isinstance(end, Done | Cancelled | Failed):
            self.tokens.labels(model, "input").inc(end.input_tokens)
            self.tokens.labels(model, "output").inc(end.output_tokens)


def outcome(end: TurnEnd) -> str:
    """The `outcome` label: done, cancelled, failed, billing_rejected, or interrupted
    (`failed: interrupted`, its worker stopped mid-turn)."""
    match end:
        case Done():
            return "done"
        case Cancelled():
            return "cancelled"
        case Failed(code="interrupted"):
            return "interrupted"
        case Failed():
            return "failed"
        case BillingRejected():
            return "billing_rejected"


async def metrics_page(request: web.Request) -> web.Response:
    body, content_type = request.app[METRICS_KEY].render()
    return web.Response(body=body, headers={"Content-Type": content_type})


METRICS_KEY = web.AppKey("parley_metrics", Metrics)


def metrics_app(metrics: Metrics) -> web.Application:
    """GET /metrics alone, for a process that runs no edge (`parley serve --role worker`)."""
    app = web.Application()
    app[METRICS_KEY] = metrics
    app.router.add_get("/metrics", metrics_page)
    return app


class _ReadAtScrape(Collector):
    """The projection's lag and error count, as the scrape read them: a sample only
    when it could (an absent sample, not a stale one)."""

    def __init__(self) -> None:
        self.lags: dict[str, int] | None = None
        self.errors: int | None = None

    def collect(self) -> Iterator[Metric]:
        if self.lags is not None:
            lag = GaugeMetricFamily(
                "parley_projection_lag_events",
                "events in the log a projection has not applied yet (read at scrape time)",
                labels=["projection"],
            )
            for name, value in sorted(self.lags.items()):
                lag.add_metric([name], value)
            yield lag
        if self.errors is not None:
            yield GaugeMetricFamily(
                "parley_projection_errors",
                "events the projection recorded as skipped or sanitised (read at scrape time)",
                value=self.errors,
            )
