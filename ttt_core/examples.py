"""Curated example prompts shipped in assets/examples (the sidebar's example picker)."""

from __future__ import annotations

from pathlib import Path

# An installed wheel carries them as package data `ttt_core._examples` (pyproject.toml maps
# assets/examples there); a clone, or an editable install, reads assets/examples itself.
_PACKAGED_DIR = Path(__file__).resolve().parent / "_examples"
_REPO_DIR = Path(__file__).resolve().parent.parent / "assets" / "examples"
EXAMPLES_DIR = _PACKAGED_DIR if _PACKAGED_DIR.is_dir() else _REPO_DIR

# title → file name, in the order of the guided tour (when → how far → which)
EXAMPLES: dict[str, str] = {
    "Digit shift, clean labels": "digit_shift_clean.txt",
    "Digit shift, noisy labels (p = 0.55)": "digit_shift_noisy.txt",
    "Needle in a haystack, short": "needle_short.txt",
    "Needle in a haystack, long": "needle_long.txt",
    "Key–value recall": "kv_recall.txt",
    "Sentiment words (few-shot)": "sentiment_words.txt",
    "Free text (no question)": "free_text.txt",
}
DEFAULT_EXAMPLE = "Digit shift, clean labels"


def load_example(title: str) -> str:
    """Text of the curated example `title` (KeyError with the known titles otherwise)."""
    if title not in EXAMPLES:
        raise KeyError(f"unknown example {title!r}; known: {list(EXAMPLES)}")
    return (EXAMPLES_DIR / EXAMPLES[title]).read_text()
