"""Transcript normalization and per-dialect character sets."""

from __future__ import annotations

import re
import unicodedata

ENGLISH_CHARSET = frozenset("abcdefghijklmnopqrstuvwxyz' ")

# Punctuation that carries no phonetic content; stripped before the charset check so that
# contributors can write natural sentences.
_STRIP = re.compile(r"[.,!?;:\"()\[\]{}\u2014\u2013-]+")
_SPACES = re.compile(r"\s+")


def normalize_transcript(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).lower()
    text = text.replace("\u2019", "'").replace("\u2018", "'")
    text = _STRIP.sub(" ", text)
    return _SPACES.sub(" ", text).strip()


def charset_for(dialect: str, override: str | None = None) -> frozenset[str]:
    """The characters a dialect's transcripts may use after normalization."""
    if override:
        return frozenset(override) | {" "}
    # Every demo dialect is English; other languages pass their charset in config.
    return ENGLISH_CHARSET


def language_for(dialect: str) -> str:
    """The language of a dialect: its key's first subtag (``en-us`` → ``en``, ``yue-hk`` → ``yue``).
    A seq2seq base model (Whisper) is told it as its language token."""
    return dialect.split("-", 1)[0]


def characters_outside(text: str, charset: frozenset[str]) -> list[str]:
    return sorted({c for c in text if c not in charset})
