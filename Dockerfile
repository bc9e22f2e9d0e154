# Intake: one image for the web, worker, beat and migrate services of docker-compose.yml.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    INTAKE_PROFILE=production INTAKE_DATA_DIR=/var/lib/intake

RUN useradd --system --home /var/lib/intake --create-home intake
WORKDIR /app
COPY pyproject.toml README.md babel.cfg ./
COPY config ./config
COPY intake ./intake
COPY workers ./workers
RUN pip install "babel>=2.14" && pybabel compile -d intake/translations && pip install .

USER intake
EXPOSE 8000
CMD ["gunicorn", "--bind", "0.0.0.0:8000", "--workers", "4", "--access-logfile", "-", "--access-logformat", "%(t)s \"%(m)s %(U)s\" %(s)s %(b)s %(L)s", "intake:create_app()"]
