"""Attacks on ``GET /metrics``, the worker's metrics server and the Celery queue split.

Each test fails if the defence it names were missing: the bearer token and nothing else, no
PHI in any label, a bounded set of label values whatever a client sends, a broken database
reported as ``intake_database_up 0`` (not a 500), and a worker port that says nothing but
404 or 401 to anyone without the token.
"""

from __future__ import annotations

import http.client
import socket
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from intake.ops import metrics
from tests.conftest import Patient, hidden_fields, reference_from, valid_contact, valid_refill
from tests.intake.ops.test_metrics import CANARY, TOKEN, scrape, value


@pytest.fixture
def settings(settings):  # type: ignore[no-untyped-def]
    return settings.replace(metrics_token=TOKEN)


def _refused(answer: Any) -> None:
    assert answer.status_code in (401, 404, 405, 308), answer.status_code
    assert b"intake_" not in answer.data
    assert b"python_info" not in answer.data


# --- the token ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [
        f"Bearer {TOKEN.upper()}",  # the token is case-sensitive, only the scheme is not
        f"Bearer{TOKEN}",
        f"Bearer\t{TOKEN}",
        f"Token {TOKEN}",
        f"{TOKEN}",
        f" Bearer {TOKEN}",
        f"Bearer {TOKEN} {TOKEN}",
        f"Bearer {TOKEN}\x00",
        f"Bearer {TOKEN[:20]}",
        f"Bearer {TOKEN}é",
        f"Bearer {TOKEN.replace('x', 'х')}",  # Cyrillic look-alikes
        "Bearer " + "x" * 100_000,  # very long
        f"Bearer wrong, Bearer {TOKEN}",  # duplicated header, joined by a proxy
        f"Bearer {TOKEN}, Bearer wrong",
    ],
)
def test_token_tricks_are_refused(client, authorization):
    answer = client.get("/metrics", environ_overrides={"HTTP_AUTHORIZATION": authorization})
    assert answer.status_code == 401, authorization[:80]
    assert b"intake_" not in answer.data


@pytest.mark.parametrize(
    "authorization", [f"Bearer {TOKEN}", f"bearer {TOKEN}", f"BEARER {TOKEN}", f"Bearer {TOKEN} "]
)
def test_the_token_itself_is_accepted_with_any_case_of_scheme(client, authorization):
    answer = client.get("/metrics", headers={"Authorization": authorization})
    assert answer.status_code == 200
    assert b"intake_database_up" in answer.data


def test_two_authorization_headers_do_not_let_a_wrong_one_through(client):
    # Werkzeug hands the view the first; whichever it takes, a wrong token alone never passes.
    answer = client.get(
        "/metrics", headers=[("Authorization", "Bearer wrong"), ("Authorization", "Bearer no")]
    )
    assert answer.status_code == 401


@pytest.mark.parametrize(
    "query",
    [
        f"token={TOKEN}",
        f"access_token={TOKEN}",
        f"authorization=Bearer+{TOKEN}",
        f"Authorization={urllib.parse.quote('Bearer ' + TOKEN)}",
        "x",
    ],
)
def test_a_token_in_the_query_string_or_a_cookie_is_not_accepted(client, query):
    _refused(client.get(f"/metrics?{query}"))
    client.set_cookie("token", TOKEN)
    client.set_cookie("Authorization", f"Bearer {TOKEN}")
    _refused(client.get(f"/metrics?{query}"))
    # With the header, a query string changes nothing.
    assert (
        client.get(f"/metrics?{query}", headers={"Authorization": f"Bearer {TOKEN}"}).status_code
        == 200
    )


