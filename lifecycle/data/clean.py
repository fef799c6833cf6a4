"""Text cleaning: Unicode form, control characters, whitespace, HTML leftovers and boilerplate lines."""
from __future__ import annotations

import html
import re
import unicodedata
from dataclasses import replace

from lifecycle.data.document import Document, Drop
from lifecycle.errors import ConfigError

# C0/C1 controls except \t and \n (\r is handled with newlines first), plus zero-width space, word joiner and BOM.
# ZWJ/ZWNJ (U+200C/D) stay: they carry meaning in emoji sequences, Persian and Indic scripts.
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\u2060\ufeff]")
NEWLINES = re.compile(r"\r\n?")
TRAILING_SPACE = re.compile(r"[ \t\f\v\u00a0\u3000]+$", re.MULTILINE)
HAS_TRAILING_SPACE = re.compile(r"[ \t\f\v\u00a0\u3000]\n")  # a 5x cheaper test; most files have none
EXTRA_BLANK_LINES = re.compile(r"\n{4,}")  # 3+ blank lines; 2 are kept
# Inside a line, any run of blanks other than one plain space (two spaces, a tab, a no-break space).
INNER_SPACE_RUN = re.compile(r"(?<=\S)(?: [ \t\u00a0\u2000-\u200a\u3000]+|[\t\u00a0\u2000-\u200a\u3000]"
                             r"[ \t\u00a0\u2000-\u200a\u3000]*)(?=\S)")
# Only names of real HTML tags, so "List<String>" or "a <b> c" in prose survive; script/style go with their body.
HTML_BLOCK = re.compile(r"<(script|style)\b[^>]*>.*?</\1\s*>|<!--.*?-->", re.IGNORECASE | re.DOTALL)
HTML_BREAK = re.compile(r"<(?:br|hr)\s*/?>|</(?:p|div|li|tr|h[1-6]|ul|ol|table|section|article|blockquote)\s*>",
                        re.IGNORECASE)
HTML_TAG = re.compile(
    r"</?(?:a|abbr|article|aside|b|blockquote|body|br|center|code|dd|div|dl|dt|em|figcaption|figure|font|footer|"
    r"form|h[1-6]|head|header|hr|html|i|iframe|img|input|label|li|link|main|meta|nav|ol|p|pre|section|small|span|"
    r"strong|sub|sup|table|tbody|td|tfoot|th|thead|title|tr|u|ul)\b(?:\s[^<>]*)?/?>",
    re.IGNORECASE)
HTML_ENTITY = re.compile(r"&(?:#\d{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});")


class Normalize:
    """Clean a document's text in place of meaning; drops only what becomes empty."""

    name = "clean"

    def __init__(self, *, kinds: list[str] | None, unicode_form: str | None, strip_control_chars: bool,
                 fix_whitespace: bool, html_leftovers: bool, boilerplate: dict[str, list[str]]) -> None:
        if unicode_form not in (None, "NFC", "NFKC"):
            raise ConfigError(f"unicode_form={unicode_form!r}: use NFC, NFKC or null")
        self.kinds = None if kinds is None else list(kinds)
        self.unicode_form = unicode_form
        self.strip_control_chars = strip_control_chars
        self.fix_whitespace = fix_whitespace
        self.html_leftovers = html_leftovers
        self.boilerplate = {kind: list(patterns) for kind, patterns in boilerplate.items()}
        self._boilerplate = {kind: _line_regex(patterns) for kind, patterns in self.boilerplate.items() if patterns}

    def __call__(self, doc: Document) -> Document | Drop:
        if self.kinds is not None and doc.kind not in self.kinds:
            return doc
        text = self.clean(doc.text, doc.kind)
        if not text.strip():
            return Drop("empty_after_cleaning")
        return doc if text == doc.text else replace(doc, text=text)

    def clean(self, text: str, kind: str) -> str:
        """The cleaned text for a document of this kind."""
        if self.unicode_form and not unicodedata.is_normalized(self.unicode_form, text):
            text = unicodedata.normalize(self.unicode_form, text)
        if self.fix_whitespace and "\r" in text:
            text = NEWLINES.sub("\n", text)
        if self.html_leftovers and kind != "code":
            text = _strip_html(text)
        if self.strip_control_chars:  # after HTML, since "&#27;" unescapes to a control character
            text = CONTROL.sub("", text)
        if kind in self._boilerplate:
            text = self._boilerplate[kind].sub("", text)
        if self.fix_whitespace:
            text = _fix_whitespace(text, keep_inner=kind == "code")
        return text


def _line_regex(patterns: list[str]) -> re.Pattern:
    """One regex removing every whole line (and its newline) that matches any pattern, ignoring case."""
    alternatives = "|".join(f"(?:{p})" for p in patterns)
    return re.compile(rf"^[ \t]*(?:{alternatives})[ \t]*(?:\n|\Z)", re.MULTILINE | re.IGNORECASE)


def _strip_html(text: str) -> str:
    """Drop tags before unescaping, so escaped markup such as "&lt;div&gt;" stays as text."""
    if "<" in text:
        text = HTML_BLOCK.sub("", text)
        text = HTML_BREAK.sub("\n", text)
        text = HTML_TAG.sub("", text)
    if "&" in text and HTML_ENTITY.search(text):
        text = html.unescape(text)
    return text


def _fix_whitespace(text: str, keep_inner: bool) -> str:
    """Trailing spaces off, at most two blank lines in a row; prose also loses runs of spaces inside lines."""
    if HAS_TRAILING_SPACE.search(text):
        text = TRAILING_SPACE.sub("", text)
    if not keep_inner:
        text = INNER_SPACE_RUN.sub(" ", text)
    text = EXTRA_BLANK_LINES.sub("\n\n\n", text).lstrip("\n")
    ends_with_newline = text.endswith("\n")
    text = text.rstrip()
    return text + "\n" if ends_with_newline and text else text
