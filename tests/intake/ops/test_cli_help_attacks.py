"""Attacks on ``intake --help``: help must read and write nothing of a real installation.

Listing the commands builds the app. Help asked for is built from a throwaway embedded
installation (intake/cli.py); these tests hold that it is only help that gets one: a real
command whose *value* reads ``--help`` runs against the real installation, and help in the
production profile or beside a real data folder neither fails nor touches its keys.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.intake.ops.test_serve import _intake_in


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INTAKE_")}
    return env | {"INTAKE_LOG_LEVEL": "WARNING", **extra}


def _files(folder: Path) -> dict[str, tuple[bytes, int, int]]:
    """Every file under ``folder``: its bytes, mtime and mode, to compare before and after."""
    return {
        str(path.relative_to(folder)): (
            path.read_bytes(),
            path.stat().st_mtime_ns,
            path.stat().st_mode,
        )
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.mark.parametrize("args", [("--help",), ("users", "create", "--help"), ("run", "--help")])
def test_help_in_the_production_profile_without_its_secrets_lists_the_commands(
    tmp_path: Path, args: tuple[str, ...]
) -> None:
    """An operator asks what the commands are before the env file exists: help, no traceback."""
    done = _intake_in(tmp_path, _clean_env(INTAKE_PROFILE="production"), *args)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "SettingsError" not in done.stderr
    assert f"Usage: intake {' '.join(args[:-1])}".rstrip() in done.stdout
    if args == ("--help",):
        assert all(f"  {name} " in done.stdout for name in ("backup", "users", "audit", "serve"))
    if args[0] == "users":
        assert "--role" in done.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def installation(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A real embedded installation whose database is not in its data folder."""
    data = tmp_path / "data"
    env = _clean_env(
        INTAKE_DATA_DIR=str(data), INTAKE_DATABASE_URL=f"sqlite:///{tmp_path / 'real.sqlite3'}"
    )
    upgraded = _intake_in(tmp_path, env, "db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    assert (data / "keyring.json").is_file() and (data / "secret_key").is_file()
    return tmp_path, env


@pytest.mark.parametrize(
    "args", [("--help",), ("users", "create", "--help"), ("audit", "checkpoint", "--help")]
)
def test_help_beside_a_real_installation_touches_none_of_its_files(
    installation: tuple[Path, dict[str, str]], args: tuple[str, ...]
) -> None:
    root, env = installation
    before = _files(root)
    done = _intake_in(root, env, *args)
    assert done.returncode == 0, done.stderr
    assert "Usage: intake" in done.stdout
    assert _files(root) == before  # keys, database and anchor: same bytes, same mtimes


def test_help_as_an_option_value_runs_the_command_on_the_real_installation(
    installation: tuple[Path, dict[str, str]],
) -> None:
    """``--display-name --help`` is a name, not a help request: its audit goes to the real anchor.

    Taken for help, the command ran for real against the real database with a throwaway data
    folder: its audit event was anchored in a temporary file that was then deleted, so the
    installation's own anchor no longer covered its trail (and sealed data would have used a
    throwaway keyring).
    """
    root, env = installation
    anchor = Path(env["INTAKE_DATA_DIR"]) / "audit-anchor.log"
    before = anchor.read_bytes() if anchor.exists() else b""
    done = _intake_in(root, env, "teams", "create", "infusion", "--display-name", "--help")
    assert done.returncode == 0, done.stderr
    assert "Created team 'infusion'" in done.stdout
    assert "intake-help-" not in done.stderr  # no throwaway folder was involved
    assert len(anchor.read_bytes().splitlines()) > len(before.splitlines())
    # The signer signs only a chain its anchor agrees with; verify then passes.
    signed = _intake_in(root, env, "audit", "checkpoint")
    assert "Signed checkpoint" in signed.stdout, signed.stdout + signed.stderr
    verified = _intake_in(root, env, "audit", "verify", "--json")
    assert json.loads(verified.stdout)["ok"] is True, verified.stdout


def test_a_help_after_double_dash_is_an_argument(
    installation: tuple[Path, dict[str, str]],
) -> None:
    """``intake teams create -- --help`` asks for a team named ``--help``: refused on its name."""
    root, env = installation
    done = _intake_in(root, env, "teams", "create", "--", "--help")
    assert done.returncode != 0
    assert "team names are lower-case" in done.stderr
    assert "Usage: intake teams create" not in done.stdout