def test_other_methods_and_head(client):
    assert client.head("/metrics").status_code == 401
    head = client.head("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert head.status_code == 200
    assert head.data == b""
    for method in ("post", "put", "delete", "patch"):
        answer = getattr(client, method)("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        assert answer.status_code in (400, 405), (method, answer.status_code)
        assert b"intake_" not in answer.data


@pytest.mark.parametrize(
    "path",
    [
        "/metrics/",
        "//metrics",
        "/metrics/x",
        "/METRICS",
        "/metrics;x",
        "/%6detrics",
        "/./metrics",
        "/staff/../metrics",
    ],
)
def test_path_variants_never_answer_without_the_token(client, path):
    # PATH_INFO as a server hands it over (the test client would read "//metrics" as a host).
    answer = client.get("/", environ_overrides={"PATH_INFO": path})
    assert answer.status_code in (308, 401, 404), (path, answer.status_code)
    assert b"intake_" not in answer.data
    if answer.status_code == 308:
        # Werkzeug merges slashes with a redirect; the target still asks for the token.
        location = urllib.parse.urlsplit(answer.headers["Location"]).path
        assert location == "/metrics", location
        _refused(client.get(location))
    with_token = client.get(
        "/", environ_overrides={"PATH_INFO": path, "HTTP_AUTHORIZATION": f"Bearer {TOKEN}"}
    )
    assert with_token.status_code in (200, 308, 404), (path, with_token.status_code)


def test_the_compare_is_constant_time(monkeypatch):
    calls: list[tuple[bytes, bytes]] = []
    real = metrics.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(metrics.hmac, "compare_digest", spy)
    assert metrics.token_matches(TOKEN, f"Bearer {TOKEN}")
    assert not metrics.token_matches(TOKEN, "Bearer " + "y" * len(TOKEN))
    assert not metrics.token_matches(TOKEN, f"Bearer {TOKEN[:-1]}")
    assert len(calls) == 3
    assert all(isinstance(a, bytes) and isinstance(b, bytes) for a, b in calls)
    # Nothing else in the module compares the token with ==.
    import inspect

    source = inspect.getsource(metrics.token_matches)
    assert "== expected" not in source and "expected ==" not in source


def test_an_empty_or_blank_configured_token_keeps_metrics_off(make_app, settings):
    for blank in ("", "   ", "\n", " \t \n"):
        app = make_app(settings.replace(metrics_token=blank))
        client = app.test_client()
        for authorization in ("Bearer ", "Bearer", "Bearer    "):
            answer = client.get("/metrics", headers={"Authorization": authorization})
            assert answer.status_code == 404, (blank, authorization)


# --- PHI ---------------------------------------------------------------------------------

CANARY_CONTACT = {
    "first_name": CANARY["first_name"],
    "last_name": CANARY["last_name"],
    "phone": CANARY["phone"],
    "email": CANARY["email"],
    "date_of_birth": CANARY["date_of_birth"],
    "message": "About Canarimab and my Rx 9081726",
}
CANARY_SECRETS = [
    *CANARY.values(),
    "Canarimab",
    "5550177",
    "2025550177",
    "9081726",
    "1971-07-09",
    "07/09/1971",
    "canary.metrics",
    "zebulon",
]


def _assert_no_canary(text: str, extra: list[str]) -> None:
    lowered = text.lower()
    for secret in [*CANARY_SECRETS, *extra]:
        for part in secret.split("\n"):
            if part:
                assert part.lower() not in lowered, part


def _login(client: Any, username: str) -> Any:
    page = client.get("/staff/login")
    return client.post(
        "/staff/login",
        data={
            **hidden_fields(page.get_data(as_text=True)),
            "username": username,
            "password": "Canarimab-password-1971",
            "otp": "123456",
        },
    )


def test_canary_phi_through_every_form_and_login_never_reaches_the_exposition(client):
    patient = Patient(client)
    before = scrape(client)
    reference = reference_from(patient.submit("refill", valid_refill(**CANARY)))
    contact_reference = reference_from(patient.submit("contact", valid_contact(**CANARY_CONTACT)))
    # Invalid forms, a forged location (team), a forged topic, the honeypot, a duplicate.
    patient.submit("refill", valid_refill(**{**CANARY, "date_of_birth": "2999-01-01"}))
    patient.submit("refill", valid_refill(**{**CANARY, "location": "Zebulonmetrica"}))
    patient.submit("contact", valid_contact(**{**CANARY_CONTACT, "topic": "Canarimab"}))
    patient.submit("refill", valid_refill(**{**CANARY, "extra_comments": "Zebulonmetrica"}))
    patient.submit("refill", valid_refill(**CANARY))
    # Forged hidden fields and form kinds in the URL.
    client.post("/refill", data={**valid_refill(**CANARY), "kind": "Zebulonmetrica"})
    client.post("/contact?kind=Quixotelabel", data=valid_contact(**CANARY_CONTACT))
    client.post(f"/{CANARY['first_name']}", data=valid_refill(**CANARY))
    # The status lookup with the canary reference and birth date.
    for ref in (reference, contact_reference, "R-ZZZZ-ZZZZ"):
        client.post("/status", data={"reference": ref, "date_of_birth": CANARY["date_of_birth"]})
    client.get(f"/thanks/{reference}")
    client.get("/thanks/R-QUIX-OTEL")
    # Failed logins under canary usernames (an email, a patient's name, a reference).
    for username in (CANARY["email"], CANARY["first_name"], reference, "x" * 300, "admin"):
        assert _login(client, username).status_code in (400, 429)
    text = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).get_data(
        as_text=True
    )
    _assert_no_canary(text, [reference, contact_reference, "R-QUIX-OTEL"])
    after = scrape(client)
    assert (
        value(after, "intake_submissions_total", kind="refill", outcome="accepted")
        - value(before, "intake_submissions_total", kind="refill", outcome="accepted")
        >= 1
    )
    # Every label value is from a fixed vocabulary.
    kinds = {
        labels.get("kind")
        for (name, labels_) in after
        for labels in [dict(labels_)]
        if name == "intake_submissions_total"
    }
    assert kinds <= {"refill", "contact", "status"}, kinds
    reasons = {
        dict(labels_)["reason"]
        for (name, labels_) in after
        if name == "intake_login_failures_total"
    }
    assert reasons <= {
        "unknown_user",
        "bad_password",
        "mfa_frozen",
        "bad_otp",
        "otp_reused",
        "disabled",
        "locked",
        "busy",
        "unknown",
    }, reasons


# --- cardinality -------------------------------------------------------------------------


def _label_sets(client: Any) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    return {key for key in scrape(client) if key[1] and key[0].startswith("intake_")}


def test_an_unauthenticated_client_cannot_grow_the_label_sets(make_app, settings):
    app = make_app(settings.replace(submit_rate_limit="2/minute", login_rate_limit="2/minute"))
    client = app.test_client()
    patient = Patient(client)
    # Make sure the fixed vocabulary already shows up once.
    patient.refill()
    before = _label_sets(client)
    for i in range(200):
        unique = f"u{i}-{CANARY['first_name']}"
        match i % 8:
            case 0:
                client.get(f"/{unique}")
            case 1:
                client.post(f"/refill?{unique}=1", data={"first_name": unique})
            case 2:
                client.post(f"/contact/{unique}", data={"x": unique})
            case 3:
                _login(client, unique)
            case 4:
                client.get(f"/thanks/R-{i:04d}-ABCD")
            case 5:
                client.get(f"/metrics?{unique}", headers={"Authorization": f"Bearer {unique}"})
            case 6:
                client.post("/status", data={"reference": unique, "date_of_birth": unique})
            case 7:
                client.open(f"/staff/{unique}", method=f"X{i}")
    after = _label_sets(client)
    new = after - before
    values = {v for _name, labels in new for _k, v in labels}
    # A handful of new outcomes (throttled, invalid, a login reason...), never one per request.
    assert len(new) <= 15, sorted(new)
    assert not any("u1" in v or CANARY["first_name"].lower() in v.lower() for v in values), values


# --- a broken or hostile database --------------------------------------------------------


def test_a_dead_database_is_reported_not_a_500(make_app, settings, tmp_path):
    app = make_app(settings.replace(database_url=f"sqlite:///{tmp_path}/missing/dir/none.sqlite3"))
    answer = app.test_client().get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert answer.status_code == 200
    samples = {
        s.name: s.value
        for f in text_string_to_metric_families(answer.get_data(as_text=True))
        for s in f.samples
    }
    assert samples["intake_database_up"] == 0
    assert "intake_outbox_backlog" not in samples


def test_a_dead_database_without_the_token_is_still_a_401(make_app, settings, tmp_path):
    app = make_app(settings.replace(database_url=f"sqlite:///{tmp_path}/missing/dir/none.sqlite3"))
    assert app.test_client().get("/metrics").status_code == 401


def test_a_hostile_team_id_in_the_database_cannot_inject_samples(app, client):
    from sqlalchemy import text

    from intake.extensions import db

    evil = 'x"} intake_database_up 0\nintake_evil{a="'
    with app.app_context():
        db.session.execute(
            text("INSERT INTO teams (id, name, spanish, created_at) VALUES (:id, 'n', false, :t)"),
            {"id": evil[:64], "t": "2026-01-01 00:00:00"},
        )
        db.session.commit()
    answer = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert answer.status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(answer.get_data(as_text=True))}
    assert "intake_evil" not in families
    assert [s.value for s in families["intake_database_up"].samples] == [1]
    teams = {s.labels["team"] for s in families["intake_queue_depth"].samples}
    assert evil[:64] in teams  # escaped, parsed back whole, nothing else added


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)  # PostgreSQL refuses a non-date
def test_a_corrupt_timestamp_in_the_outbox_does_not_break_the_scrape(app, client, backend):
    # SQLite hands timestamps back as text: one that does not parse once made the whole scrape
    # a 500, intake_database_up included. It now only loses that one age.
    from sqlalchemy import text

    from intake.extensions import db

    Patient(client).refill()
    with app.app_context():
        db.session.execute(text("UPDATE outbox SET created_at = 'not-a-date'"))
        db.session.commit()
    answer = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert answer.status_code == 200
    assert b"intake_database_up" in answer.data


