"""``GET /metrics``: behind its bearer token, counters that move, gauges that tell, no PHI.

These run the web app in process (both databases); tests/workers/test_worker_metrics.py has
a real worker count routing on its own port, and tests/production the scrape through nginx.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Patient, reference_from, valid_refill

TOKEN = "metrics-token-" + "x" * 40

# A patient whose every field is a value no metric may ever carry.
CANARY = {
    "first_name": "Zebulonmetrica",
    "last_name": "Quixotelabel",
    "phone": "(202) 555-0177",
    "email": "canary.metrics@example.com",
    "rx_numbers": "9081726\n5463728",
    "medication": "Canarimab",
    "date_of_birth": "1971-07-09",
}


@pytest.fixture
def settings(settings):  # type: ignore[no-untyped-def]
    return settings.replace(metrics_token=TOKEN)


def scrape(
    client: Any, token: str | None = TOKEN
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    answer = client.get("/metrics", headers=headers)
    assert answer.status_code == 200, answer.status_code
    assert answer.headers["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(answer.get_data(as_text=True)):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_is_not_there_without_a_token(make_app, settings):
    app = make_app(settings.replace(metrics_token=None))
    answer = app.test_client().get("/metrics", headers={"Authorization": "Bearer anything"})
    assert answer.status_code == 404


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        f"Basic {TOKEN}",
        "Bearer wrong",
        f"Bearer {TOKEN}x",
        f"Bearer {TOKEN[:-1]}",
    ],
)
def test_metrics_refuses_anything_but_the_token(client, authorization):
    headers = {"Authorization": authorization} if authorization is not None else {}
    answer = client.get("/metrics", headers=headers)
    assert answer.status_code == 401
    assert answer.headers["WWW-Authenticate"].startswith("Bearer")
    assert b"intake_" not in answer.data
    # The token is not taken from the query string, where logs and proxies would keep it.
    assert client.get(f"/metrics?token={TOKEN}").status_code == 401


def test_counters_move_after_a_submission_an_invalid_form_and_a_failed_login(client):
    patient = Patient(client)
    before = scrape(client)
    reference_from(patient.refill())
    assert patient.refill(first_name="").status_code == 400
    login = client.get("/staff/login")
    assert login.status_code == 200
    from tests.conftest import hidden_fields

    refused = client.post(
        "/staff/login",
        data={
            **hidden_fields(login.get_data(as_text=True)),
            "username": "nobody-here",
            "password": "not-a-password",
            "otp": "123456",
        },
    )
    assert refused.status_code == 400
    after = scrape(client)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("intake_submissions_total", kind="refill", outcome="accepted") == 1
    assert moved("intake_submissions_total", kind="refill", outcome="invalid") == 1
    assert moved("intake_login_failures_total", reason="unknown_user") == 1
    # No worker runs here: the request waits to be routed, its task message in the outbox.
    assert value(after, "intake_requests_unrouted") == 1
    assert value(after, "intake_outbox_backlog") >= 1
    assert value(after, "intake_outbox_oldest_pending_seconds") >= 0
    assert value(after, "intake_database_up") == 1
    assert value(after, "intake_audit_head_seq") >= 2


def test_queue_depth_and_overdue_by_team(app, client):
    from datetime import timedelta

    from sqlalchemy import update

    from intake.clock import utcnow
    from intake.extensions import db
    from intake.models import Request
    from intake.requests import routing

    patient = Patient(client)
    references = [reference_from(patient.refill()) for _ in range(3)]
    with app.app_context():
        table = app.extensions["intake.routing"]
        ids = db.session.scalars(db.select(Request.id)).all()
        for request_id in ids:
            routing.route_request(db.session, table, request_id, utcnow())
        # One of them is late.
        db.session.execute(
            update(Request)
            .where(Request.reference == references[0])
            .values(sla_due_at=utcnow() - timedelta(hours=1))
        )
        db.session.commit()
    samples = scrape(client)
    assert value(samples, "intake_queue_depth", team="refills-main") == 3
    assert value(samples, "intake_queue_overdue", team="refills-main") == 1
    # Every team is listed, with nothing open in it too: a dashboard has a line per team.
    assert ("intake_queue_depth", (("team", "clinical"),)) in samples
    assert value(samples, "intake_requests_unrouted") == 0


def test_no_label_or_value_holds_phi(client):
    patient = Patient(client)
    reference = reference_from(patient.submit("refill", valid_refill(**CANARY)))
    text = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).get_data(
        as_text=True
    )
    for secret in [*CANARY.values(), "5550177", "2025550177", "9081726", reference]:
        for part in secret.split("\n"):
            assert part.lower() not in text.lower(), part
    # Labels come from fixed vocabularies: forms, outcomes, reasons, task names, team ids.
    allowed = re.compile(r"^[a-z][a-z0-9_.:+-]*$")
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("intake_"):
            continue  # prometheus_client's own: the Python version, garbage collections
        for sample in family.samples:
            for name, label in sample.labels.items():
                if name == "le":
                    float(label)  # a histogram bucket bound: a number, "+Inf" included
                    continue
                assert allowed.match(label), (sample.name, name, label)


DEPLOY = Path(__file__).resolve().parents[3] / "deploy" / "prometheus"


def test_every_alert_rule_names_a_metric_intake_exports(client):
    """An alert over a misspelt metric never fires: each name in deploy/ must be exported."""
    patient = Patient(client)
    patient.submit("refill", valid_refill())
    client.post("/staff/login", data={"email": "nobody@example.com", "password": "wrong"})
    text = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).get_data(
        as_text=True
    )
    exported = set()
    for family in [*text_string_to_metric_families(text), *REGISTRY.collect()]:
        exported.add(family.name)
        exported.update(f"{family.name}{suffix}" for suffix in ("_total", "_count", "_bucket"))
    rules = yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"][0]["rules"]
    assert {rule["alert"] for rule in rules} >= {
        "IntakeOutboxStuck",
        "IntakeCheckpointStale",
        "IntakeSlaBreaches",
    }
    for rule in rules:
        names = set(re.findall(r"\bintake_[a-z_]+", rule["expr"]))
        assert names, rule["alert"]
        assert names <= exported, (rule["alert"], names - exported)

    scrape_config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    assert scrape_config["rule_files"] == ["alerts.yml"]
    for job in scrape_config["scrape_configs"]:
        assert job["metrics_path"] == "/metrics"
        assert job["authorization"]["type"] == "Bearer"


FORKING_PROCESS = """
import os, sys
from config.multiprocess import prepare_multiprocess_dir
folder = prepare_multiprocess_dir("test")
print(folder, flush=True)
child = os.fork()
if child == 0:
    sys.exit(0)  # a gunicorn worker leaving: it runs the inherited exit handlers
os.waitpid(child, 0)
print(os.path.isdir(folder), flush=True)
"""


def test_the_metrics_folder_outlives_a_worker_and_goes_with_its_master(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env["TMPDIR"] = str(tmp_path)
    done = subprocess.run(  # noqa: S603
        [sys.executable, "-c", FORKING_PROCESS],
        env=env,
        cwd=Path(__file__).resolve().parents[3],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    folder, alive_after_child = done.stdout.split()
    assert folder.startswith(str(tmp_path))
    assert alive_after_child == "True"  # the child left the shared folder alone
    assert not Path(folder).exists()  # the master removed it on exit
