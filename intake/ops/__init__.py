"""Running Intake: the operator's commands, one-machine serving, and what a deployment needs.

``commands`` is the ``intake`` CLI (users, teams, keys, retention, demo; ``intake audit`` comes
from ``intake.audit.commands``); ``serve`` runs web, worker and beat on one machine; ``demo``
seeds demo data; ``embedded`` generates the embedded profile's secret files and reads secret
settings; ``private_files`` keeps the data folder private; ``logs`` configures structured
logging; ``proxies`` believes ``X-Forwarded-*`` from trusted proxies only; ``health`` answers
``/healthz`` and ``/readyz``.
"""
