"""Versioned consent texts from the operator's folder: exactly what a patient accepted, by digest.

Why: a pharmacy must be able to show which Terms of Use, Privacy Policy, Notice of Privacy
Practices and contact consent a patient accepted, word for word, years later. Each text is a
file ``<document>-<version>.<language>.txt`` in the consents folder (``config/consents/`` or
``INTAKE_CONSENTS_DIR``); ``consents.toml`` there names the version each form presents now. A
submission stores (document, version, language, SHA-256 of the text), so a published file must
never change: a new text is a new version. The folder is read and checked once at start-up; a
document missing in one of the page languages stops the process rather than leave a Spanish
speaker accepting an English text.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from flask import current_app

LANGUAGES = ("en", "es")
# What each form's checkboxes accept. ``consent_privacy`` covers the three documents every
# patient accepts; the refill form also asks for consent to be contacted.
FORM_CONSENTS: Mapping[str, Mapping[str, tuple[str, ...]]] = {
    "refill": {"consent_privacy": ("terms", "privacy", "npp"), "consent_contact": ("contact",)},
    "contact": {"consent_privacy": ("terms", "privacy", "npp")},
}
DOCUMENTS = ("terms", "privacy", "npp", "contact")
MANIFEST = "consents.toml"
FILE_RE = re.compile(
    r"^(?P<document>[a-z][a-z0-9_]*)-(?P<version>[0-9A-Za-z.-]+)\.(?P<lang>[a-z]{2})\.txt$"
)


class ConsentError(ValueError):
    """The consents folder cannot be used; the message names the file."""


@dataclass(frozen=True)
class ConsentText:
    document: str
    version: str
    language: str
    body: str
    sample: bool = False

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.body.encode()).hexdigest()

    @property
    def paragraphs(self) -> list[str]:
        return [p.strip() for p in self.body.split("\n\n") if p.strip()]

    @property
    def title(self) -> str:
        return self.paragraphs[0] if self.paragraphs else self.document


@dataclass(frozen=True)
class ConsentLibrary:
    folder: Path
    current: Mapping[str, str]
    texts: Mapping[tuple[str, str, str], ConsentText]

    def text(self, document: str, version: str, language: str) -> ConsentText:
        try:
            return self.texts[(document, version, language)]
        except KeyError:
            raise LookupError(f"no consent text {document}-{version}.{language}") from None

    def current_text(self, document: str, language: str) -> ConsentText:
        return self.text(document, self.current[document], language)

    def versions(self, document: str) -> list[str]:
        return sorted({v for d, v, _lang in self.texts if d == document}, reverse=True)

    @property
    def samples(self) -> list[str]:
        return sorted({t.document for t in self.texts.values() if t.sample})


def load_consents(folder: Path) -> ConsentLibrary:
    """Read and check every consent text in ``folder`` and its manifest."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    try:
        manifest = tomllib.loads(manifest_path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConsentError(
            f"{manifest_path}: cannot read the consents manifest ({error.strerror})"
        ) from None
    except tomllib.TOMLDecodeError as error:
        raise ConsentError(f"{manifest_path}: {error}") from None

    current: dict[str, str] = {}
    samples: set[str] = set()
    for document in DOCUMENTS:
        entry = manifest.get(document)
        if not isinstance(entry, dict) or not isinstance(entry.get("version"), str):
            raise ConsentError(
                f"{manifest_path}: [{document}] needs a 'version' (the forms ask patients to "
                "accept it)"
            )
        current[document] = entry["version"]
        if entry.get("sample"):
            samples.add(document)
    unknown = sorted(set(manifest) - set(DOCUMENTS))
    if unknown:
        raise ConsentError(f"{manifest_path}: unknown document [{unknown[0]}]")

    texts: dict[tuple[str, str, str], ConsentText] = {}
    for path in sorted(folder.glob("*.txt")):
        match = FILE_RE.match(path.name)
        if not match or match["document"] not in DOCUMENTS or match["lang"] not in LANGUAGES:
            raise ConsentError(
                f"{path}: not a consent text name (<document>-<version>.<en|es>.txt with a "
                f"document of {', '.join(DOCUMENTS)})"
            )
        body = path.read_text(encoding="utf-8")
        if not body.strip():
            raise ConsentError(f"{path}: the text is empty")
        key = (match["document"], match["version"], match["lang"])
        texts[key] = ConsentText(*key, body=body, sample=match["document"] in samples)

    for document, version, language in list(texts):
        for other in LANGUAGES:
            if (document, version, other) not in texts:
                raise ConsentError(
                    f"{folder / f'{document}-{version}.{other}.txt'}: missing; "
                    f"{document}-{version}.{language}.txt has no text in {other!r}, and every "
                    "document needs one in each language of the pages"
                )
    for document, version in current.items():
        if (document, version, "en") not in texts:
            raise ConsentError(
                f"{folder / f'{document}-{version}.en.txt'}: missing; {manifest_path} presents "
                f"{document} version {version!r}"
            )
    return ConsentLibrary(folder=folder, current=current, texts=texts)


def library() -> ConsentLibrary:
    library: ConsentLibrary = current_app.extensions["intake.consents"]
    return library


def consent_text(document: str, version: str, language: str) -> ConsentText:
    return library().text(document, version, language)


def current_consent(document: str, language: str) -> ConsentText:
    return library().current_text(document, language)


def form_consents(kind: str, language: str) -> dict[str, list[ConsentText]]:
    """The texts each checkbox of the ``kind`` form accepts, in ``language``."""
    return {
        field: [current_consent(document, language) for document in documents]
        for field, documents in FORM_CONSENTS[kind].items()
    }


def accepted_consents(kind: str, language: str) -> list[ConsentText]:
    """Every text a patient accepts by sending the ``kind`` form (all its boxes are required)."""
    return [text for texts in form_consents(kind, language).values() for text in texts]
