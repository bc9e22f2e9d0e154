"""Running Intake: the operator's commands, one-machine serving, and what a deployment needs.

``commands`` is the ``intake`` CLI (users, teams, keys, retention, demo; ``intake audit`` comes
from ``intake.audit.commands``); ``serve`` runs web, worker and beat on one machine; ``demo``
seeds demo data; ``embedded`` generates the embedded profile's secret files and reads secret
settings; ``private_files`` keeps the data folder private; ``logs`` configures structured
logging; ``proxies`` believes ``X-Forwarded-*`` from trusted proxies only; ``transport``
makes TLS to the mail server and Redis verify certificates; ``database_roles`` grants the
app's PostgreSQL role only what it needs (SELECT and INSERT on the audit trail); ``health``
answers ``/healthz`` and ``/readyz``; ``metrics`` counts what happened and serves
``/metrics`` for Prometheus.
"""
