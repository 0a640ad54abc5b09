"""Turn parsing: a text cell (``json.dumps(list[str])``, one item per turn) as a list of UTF-8-safe strings.

One parser for both packages. ``parse_turns`` never raises (cleaning, tokenising); ``parse_turns_fixes``
also says which repairs it made (the cleaning report counts them); ``strict=True`` refuses a cell that is
not a list of turns with a ``TurnsError`` whose message the caller prefixes with file, row and column.
Unpaired UTF-16 surrogates (a lone ``\\ud83d`` escape) become U+FFFD everywhere, so every turn encodes as
UTF-8 and tokenizers accept it.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pandas as pd

SURROGATE = re.compile("[\ud800-\udfff]")

# Repairs ``parse_turns_fixes`` reports: "lone_surrogate" (U+FFFD put in), "null_turn" (a null item -> ""),
# "non_list_cell" (a cell that is not a list: one turn), "nested_turn" (a list / object item -> its JSON),
# "empty_turn_list" ([] -> [""]), "non_text_turn" (a number / bool item -> its JSON text).
FIXES = ("lone_surrogate", "null_turn", "non_list_cell", "nested_turn", "empty_turn_list", "non_text_turn")


class TurnsError(ValueError):
    """A cell that strict parsing refuses. ``kind``: "type" (neither text nor a list), "json" (text that is
    not JSON; ``detail`` holds the decoder's message) or "not_list" (JSON, but not a list of turns)."""

    def __init__(self, kind: str, message: str, detail: str = ""):
        super().__init__(message)
        self.kind, self.detail = kind, detail or message


def fix_surrogates(text: str) -> tuple[str, bool]:
    """``text`` with unpaired surrogates replaced by U+FFFD (a correctly ordered pair left as two code points
    is joined into its character), and whether anything was replaced."""
    if SURROGATE.search(text) is None:
        return text, False
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace"), True


def repair_surrogates(text: str) -> str:
    return fix_surrogates(text)[0]


def is_missing(value: object) -> bool:
    """None, ``pd.NA`` or a float NaN."""
    if value is None or value is pd.NA:
        return True
    return isinstance(value, float) and math.isnan(value)


def _item_text(item: object, flags: set[str]) -> str:
    if isinstance(item, str):
        return item
    if is_missing(item):
        flags.add("null_turn")
        return ""
    if isinstance(item, bytes):  # a list<binary> column: text, like a bytes cell
        return item.decode("utf-8", "replace")
    if isinstance(item, np.ndarray):
        item = item.tolist()
    if isinstance(item, np.generic):
        item = item.item()
    if isinstance(item, (list, tuple, dict)):
        flags.add("nested_turn")
        return json.dumps(item, ensure_ascii=False, default=str)
    flags.add("non_text_turn")
    if isinstance(item, (bool, int, float)):
        return json.dumps(item)
    return str(item)


def _turns_of(items: list, flags: set[str]) -> tuple[list[str], set[str]]:
    if not items:
        flags.add("empty_turn_list")
        return [""], flags
    turns = []
    for item in items:
        text, fixed = fix_surrogates(_item_text(item, flags))
        if fixed:
            flags.add("lone_surrogate")
        turns.append(text)
    return turns, flags


def _parse_cell(cell: object) -> tuple[list[str], set[str]]:
    flags: set[str] = set()
    if isinstance(cell, bytes):
        cell = cell.decode("utf-8", "replace")
    if isinstance(cell, (list, tuple, np.ndarray)):
        items = list(cell)
    elif is_missing(cell):
        return [""], {"non_list_cell"}
    elif isinstance(cell, str):
        try:
            value = json.loads(cell)
        except ValueError:  # plain text (JSONDecodeError is a ValueError)
            value = cell
            flags.add("non_list_cell")
        else:
            if not isinstance(value, list):
                flags.add("non_list_cell")
                if value is None:
                    return [""], flags
                # A JSON string is decoded; a number / bool / object keeps its text as written.
                value = value if isinstance(value, str) else cell
        if isinstance(value, list):
            items = value
        else:
            text, fixed = fix_surrogates(value)
            if fixed:
                flags.add("lone_surrogate")
            return [text], flags
    else:
        flags.add("non_list_cell")
        items = [cell]
    return _turns_of(items, flags)


def _strict_items(cell: object) -> tuple[list, set[str]]:
    if isinstance(cell, (list, tuple, np.ndarray)):
        return list(cell), set()
    if not isinstance(cell, str):
        raise TurnsError("type", f"expected json.dumps(list[str]), got {type(cell).__name__}; "
                                 "run the frame through the cleaning step (data contract 1)")
    try:
        value = json.loads(cell)
    except json.JSONDecodeError as exc:
        raise TurnsError("json", f"not valid JSON ({exc.msg}); expected json.dumps(list[str])", str(exc)) from None
    except RecursionError:
        raise TurnsError("json", "not valid JSON (nested too deeply); expected json.dumps(list[str])",
                         "nested too deeply") from None
    if isinstance(value, str):  # a JSON string: one turn
        return [value], {"non_list_cell"}
    if not isinstance(value, list):
        raise TurnsError("not_list", "JSON is not a list of turns")
    return value, set()


def parse_turns_fixes(cell: object, *, strict: bool = False) -> tuple[list[str], set[str]]:
    """``parse_turns`` plus the set of repairs it made (names in ``FIXES``).

    ``strict=True``: only a list / tuple / array or the JSON text of a list (or of one string) is accepted;
    anything else raises ``TurnsError`` (plain text, other JSON, numbers, None, bytes)."""
    if strict:
        items, flags = _strict_items(cell)
        try:
            return _turns_of(items, flags)
        except RecursionError:
            raise TurnsError("json", "not valid JSON (nested too deeply); expected json.dumps(list[str])",
                         "nested too deeply") from None
    try:
        return _parse_cell(cell)
    except RecursionError:  # JSON nested deeper than Python's recursion limit: keep the text as written
        try:
            text = cell if isinstance(cell, str) else str(cell)
        except RecursionError:
            text = ""
        fixed_text, fixed = fix_surrogates(text)
        return [fixed_text], {"non_list_cell", "lone_surrogate"} if fixed else {"non_list_cell"}


def parse_turns(cell: object) -> list[str]:
    """The turns of one text cell, as a list of UTF-8-safe strings (at least one). Never raises.

    - a JSON list (or a Python list / numpy array) -> its items as ``str``; ``null`` items -> "";
      nested lists / objects -> ``json.dumps(item)``; numbers / bools -> their JSON text;
      an empty list -> ``[""]``;
    - unpaired surrogates (a lone ``\\ud83d`` escape in the JSON text, or a ``str`` holding one) ->
      U+FFFD, so every turn encodes as UTF-8;
    - anything that is not a JSON list is one turn: plain text as is, a JSON string decoded, a JSON
      number / object as written, JSON ``null`` / NaN / None -> ``[""]``; JSON nested too deeply
      to decode (thousands of levels) is plain text too;
    - ``bytes`` (a cell or a list item) are decoded as UTF-8 (invalid bytes -> U+FFFD).
    """
    return parse_turns_fixes(cell)[0]
