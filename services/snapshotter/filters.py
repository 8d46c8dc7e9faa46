"""containerd's filter syntax, as the snapshots API's List (Walk) receives it.

    filter   := selector ("," selector)*          all selectors must match
    selector := fieldpath [op value]              no op: the field is present
    op       := "==" | "!=" | "~="                 ~= is a regular expression search
    fieldpath:= name | parent | kind | labels "." (key | "quoted key")

A List request's filters are alternatives: a snapshot is listed if any matches.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from imagestream.errors import InvalidArgument

_TOKEN = re.compile(r'\s*(?:"((?:[^"\\]|\\.)*)"|(==|!=|~=)|(,)|(\.)|([^\s.,=!~"]+))')

Fields = Mapping[str, object]  # name, parent, kind (str) and labels (dict)


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            if text[pos:].strip() == "":
                break
            raise InvalidArgument(f"filter {text!r}: cannot parse at {text[pos:]!r}")
        pos = m.end()
        quoted, op, comma, dot, word = m.groups()
        if quoted is not None:
            out.append(("value", bytes(quoted, "utf-8").decode("unicode_escape")))
        elif op:
            out.append(("op", op))
        elif comma:
            out.append((",", ","))
        elif dot:
            out.append((".", "."))
        elif word is not None:
            out.append(("value", word))
    return out


def parse(text: str) -> Callable[[Fields], bool]:
    """A predicate for one filter expression."""
    tokens = _tokens(text)
    selectors: list[Callable[[Fields], bool]] = []
    i = 0
    while i < len(tokens):
        path: list[str] = []
        while i < len(tokens) and tokens[i][0] in ("value", "."):
            if tokens[i][0] == "value":
                path.append(tokens[i][1])
            i += 1
        if not path:
            raise InvalidArgument(f"filter {text!r}: a selector needs a field")
        op = value = None
        if i < len(tokens) and tokens[i][0] == "op":
            op = tokens[i][1]
            # the value may contain dots (digests, labels): join the tokens up to the next comma
            j = i + 1
            parts = []
            while j < len(tokens) and tokens[j][0] != ",":
                parts.append(tokens[j][1])
                j += 1
            value = "".join(parts)
            i = j
        if i < len(tokens):
            if tokens[i][0] != ",":
                raise InvalidArgument(f"filter {text!r}: expected ',' after a selector")
            i += 1
        selectors.append(_selector(text, path, op, value))
    return lambda fields: all(s(fields) for s in selectors)


def _selector(text: str, path: list[str], op: str | None, value: str | None) -> Callable[[Fields], bool]:
    if op == "~=":
        try:
            pattern = re.compile(value or "")
        except re.error as e:
            raise InvalidArgument(f"filter {text!r}: bad regular expression ({e})") from None

    def get(fields: Fields) -> str | None:
        head, rest = path[0], ".".join(path[1:])
        if head == "labels" and rest:
            return fields.get("labels", {}).get(rest)  # type: ignore[union-attr]
        if len(path) == 1 and head in fields and head != "labels":
            return str(fields[head])
        return None

    def match(fields: Fields) -> bool:
        actual = get(fields)
        if op is None:
            return actual is not None and actual != ""
        if op == "==":
            return actual == value
        if op == "!=":
            return actual != value
        return actual is not None and pattern.search(actual) is not None

    return match


def matcher(filters: list[str]) -> Callable[[Fields], bool]:
    """Any of `filters` (none: everything)."""
    if not filters:
        return lambda fields: True
    predicates = [parse(f) for f in filters]
    return lambda fields: any(p(fields) for p in predicates)
