"""Versioned consent texts: exactly what a patient accepted, provable by digest."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from importlib import resources

# The version each form presents now. Publishing a new text means adding a new file and
# bumping the version here; old files stay so accepted texts can always be shown again.
CURRENT = {"privacy": "2026-11", "contact": "2026-11"}


@dataclass(frozen=True)
class ConsentText:
    document: str
    version: str
    language: str
    body: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.body.encode()).hexdigest()

    @property
    def paragraphs(self) -> list[str]:
        return [p.strip() for p in self.body.split("\n\n") if p.strip()]


@cache
def consent_text(document: str, version: str, language: str) -> ConsentText:
    name = f"{document}-{version}.{language}.txt"
    body = resources.files("intake").joinpath("consents", name).read_text(encoding="utf-8")
    return ConsentText(document, version, language, body)


def current_consent(document: str, language: str) -> ConsentText:
    return consent_text(document, CURRENT[document], language)
