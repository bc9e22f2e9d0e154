# Intake: one image for the web, worker, beat and migrate services of docker-compose.yml.
# The base image is pinned by digest (the tag alone moves). To move to a newer build, look up
# the digest with `docker buildx imagetools inspect python:3.11-slim-bookworm` and replace it
# here; see "Dependencies and the lock file" in docs/operations.md.
FROM python:3.11.15-slim-bookworm@sha256:d29f48a31a8b408ed19272ca1e7b10ebae13b240a27e862d3d4217c528e2e0c3

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    INTAKE_PROFILE=production INTAKE_DATA_DIR=/var/lib/intake

RUN useradd --system --home /var/lib/intake --create-home intake \
    && install -d -o intake -g intake -m 0700 /backups
# pg_dump and pg_restore, for `intake backup` (docs/backup.md). pg_dump must be the server's
# major version or newer: PG_MAJOR is docker-compose.yml's postgres major, and
# tests/test_dockerfile.py keeps the two equal. Bookworm ships only 15, so the client comes from
# the PostgreSQL project's apt repository (apt.postgresql.org, "PGDG"). Its signing key is the
# one Debian ships in postgresql-common (a Debian package apt checks against Debian's own keys),
# not one fetched over the network at build time; it is kept in /etc/apt/keyrings, the source is
# signed-by it alone, and postgresql-common goes again. The major is pinned; the minor is the
# repository's newest (PGDG keeps only that one), so a rebuild picks up its security fixes.
ARG PG_MAJOR=16
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates postgresql-common \
    && install -d -m 0755 /etc/apt/keyrings \
    && cp /usr/share/postgresql-common/pgdg/apt.postgresql.org.asc /etc/apt/keyrings/pgdg.asc \
    && apt-get purge -y --auto-remove postgresql-common \
    && printf '%s\n' 'Types: deb' 'URIs: https://apt.postgresql.org/pub/repos/apt' \
        'Suites: bookworm-pgdg' 'Components: main' 'Signed-By: /etc/apt/keyrings/pgdg.asc' \
        > /etc/apt/sources.list.d/pgdg.sources \
    && apt-get update \
    && apt-get install -y --no-install-recommends "postgresql-client-${PG_MAJOR}" \
    && rm -rf /var/lib/apt/lists/* \
    && pg_dump --version | grep -q "^pg_dump (PostgreSQL) ${PG_MAJOR}\." \
    && pg_restore --version | grep -q "^pg_restore (PostgreSQL) ${PG_MAJOR}\."
WORKDIR /app
# Every distribution comes from the hashed lock files (scripts/lock), as a wheel: pip refuses
# anything unpinned, unhashed or different from what was locked, and builds nothing from source.
COPY requirements/build.txt requirements/production.txt requirements/
RUN pip install --require-hashes --only-binary :all: --no-deps -r requirements/build.txt \
    && pip install --require-hashes --only-binary :all: --no-deps -r requirements/production.txt
COPY pyproject.toml README.md babel.cfg ./
COPY config ./config
COPY intake ./intake
COPY workers ./workers
# Intake itself: no dependencies resolved, no build tools fetched (the locked setuptools builds it).
RUN pybabel compile -d intake/translations \
    && pip install --no-deps --no-build-isolation . \
    && pip check

USER intake
EXPOSE 8000
CMD ["gunicorn", "--bind", "0.0.0.0:8000", "--workers", "4", "--access-logfile", "-", "--access-logformat", "%(t)s \"%(m)s %(U)s\" %(s)s %(b)s %(L)s", "intake:create_app()"]
