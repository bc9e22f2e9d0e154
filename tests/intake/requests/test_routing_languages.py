"""The routing file's languages: what the sample says, and start-up refusing a broken one.

A mistake in a language rule must stop the web app (and workers, see
tests/workers/test_pipeline.py) with a message naming the file and line, before any patient
is misrouted.
"""

from __future__ import annotations

import re

import pytest

from intake import create_app
from intake.requests.routing import RoutingError, load_routing
from tests.workers.conftest import SAMPLE_ROUTING

SAMPLE = SAMPLE_ROUTING.read_text()


def line_of(text: str, needle: str, header: str) -> int:
    """The line of the ``[[header]]`` table that holds ``needle``."""
    lines = text.splitlines()
    at = next(n for n, line in enumerate(lines) if needle in line)
    return next(n for n in range(at, -1, -1) if lines[n].strip() == f"[[{header}]]") + 1


def test_the_sample_file_serves_spanish_and_offers_interpreters():
    table = load_routing(SAMPLE_ROUTING)
    assert {t for t, team in table.teams.items() if team.serves("es")} == {"clinical", "bilingual"}
    assert all(team.serves("en") for team in table.teams.values())
    assert list(table.languages)[:3] == ["es", "zh", "vi"]
    assert table.languages["vi"].own_name == "Tiếng Việt"
    assert table.language_name("vi") == "Vietnamese"
    assert table.language_name("vi", "es") == "vietnamita"
    specialist = next(r for r in table.rules if r.team == "ivig")
    assert specialist.fallback_team == "clinical"
    assert {r.language_fallback for r in table.rules} == {"assign", "team:clinical"}


def test_a_file_without_languages_still_offers_spanish_and_reads_spanish_true(tmp_path):
    old = re.sub(r"(?ms)^\[\[languages\]\].*?(?=^\[\[locations\]\])", "", SAMPLE)
    old = old.replace('languages = ["en", "es"]', "spanish = true")
    assert "\n[[languages]]" not in old and "spanish = true" in old
    path = tmp_path / "routing.toml"
    path.write_text(old)

    table = load_routing(path)

    assert list(table.languages) == ["es"]
    assert table.teams["bilingual"].serves("es") and not table.teams["ivig"].serves("es")


BROKEN = [
    pytest.param(
        lambda t: t.replace(
            'language_fallback = "team:clinical"', 'language_fallback = "team:nobody"'
        ),
        "IVIG specialist requests",
        "rules",
        "rule 'IVIG specialist requests' falls back to unknown team 'nobody' for language needs",
        id="fallback-to-unknown-team",
    ),
    pytest.param(
        lambda t: t.replace(
            'language_fallback = "team:clinical"', 'language_fallback = "team:ivig"'
        ),
        "IVIG specialist requests",
        "rules",
        "rule 'IVIG specialist requests' falls back to its own team 'ivig'",
        id="fallback-to-itself",
    ),
    pytest.param(
        lambda t: t.replace(
            'language_fallback = "team:clinical"', 'language_fallback = "team:benefits"'
        ),
        "IVIG specialist requests",
        "rules",
        "falls back to team 'benefits' for language needs, but that team serves no language "
        "besides English",
        id="fallback-to-english-only-team",
    ),
    pytest.param(
        lambda t: t.replace('language_fallback = "assign"', 'language_fallback = "someone"'),
        "copay assistance and insurance",
        "rules",
        "rule 'copay assistance and insurance' has language_fallback 'someone'",
        id="fallback-unknown-value",
    ),
    pytest.param(
        lambda t: t.replace(
            'name = "Spanish-speaking patients\' refills and questions"\nlanguage = "es"\n'
            'team = "bilingual"',
            'name = "Spanish-speaking patients\' refills and questions"\nlanguage = "es"\n'
            'team = "refills-main"',
        ),
        "Spanish-speaking patients",
        "rules",
        "rule \"Spanish-speaking patients' refills and questions\" sends requests needing 'es' "
        "to team 'refills-main', which does not serve 'es'",
        id="language-rule-to-a-team-that-does-not-serve-it",
    ),
    pytest.param(
        lambda t: t.replace(
            'name = "Spanish-speaking patients\' refills and questions"\nlanguage = "es"',
            'name = "Spanish-speaking patients\' refills and questions"\nlanguage = "pt"',
        ),
        "Spanish-speaking patients",
        "rules",
        "has unknown language 'pt'",
        id="rule-on-an-unlisted-language",
    ),
    pytest.param(
        lambda t: t.replace(
            'name = "Bilingual patient services"\nlanguages = ["en", "es"]',
            'name = "Bilingual patient services"\nlanguages = ["en", "es", "pt"]',
        ),
        'id = "bilingual"',
        "teams",
        "team 'bilingual' serves unknown language 'pt' (list it under [[languages]] first)",
        id="team-serves-an-unlisted-language",
    ),
    pytest.param(
        lambda t: t.replace('code = "vi"', 'code = "zh"'),
        'name = "Tiếng Việt"',
        "languages",
        "language 'zh' is listed twice",
        id="language-listed-twice",
    ),
    pytest.param(
        lambda t: t.replace('name_es = "vietnamita"\n', ""),
        'code = "vi"',
        "languages",
        "language 'vi' needs 'name' (its own name), 'name_en' and 'name_es'",
        id="language-without-its-names",
    ),
    pytest.param(
        lambda t: t.replace('code = "vi"', 'code = "Vietnamese"'),
        'name = "Tiếng Việt"',
        "languages",
        "a language needs a 'code' of 2 or 3 lower-case letters",
        id="language-code-not-iso",
    ),
    pytest.param(
        lambda t: t.replace('code = "vi"', 'code = "en"'),
        'name = "Tiếng Việt"',
        "languages",
        "English is always served; do not list it",
        id="english-listed",
    ),
    pytest.param(
        lambda t: t.replace(
            'name = "Clinical pharmacists"\nlanguages = ["en", "es"]',
            'name = "Clinical pharmacists"\nlanguages = ["en"]\nspanish = true',
        ),
        'id = "clinical"',
        "teams",
        "team 'clinical': 'spanish' disagrees with 'languages'",
        id="spanish-flag-contradicts-languages",
    ),
]


@pytest.mark.parametrize(("mutation", "anchor", "header", "expected"), BROKEN)
def test_start_up_refuses_a_broken_language_rule_naming_its_line(
    tmp_path, base_settings, mutation, anchor, header, expected
):
    text = mutation(SAMPLE)
    assert text != SAMPLE, "the mutation must change the sample file"
    path = tmp_path / "routing.toml"
    path.write_text(text)
    load_routing.cache_clear()

    with pytest.raises(RoutingError) as refused:
        create_app(base_settings.replace(routing_file=path, data_dir=tmp_path / "data"))

    line = line_of(text, anchor, header)
    assert str(refused.value).startswith(f"{path}:{line}: "), str(refused.value)
    assert expected in str(refused.value)
