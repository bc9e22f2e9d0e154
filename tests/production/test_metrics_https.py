"""``GET /metrics`` through nginx over HTTPS, counted across gunicorn's workers.

gunicorn runs docker-compose.yml's command (``--config python:config.gunicorn``, four workers),
so a count made by whichever worker served the form must show up in whichever worker serves the
scrape: that is the multiprocess folder at work. The routing worker's own port is checked too.
"""

from __future__ import annotations

import http.client
import secrets
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.production.conftest import Door, ProductionStack, WebClient
from tests.production.test_patient_https import PATIENT_FIELDS, send_like_a_person
from tests.workers.conftest import wait_until

pytestmark = [pytest.mark.postgres]

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
ACCEPTED = {"kind": "refill", "outcome": "accepted"}
TEAM = "refills-main"  # config/routing.toml's team for a refill picked up at the main store


def token(stack: ProductionStack) -> str:
    return stack.env["INTAKE_METRICS_TOKEN"]


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def scrape(stack: ProductionStack, client: WebClient) -> Samples:
    answer = client.get("/metrics", {"Authorization": f"Bearer {token(stack)}"})
    assert answer.status == 200, (answer.status, answer.text[:300])
    assert (answer.header("Content-Type") or "").startswith("text/plain")
    return parse(answer.text)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: Samples, name: str) -> float:
    return sum(v for (n, _labels), v in samples.items() if n == name)


def test_metrics_over_https_wants_the_token(production_stack: ProductionStack, door: Door) -> None:
    client = production_stack.client(door.source)
    bare = client.get("/metrics")
    assert bare.status == 401, bare.status
    assert "intake_" not in bare.text
    wrong = client.get("/metrics", {"Authorization": f"Bearer {secrets.token_urlsafe(36)}"})
    assert wrong.status == 401, wrong.status
    samples = scrape(production_stack, client)
    assert value(samples, "intake_database_up") == 1


def test_submissions_and_failed_logins_are_counted_across_gunicorn_workers(
    production_stack: ProductionStack, door: Door
) -> None:
    stack = production_stack
    scraper = stack.client(door.source)
    before = scrape(stack, scraper)

    references = send_like_a_person(
        stack.client(door.source),
        {
            "/refill": {
                **PATIENT_FIELDS,
                "rx_numbers": "7654321",
                "location": "main",
                "fulfillment": "pickup",
                "consent_contact": "y",
            }
        },
    )
    stack.wait_for_status(references["/refill"], "queued")

    # Four gunicorn workers: scrape several times, so more than one of them answers.
    for _ in range(8):
        after = scrape(stack, scraper)
        assert value(after, "intake_submissions_total", **ACCEPTED) == (
            value(before, "intake_submissions_total", **ACCEPTED) + 1
        )

    failed = stack.client(door.source).log_in("no-such-staff", secrets.token_urlsafe(16), "000000")
    assert failed.status in (200, 400, 401, 429), failed.status
    wait_until(
        lambda: (
            total(scrape(stack, scraper), "intake_login_failures_total")
            > total(before, "intake_login_failures_total")
        ),
        10,
        message="a failed login counted",
    )


def worker_get(stack: ProductionStack, path: str, bearer: str | None) -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", stack.worker_metrics_port, timeout=10)
    try:
        headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
        connection.request("GET", path, headers=headers)
        answer = connection.getresponse()
        return answer.status, answer.read().decode()
    finally:
        connection.close()


def test_the_routing_worker_counts_on_its_own_port(
    production_stack: ProductionStack, door: Door
) -> None:
    stack = production_stack
    assert worker_get(stack, "/metrics", None)[0] == 401
    assert worker_get(stack, "/nope", token(stack))[0] == 404
    status, text = worker_get(stack, "/metrics", token(stack))
    assert status == 200
    before = parse(text)

    references = send_like_a_person(
        stack.client(door.source),
        {
            "/refill": {
                **PATIENT_FIELDS,
                "rx_numbers": "7654322",
                "location": "main",
                "fulfillment": "pickup",
                "consent_contact": "y",
            }
        },
    )
    stack.wait_for_status(references["/refill"], "queued")

    def routed() -> Any:
        status, text = worker_get(stack, "/metrics", token(stack))
        assert status == 200
        samples = parse(text)
        done = value(samples, "intake_requests_routed_total", team=TEAM) > value(
            before, "intake_requests_routed_total", team=TEAM
        )
        return samples if done else None

    after = wait_until(routed, 10, message="the routing counted on the worker's port")
    assert value(after, "intake_requests_routed_total", team=TEAM) == (
        value(before, "intake_requests_routed_total", team=TEAM) + 1
    )
    assert value(after, "intake_routing_latency_seconds_count") == (
        value(before, "intake_routing_latency_seconds_count") + 1
    )
