"""Finding ground-truth tokens in text: numbers, file:line references, commit hashes and names.

A reference is kept as `basename:line` and found in any of the forms tools print it:
`reader.py:88`, `.../reader.py:88:19`, `File ".../reader.py", line 88`, `reader.py line 88`, `reader.py#L88`.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

# A number starts a word or follows a version's "v" (v3.16.5 states 3.16.5); "p99", "kv3" and ".5" hold none.
# A minus sign is part of it where it starts a word ("-40", "(-5)"): -40 is not 40. After a letter or digit
# the hyphen joins ("3-5", "2024-01-15", "PROJ-12"), and "--5" is a flag. Scripts written without spaces
# (kana, CJK ideographs, Hangul, Thai) put numbers right after a word character ("1908年に", "約120万"):
# there a number starts all the same.
_JOINS = r"[^\W\u0e00-\u0e7f\u3000-\u9fff\uac00-\ud7af\uf900-\ufaff]"  # a word character no number or name may touch
_NUM = re.compile(rf"(?:(?<!{_JOINS}|[.-])-(?=\d)|(?<!{_JOINS}|\.)|(?<=(?<!{_JOINS}|\.)[vV]))\d+(?:[.,]\d+)*")
_DECIMAL = re.compile(r"-?\d+(?:\.\d+)?")  # at most one point: a version like 3.16.5 is never a quantity
# What marks a number as a quantity, whose trailing zeros say nothing (38.0ms is 38ms, $2.50 is $2.5): a unit
# right after it (one space allowed) or a currency sign before it. A bare "3.10" may be Python 3.10, not 3.1.
_UNIT_AFTER = re.compile(
    r" ?(?:%|(?:percent|[nuµμm]?s|secs?|seconds?|mins?|minutes?|h|hrs?|hours?|days?|[kmgtp]i?b|b|bytes?|[kmg]|x|°?[cf]|"
    r"(?:req(?:uests)?|ops|rps|qps)(?:/s(?:ec)?)?)(?![\w/]))", re.IGNORECASE)
_CURRENCY = "$€£¥"
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_NON_ASCII_DIGIT = re.compile(r"(?![0-9])\d")
_RADIX_PREFIX = re.compile(r"[xX][0-9a-fA-F]|[bB][01]|[oO][0-7]")  # after a 0: a hex, binary or octal literal
# A file name's characters are word characters outside kana, CJK, Hangul and Thai, where the name runs into the
# words around it ("在reader.py:88中"); a file named in those scripts is not read as one.
_REF = re.compile(rf"(?<!{_JOINS})((?:{_JOINS}|[.-])*(?:{_JOINS}|-)\.[A-Za-z]{{1,5}})"
                  r"(?::|\"?,? line |\s+line\s+|#L)(\d+)(?!\d)")
_IS_NUM = re.compile(r"-?\d+(?:\.\d+)*")
_IS_REF = re.compile(r"[\w.-]+\.[A-Za-z]{1,5}:\d+")
_IS_HASH = re.compile(r"(?=.*[a-f])(?=.*\d)[0-9a-f]{7,40}")


def fold(text: str) -> str:
    """`text` as compared: NFC (a decomposed "é" is the composed one) with every decimal digit in ASCII
    (full-width "１２" is 12) and the minus sign U+2212 as "-"."""
    text = unicodedata.normalize("NFC", text)
    if text.isascii():
        return text
    return _NON_ASCII_DIGIT.sub(lambda m: str(unicodedata.decimal(m.group())), text).replace("\u2212", "-")


def _trim_zeros(decimal: str) -> str:
    return decimal.rstrip("0").rstrip(".") if "." in decimal else decimal


def _occurrences(text: str) -> list[tuple[str, bool]]:
    """(number, whether it is written as a quantity) for every number in already folded `text`."""
    out = []
    for m in _NUM.finditer(text):
        tok = m.group(0).rstrip(".,")
        if tok == "0" and _RADIX_PREFIX.match(text, m.end()):  # 0x1d states no number 0
            continue
        quantity = (m.start() > 0 and text[m.start() - 1] in _CURRENCY) or bool(
            _UNIT_AFTER.match(text, m.start() + len(tok)))
        if _THOUSANDS.fullmatch(tok):
            out.append((tok.replace(",", ""), quantity))
        else:  # "3,5" lists two numbers; only the last one touches the unit
            parts = [p for p in tok.split(",") if p]
            out.extend((p, quantity and i == len(parts) - 1) for i, p in enumerate(parts))
    return out


def numbers(text: str) -> set[str]:
    """Every number in `text`, signed where a minus starts it, thousands separators removed ("185,023" -> "185023")."""
    return {n for n, _ in _occurrences(fold(text))}


def refs(text: str) -> set[str]:
    """Every file:line reference in `text`, as basename:line."""
    return {f"{m.group(1).rsplit('/', 1)[-1]}:{m.group(2)}" for m in _REF.finditer(fold(text))}


def kind(token: str) -> str:
    """What a ground-truth token is: "ref", "number", "hash" or "name" (a proper noun or identifier)."""
    if _IS_REF.fullmatch(token):
        return "ref"
    if _IS_NUM.fullmatch(token) or _THOUSANDS.fullmatch(token):  # "185,023" is the number 185023
        return "number"
    if _IS_HASH.fullmatch(token):
        return "hash"
    return "name"


def ref_pattern(token: str) -> re.Pattern[str]:
    """A regex for `basename:line` in any printed form; group 1 is everything before the line number."""
    base, line = token.rsplit(":", 1)
    # Not after a name character, dot or hyphen: `refs` reads `user-session.ts` and `old.reader.py` as
    # files of their own, so they must not count as keeping `session.ts` or `reader.py`.
    return re.compile(rf"((?<!{_JOINS}|[.-]){re.escape(base)}(?::|\"?,? line |\s+line\s+|#L)){line}(?!\d)")


def mentions(text: str, token: str) -> bool:
    """Whether `text` contains `token` in a form that counts as keeping it."""
    text, token = fold(text), fold(token)
    k = kind(token)
    if k == "ref":
        return ref_pattern(token).search(text) is not None
    if k == "number":
        token = token.replace(",", "")  # a token written with thousands separators, as the text is read
        found = _occurrences(text)
        if any(n == token for n, _ in found):
            return True
        # A quantity written with other trailing zeros keeps the value: "38ms" keeps "38.0", "$2.50" keeps "2.5".
        # A bare number may be a version, where the zero is a digit: "Python 3.1" does not keep "3.10".
        return _DECIMAL.fullmatch(token) is not None and _trim_zeros(token) in {
            _trim_zeros(n) for n, quantity in found if quantity and _DECIMAL.fullmatch(n)}
    # Whole words, where the script has them: in kana, CJK, Hangul and Thai a name runs into the next word
    # ("田中さん", "김민수가") as a number does.
    if k == "hash":  # a short hash also matches the full hash it abbreviates
        return re.search(rf"(?<!{_JOINS}){token}[0-9a-f]*(?!{_JOINS})", text, re.IGNORECASE) is not None
    return re.search(rf"(?<!{_JOINS}){re.escape(token)}(?!{_JOINS})", text, re.IGNORECASE) is not None


def text_of(value: Any) -> str:
    """All string leaves of a JSON value joined by newlines (numbers included as text)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or value is None:
        return ""
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, dict):
        return "\n".join(text_of(v) for v in value.values())
    if isinstance(value, list):
        return "\n".join(text_of(v) for v in value)
    return ""


def word_count(text: str) -> int:
    return len(text.split())