# --- the worker's metrics server ---------------------------------------------------------


@pytest.fixture
def worker_server(app) -> Iterator[int]:  # type: ignore[no-untyped-def]
    server = metrics.serve_worker_metrics(app, 0, host="127.0.0.1")
    yield server.server_port
    server.shutdown()
    server.server_close()


def _worker_get(
    port: int, path: str, headers: dict[str, str] | None = None, method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        answer = conn.getresponse()
        return answer.status, dict(answer.getheaders()), answer.read()
    finally:
        conn.close()


@pytest.mark.parametrize(
    "path",
    ["/", "/metrics/", "/metrics/x", "/METRICS", "/favicon.ico", "/metrics%00", "/x/metrics"],
)
def test_the_worker_server_answers_404_elsewhere(worker_server, path):
    status, _headers, body = _worker_get(worker_server, path, {"Authorization": f"Bearer {TOKEN}"})
    assert status == 404, path
    assert b"intake_" not in body and b"Traceback" not in body


@pytest.mark.parametrize("path", ["//metrics", "/%6detrics", "/metrics?token=x"])
def test_the_worker_server_decodes_paths_like_the_web_app_and_still_wants_the_token(
    worker_server, path
):
    # wsgiref unquotes the path and http.server folds leading slashes: these are /metrics.
    status, _headers, body = _worker_get(worker_server, path)
    assert status == 401, path
    assert b"intake_" not in body


def test_the_worker_server_wants_the_token(worker_server):
    status, headers, body = _worker_get(worker_server, "/metrics")
    assert status == 401
    assert headers["WWW-Authenticate"].startswith("Bearer")
    assert b"intake_" not in body
    status, _h, body = _worker_get(worker_server, f"/metrics?token={TOKEN}")
    assert status == 401
    status, _h, body = _worker_get(
        worker_server, "/metrics", {"Authorization": f"Bearer {TOKEN.upper()}"}
    )
    assert status == 401
    status, _h, body = _worker_get(
        worker_server, "/metrics?x", {"Authorization": f"Bearer {TOKEN}"}
    )
    assert status == 200
    assert b"intake_requests_routed" in body or b"intake_sla_breaches" in body
    # Counters only: a worker says nothing of the database.
    assert b"intake_queue_depth" not in body


def test_the_worker_server_leaks_no_traceback_on_garbage(worker_server):
    for raw in (
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\x00" * 40 + b"\r\n\r\n",
        b"GET /metrics HTTP/9.9\r\n\r\n",
        b"GET " + b"/" * 70000 + b" HTTP/1.1\r\n\r\n",
        b"BREW /metrics HTTP/1.1\r\nAuthorization: Bearer x\r\n\r\n",
    ):
        with socket.create_connection(("127.0.0.1", worker_server), timeout=10) as sock:
            sock.sendall(raw)
            sock.shutdown(socket.SHUT_WR)
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
        assert b"Traceback" not in received
        assert b"intake_" not in received
    # And it still answers afterwards.
    assert _worker_get(worker_server, "/metrics")[0] == 401


def test_the_worker_server_is_off_without_a_token(make_app, settings):
    app = make_app(settings.replace(metrics_token=None))
    server = metrics.serve_worker_metrics(app, 0, host="127.0.0.1")
    try:
        status, _h, body = _worker_get(
            server.server_port, "/metrics", {"Authorization": "Bearer anything"}
        )
        assert status == 404
        assert b"intake_" not in body
    finally:
        server.shutdown()
        server.server_close()


def test_one_idle_connection_does_not_stop_the_worker_scrape(worker_server):
    # wsgiref's server alone serves one connection at a time with no timeout: a client that
    # connected and sent nothing once blocked every scrape of the worker's metrics.
    with socket.create_connection(("127.0.0.1", worker_server), timeout=10):
        conn = http.client.HTTPConnection("127.0.0.1", worker_server, timeout=5)
        try:
            conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
            try:
                status = conn.getresponse().status
            except TimeoutError:
                status = None
        finally:
            conn.close()
    assert status == 200


# --- queues ------------------------------------------------------------------------------


def test_notify_tasks_and_only_those_go_to_the_notifications_queue(app):
    # The outbox publishes with send_task(name) and no queue: the router alone decides.
    import workers.tasks  # noqa: F401 - registers the shared tasks on this Celery app

    celery = app.extensions["celery"]
    router = celery.amqp.router
    names = sorted(name for name in celery.tasks if name.startswith("workers.tasks."))
    assert any(name.startswith("workers.tasks.notify_") for name in names), names
    for name in names:
        queue = router.route({}, name)["queue"].name
        expected = "notifications" if name.startswith("workers.tasks.notify_") else "routing"
        assert queue == expected, (name, queue)
    # A name that merely contains "notify_" elsewhere is not caught by the glob.
    assert router.route({}, "workers.tasks.x_notify_team")["queue"].name == "routing"
    assert router.route({}, "other.notify_team")["queue"].name == "routing"
