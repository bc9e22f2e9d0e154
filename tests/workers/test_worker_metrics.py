"""A real Celery worker (prefork pool) counts routing on its own /metrics port.

The routing task runs in a pool child; the worker's metrics thread runs in the main process.
The count shows up only if both share the multiprocess folder (config.multiprocess), which is
what this exercises.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

import tests.workers.conftest as worker_conftest
from tests.conftest import reference_from
from tests.workers.conftest import free_port, pipeline_settings, wait_until
from tests.workers.test_pipeline import all_queued, rows

TOKEN = "worker-metrics-token-" + "y" * 40
TEAM = "refills-main"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
def settings(base_settings, database_url, tmp_path, redis_server, smtp_server):
    smtp_url, _mailbox = smtp_server
    return pipeline_settings(base_settings, database_url, tmp_path, redis_server.url, smtp_url)


@pytest.fixture
def metrics_port(monkeypatch: pytest.MonkeyPatch) -> int:
    """The worker's metrics port; the token and port go into the worker's environment."""
    port = free_port()
    original = worker_conftest.process_env

    def with_metrics(settings: Any, **extra: str) -> dict[str, str]:
        env = original(settings, **extra)
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # the worker names its own, as in production
        env["INTAKE_METRICS_TOKEN"] = TOKEN
        env["INTAKE_WORKER_METRICS_PORT"] = str(port)
        return env

    monkeypatch.setattr(worker_conftest, "process_env", with_metrics)
    return port


@dataclass(frozen=True)
class Answer:
    status_code: int
    content_type: str
    text: str


def get(port: int, path: str = "/metrics", token: str | None = TOKEN) -> Answer:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    asked = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers)  # noqa: S310
    try:
        with urllib.request.urlopen(asked, timeout=5) as answer:  # noqa: S310 - our own port
            return Answer(answer.status, answer.headers["Content-Type"], answer.read().decode())
    except urllib.error.HTTPError as error:
        return Answer(error.code, error.headers.get("Content-Type", ""), error.read().decode())


def scrape(port: int) -> Samples:
    answer = get(port)
    assert answer.status_code == 200, answer.status_code
    assert answer.content_type.startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def answers(port: int) -> bool:
    try:
        return get(port, token=None).status_code == 401
    except OSError:
        return False


def test_a_prefork_worker_counts_routing_on_its_metrics_port(
    app, patient, celery_processes, settings, metrics_port
):
    celery_processes(settings).wait_ready()
    wait_until(lambda: answers(metrics_port), 15, message="the worker's metrics port")

    assert get(metrics_port, token=None).status_code == 401
    assert get(metrics_port, token="not-the-token-" + "z" * 30).status_code == 401
    assert get(metrics_port, path="/nope").status_code == 404

    before = scrape(metrics_port)
    reference = reference_from(patient.refill(lang="en", location="main"))
    wait_until(lambda: all_queued(app, [reference]), 30, message="routed")
    assert rows(app)[reference].team == TEAM

    def counted() -> Samples | None:
        samples = scrape(metrics_port)
        routed = value(samples, "intake_requests_routed_total", team=TEAM)
        return (
            samples if routed > value(before, "intake_requests_routed_total", team=TEAM) else None
        )

    after = wait_until(counted, 10, message="the routing count on the worker's port")
    assert value(after, "intake_requests_routed_total", team=TEAM) == (
        value(before, "intake_requests_routed_total", team=TEAM) + 1
    )
    assert value(after, "intake_routing_latency_seconds_count") == (
        value(before, "intake_routing_latency_seconds_count") + 1
    )
