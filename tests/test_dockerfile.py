"""The Dockerfile: the image can run `intake backup` against docker-compose.yml's PostgreSQL.

Docker does not run here, so the Dockerfile is read as text: the PostgreSQL client it installs
must be the compose server's major version (pg_dump refuses a newer server), from a source apt
authenticates, and the layer must not keep apt's lists.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

ROOT = Path(__file__).parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def run_instructions() -> list[str]:
    """Each RUN instruction of the Dockerfile, its continuation lines joined, comments left out."""
    instructions: list[str] = []
    current: list[str] | None = None
    for line in DOCKERFILE.splitlines():
        stripped = line.strip()
        if current is None:
            if not stripped.startswith("RUN "):
                continue
            current = []
            stripped = stripped.removeprefix("RUN ")
        elif stripped.startswith("#"):
            continue
        current.append(stripped.removesuffix("\\").strip())
        if not stripped.endswith("\\"):
            instructions.append(" ".join(current))
            current = None
    return instructions


def arg_default(name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", DOCKERFILE, re.M)
    assert match, f"the Dockerfile has no ARG {name}=..."
    return match.group(1)


def compose_postgres_major() -> int:
    image = COMPOSE["services"]["postgres"]["image"]
    match = re.fullmatch(r"postgres:(\d+)(?:\.\d+)*(?:-\w+)?(?:@sha256:[0-9a-f]{64})?", image)
    assert match, f"docker-compose.yml's postgres image {image!r} names no major version"
    return int(match.group(1))


def client_install() -> str:
    [install] = [run for run in run_instructions() if "postgresql-client-" in run]
    return install


def test_the_image_has_the_postgresql_client_of_the_compose_server() -> None:
    """pg_dump older than the server refuses to dump it: the majors must never drift apart."""
    assert int(arg_default("PG_MAJOR")) == compose_postgres_major()
    install = client_install()
    assert '"postgresql-client-${PG_MAJOR}"' in install
    # The build itself fails if the client that came is another major.
    assert 'pg_dump --version | grep -q "^pg_dump (PostgreSQL) ${PG_MAJOR}\\."' in install
    assert "pg_restore --version" in install


def test_the_client_comes_from_a_source_apt_authenticates() -> None:
    """The PGDG repository, signed-by the key Debian ships, for the base image's release."""
    base = re.search(r"^FROM python:[\w.]+-slim-(\w+)@sha256:[0-9a-f]{64}$", DOCKERFILE, re.M)
    assert base, "the base image is a pinned python slim image of a named Debian release"
    install = client_install()
    assert f"'Suites: {base.group(1)}-pgdg'" in install
    assert "'URIs: https://apt.postgresql.org/pub/repos/apt'" in install
    assert "'Signed-By: /etc/apt/keyrings/pgdg.asc'" in install
    # The key is Debian's copy (postgresql-common), not downloaded while building.
    assert "cp /usr/share/postgresql-common/pgdg/apt.postgresql.org.asc" in install
    for fetch in ("curl", "wget", "http://"):
        assert fetch not in install, fetch
    for unsafe in ("apt-key", "trusted=yes", "allow-insecure", "allow-unauthenticated"):
        assert unsafe not in DOCKERFILE.lower(), unsafe


def test_apt_installs_only_what_it_names_and_keeps_no_lists() -> None:
    runs = [run for run in run_instructions() if "apt-get" in run]
    assert runs, "no apt-get in the Dockerfile"
    for run in runs:
        words = shlex.split(run)
        for index, word in enumerate(words):
            if word == "install" and words[index - 1] == "apt-get":
                assert "--no-install-recommends" in words[index:], run
        if "update" in words:
            # In the same layer as the update: otherwise the lists stay in the image.
            assert "rm -rf /var/lib/apt/lists/*" in run, run


def test_backups_have_a_folder_the_app_user_may_write() -> None:
    """A named volume mounted at /backups takes the image folder's owner: the intake user."""
    assert "install -d -o intake -g intake -m 0700 /backups" in DOCKERFILE
    assert re.search(r"^USER intake$", DOCKERFILE, re.M)
