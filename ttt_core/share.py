"""Links that reopen a view: encode a view (model, prompt, page settings) as URL query parameters
and decode it again, with every value checked. Pure Python, no Streamlit (the dashboard's
pages/links.py connects this to st.query_params and st.session_state).

Query parameters of a view:

    model=<name>        a preset model name or a Hugging Face hub id (never a local folder)
    ex=<title>          a curated example, by title                      } one of the two,
    p=1.<data>          the prompt text: zlib, then URL-safe base64      } or neither (default)
    tok=<n>             the token limit, when not the default
    <widget key>=<v>    one page setting in the form Streamlit's bind="query-params" reads
                        (the option's label for a select box, 'true'/'false', a number …)

A prompt travels in the link while it has at most MAX_PROMPT_CHARS characters and its encoded
value at most MAX_ENCODED_CHARS; a longer one is refused (`PromptTooLong`), with a message that
points to the file download. Decoding refuses anything else with a `ShareError` whose message says
what was wrong: unknown version, bad base64, bad zlib data, output over the limit (a zip bomb is cut
off after MAX_PROMPT_CHARS * 4 bytes, never inflated in full), not UTF-8.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import zlib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence
from urllib.parse import urlencode

PROMPT_VERSION = "1"
MAX_PROMPT_CHARS = 8000     # "a few thousand characters"
MAX_ENCODED_CHARS = 6000    # keeps a whole link under ~8 KB, which browsers and proxies accept
MAX_VALUE_CHARS = 200       # any other parameter
MAX_MODEL_CHARS = 200
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")

ParamValue = str | list[str]


class ShareError(ValueError):
    """A link value that cannot be read (the message says why, in words for the user)."""


class PromptTooLong(ShareError):
    """A prompt too long to travel in a link."""


# ------------------------------------------------------------------------------------------ prompt


def too_long_message(n_chars: int, encoded_chars: int | None = None) -> str:
    size = f"{n_chars:,} characters" + (f", {encoded_chars:,} once compressed" if encoded_chars else "")
    return (f"This prompt is too long for a link ({size}; a link carries prompts up to {MAX_PROMPT_CHARS:,} "
            f"characters and {MAX_ENCODED_CHARS:,} once compressed). Use the file download instead: download "
            "the prompt and load it in the other browser.")


def encode_prompt(text: str) -> str:
    """`1.<urlsafe base64 of zlib(text)>` (no padding). Raises PromptTooLong past the limits."""
    if len(text) > MAX_PROMPT_CHARS:
        raise PromptTooLong(too_long_message(len(text)))
    data = base64.urlsafe_b64encode(zlib.compress(text.encode("utf-8"), 9)).decode("ascii").rstrip("=")
    value = f"{PROMPT_VERSION}.{data}"
    if len(value) > MAX_ENCODED_CHARS:
        raise PromptTooLong(too_long_message(len(text), len(value)))
    return value


def decode_prompt(value: str) -> str:
    """The prompt text of an `encode_prompt` value; ShareError (with the reason) otherwise."""
    if not isinstance(value, str) or not value:
        raise ShareError("the link's prompt is empty")
    if len(value) > MAX_ENCODED_CHARS + 2:
        raise ShareError(f"the link's prompt is {len(value):,} characters long; links carry at most "
                         f"{MAX_ENCODED_CHARS:,}")
    version, sep, data = value.partition(".")
    if not sep:
        raise ShareError("the link's prompt has no version prefix (expected '1.<data>')")
    if version != PROMPT_VERSION:
        raise ShareError(f"the link's prompt uses format version {version[:10]!r}; this version of TTT Lens "
                         f"reads version {PROMPT_VERSION}")
    if not re.fullmatch(r"[A-Za-z0-9_-]*", data):
        raise ShareError("the link's prompt is not URL-safe base64 (was the link cut or edited?)")
    try:
        raw = base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ShareError("the link's prompt is not valid base64 (was the link cut?)") from exc
    limit = MAX_PROMPT_CHARS * 4  # UTF-8 needs at most 4 bytes a character
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(raw, limit + 1)
    except zlib.error as exc:
        raise ShareError("the link's prompt is not valid compressed data (was the link cut or edited?)") from exc
    if len(out) > limit or inflater.unconsumed_tail:
        raise ShareError(f"the link's prompt unpacks to more than {MAX_PROMPT_CHARS:,} characters; refused")
    if not inflater.eof:
        raise ShareError("the link's prompt is incomplete (the link was cut)")
    try:
        text = out.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ShareError("the link's prompt is not UTF-8 text") from exc
    if len(text) > MAX_PROMPT_CHARS:
        raise ShareError(f"the link's prompt has {len(text):,} characters; links carry at most {MAX_PROMPT_CHARS:,}")
    return text


# ------------------------------------------------------------------------------------------ models


def check_model(name: str, presets: Iterable[str]) -> str:
    """`name` if a link may choose it: a preset, or a hub id `owner/name`. A local folder never
    travels (it would let a link probe the server's disk); ShareError otherwise."""
    name = name.strip() if isinstance(name, str) else ""
    if not name:
        raise ShareError("the link names no model")
    if len(name) > MAX_MODEL_CHARS:
        raise ShareError(f"the link's model name is longer than {MAX_MODEL_CHARS} characters")
    if name in set(presets):
        return name
    if _HUB_ID.fullmatch(name) and ".." not in name:
        return name
    raise ShareError(f"the link's model {name[:60]!r} is neither a preset nor a hub id 'owner/name' "
                     "(local folders do not travel in links)")


# ------------------------------------------------------------------------------------------ fields


def format_number(v: float | int) -> str:
    """A number as Streamlit writes it into a bound query parameter: 5.0 → '5', 0.25 → '0.25'
    (repr, so the value round-trips exactly)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    v = float(v)
    if math.isfinite(v) and v == int(v):
        return str(int(v))
    return repr(v)


@dataclass(frozen=True)
class Field:
    """One page setting: how its value is written into the link and how a link's value is checked.
    kind: 'int' | 'float' | 'bool' | 'choice' | 'label' | 'labels' (a list of labels)."""

    kind: str
    lo: float | None = None
    hi: float | None = None
    choices: Mapping[object, str] | None = None  # value → label written in the URL
    pattern: str | None = None                 # for labels whose options are only known at run time

    def to_url(self, value: object) -> ParamValue | None:
        """The URL form of a session value (None: nothing to write)."""
        if value is None:
            return None
        if self.kind in ("int", "float", "bool"):
            return format_number(value)  # type: ignore[arg-type]
        if self.kind == "choice":
            assert self.choices is not None
            return self.choices.get(value, str(value))
        if self.kind == "labels":
            return [str(v) for v in value]  # type: ignore[union-attr]
        return str(value)

    def check(self, value: ParamValue) -> str | None:
        """None when `value` is a valid URL value, else what is wrong (for the message)."""
        values = value if isinstance(value, list) else [value]
        if self.kind != "labels" and len(values) != 1:
            return "given more than once"
        if len(values) > 256:
            return "too many values"
        for v in values:
            if len(v) > MAX_VALUE_CHARS:
                return f"longer than {MAX_VALUE_CHARS} characters"
            problem = self._check_one(v)
            if problem:
                return problem
        return None

    def _check_one(self, v: str) -> str | None:
        rng = f" from {format_number(self.lo)} to {format_number(self.hi)}" if self.lo is not None else ""
        if self.kind == "int":
            if not re.fullmatch(r"-?\d{1,9}", v) or (self.lo is not None and not self.lo <= int(v) <= self.hi):
                return f"expected a whole number{rng}"
        elif self.kind == "float":
            try:
                x = float(v)
            except ValueError:
                return f"expected a number{rng}"
            if not math.isfinite(x) or (self.lo is not None and not self.lo <= x <= self.hi):
                return f"expected a number{rng}"
        elif self.kind == "bool":
            if v.lower() not in ("true", "false"):
                return "expected true or false"
        elif self.kind == "choice":
            assert self.choices is not None
            if v not in self.choices.values():
                shown = ", ".join(repr(c) for c in list(self.choices.values())[:8])
                return f"expected one of {shown}"
        elif self.kind in ("label", "labels"):
            if self.pattern is not None and not re.fullmatch(self.pattern, v):
                return "not a block label of this app"
        return None


def int_field(lo: int, hi: int) -> Field:
    return Field("int", lo, hi)


def float_field(lo: float, hi: float) -> Field:
    return Field("float", lo, hi)


def choice_field(choices: Mapping[object, str] | Sequence[str], fmt: Callable[[object], str] | None = None) -> Field:
    """A select box / radio / select slider: values and the labels the widget shows (its format_func)."""
    if isinstance(choices, Mapping):
        return Field("choice", choices=dict(choices))
    fmt = fmt or str
    return Field("choice", choices={c: fmt(c) for c in choices})


BOOL = Field("bool")
BLOCK_LABEL = r"Full kernel|L\d{1,4}(\.[a-z]{1,2}H\d{1,5}|[ .]mlp_(up|down))"


# ------------------------------------------------------------------------------------------ a view


@dataclass
class View:
    """What a link reopens. example and prompt are exclusive (None, None: the default example)."""

    model: str | None = None
    example: str | None = None
    prompt: str | None = None
    max_tokens: int | None = None
    settings: dict[str, ParamValue] = field(default_factory=dict)  # widget key → URL value


def view_params(view: View) -> dict[str, ParamValue]:
    """The query parameters of `view` (model, then the prompt, then the settings). Raises
    PromptTooLong when the prompt cannot travel."""
    out: dict[str, ParamValue] = {}
    if view.model:
        out["model"] = view.model
    if view.example is not None:
        out["ex"] = view.example
    elif view.prompt is not None:
        out["p"] = encode_prompt(view.prompt)
    if view.max_tokens is not None:
        out["tok"] = str(int(view.max_tokens))
    for key, value in view.settings.items():
        if key not in out:
            out[key] = value
    return out


def read_view(params: Mapping[str, ParamValue], *, examples: Iterable[str], presets: Iterable[str],
              fields: Mapping[str, Field], token_range: tuple[int, int] = (64, 32768)) -> tuple[View, list[str]]:
    """Decode query parameters into a View; every value that cannot be used is left out (the default
    stays) and reported in the returned list of messages. Unknown parameters are ignored."""
    view, problems = View(), []

    def one(key: str) -> str | None:
        v = params.get(key)
        if v is None:
            return None
        return v[-1] if isinstance(v, list) else v

    model = one("model")
    if model is not None:
        try:
            view.model = check_model(model, presets)
        except ShareError as exc:
            problems.append(f"{exc}; using the default model.")
    ex, p = one("ex"), one("p")
    if ex is not None:
        if ex in set(examples):
            view.example = ex
        else:
            problems.append(f"the link's example {ex[:60]!r} is not one of the curated examples; showing the "
                            "default example.")
    elif p is not None:
        try:
            view.prompt = decode_prompt(p)
        except ShareError as exc:
            problems.append(f"{exc}; showing the default example.")
    tok = one("tok")
    if tok is not None:
        lo, hi = token_range
        if re.fullmatch(r"\d{1,6}", tok) and lo <= int(tok) <= hi:
            view.max_tokens = int(tok)
        else:
            problems.append(f"the link's token limit {tok[:20]!r} is not a whole number from {lo} to {hi}; "
                            "using the default.")
    for key, f in fields.items():
        if key not in params:
            continue
        problem = f.check(params[key])
        if problem:
            shown = params[key] if isinstance(params[key], str) else ",".join(params[key])
            problems.append(f"the link's setting {key}={shown[:40]!r} is ignored ({problem}).")
        else:
            view.settings[key] = params[key]
    return view, problems


def make_link(base_url: str, params: Mapping[str, ParamValue]) -> str:
    """`base_url?query` (repeated keys for list values)."""
    query = urlencode(params, doseq=True)
    return f"{base_url}?{query}" if query else base_url
