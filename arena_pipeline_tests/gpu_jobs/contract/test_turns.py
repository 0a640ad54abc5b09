"""gpu_jobs.contract.turns: one turn parser (cases from the cleaning and gpu_jobs data tests)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from gpu_jobs.contract import TurnsError, fix_surrogates, parse_turns, parse_turns_fixes


@pytest.mark.parametrize(
    "cell, expected, fixes",
    [
        ('["a", "b"]', ["a", "b"], set()),
        ('["a", null, "b"]', ["a", "", "b"], {"null_turn"}),
        ("[null]", [""], {"null_turn"}),
        ('["hi \\ud83d"]', ["hi \ufffd"], {"lone_surrogate"}),  # lone surrogate escape in the JSON text
        ('["\\ud83d\\ude00 ok"]', ["\U0001f600 ok"], set()),  # a proper pair stays the emoji
        ('["\\ude00\\ud83d"]', ["\ufffd\ufffd"], {"lone_surrogate"}),  # reversed pair: two lone halves
        ("x \ud83d y", ["x \ufffd y"], {"non_list_cell", "lone_surrogate"}),  # a str holding a lone surrogate
        ("plain text, not JSON", ["plain text, not JSON"], {"non_list_cell"}),
        ('"a JSON string"', ["a JSON string"], {"non_list_cell"}),
        ("42", ["42"], {"non_list_cell"}),
        ('{"role": "user"}', ['{"role": "user"}'], {"non_list_cell"}),
        ("null", [""], {"non_list_cell"}),
        (None, [""], {"non_list_cell"}),
        (float("nan"), [""], {"non_list_cell"}),
        (pd.NA, [""], {"non_list_cell"}),
        ("[]", [""], {"empty_turn_list"}),
        ('[["a", "b"], {"k": 1}, "c", 3, true]', ['["a", "b"]', '{"k": 1}', "c", "3", "true"],
         {"nested_turn", "non_text_turn"}),
        (["already", "a list", None], ["already", "a list", ""], {"null_turn"}),
        (np.array(["from", "arrow"], dtype=object), ["from", "arrow"], set()),
        (b'["bytes", "\xff"]', ["bytes", "\ufffd"], set()),
        ("[" * 100_000, ["[" * 100_000], {"non_list_cell"}),  # too deep for json: plain text
    ],
)
def test_parse_turns_lenient(cell, expected, fixes):
    turns, found = parse_turns_fixes(cell)
    assert turns == expected and found == fixes
    assert parse_turns(cell) == expected
    for t in turns:
        t.encode("utf-8")  # every turn is valid UTF-8


def test_fix_surrogates_reports_whether_it_changed_the_text():
    assert fix_surrogates("plain") == ("plain", False)
    assert fix_surrogates("a\ud83db") == ("a\ufffdb", True)
    assert fix_surrogates("\ud83d\ude00") == ("\U0001f600", True)  # two code points joined into one


@pytest.mark.parametrize("cell", ['["q", "r"]', ["q", "r"], np.array(["q", "r"], dtype=object)])
def test_strict_accepts_lists(cell):
    assert parse_turns_fixes(cell, strict=True) == (["q", "r"], set())


def test_strict_accepts_a_json_string_as_one_turn_and_repairs_surrogates():
    assert parse_turns_fixes('"one \\ud83d"', strict=True) == (["one \ufffd"], {"non_list_cell", "lone_surrogate"})


@pytest.mark.parametrize(
    "cell, kind, message",
    [
        (3, "type", "expected json.dumps(list[str]), got int; run the frame through the cleaning step"),
        (None, "type", "got NoneType"),
        ("not json", "json", "not valid JSON (Expecting value); expected json.dumps(list[str])"),
        ("[" * 100_000, "json", "not valid JSON (nested too deeply)"),
        ('{"a": 1}', "not_list", "JSON is not a list of turns"),
        ("42", "not_list", "JSON is not a list of turns"),
    ],
)
def test_strict_refuses_other_cells(cell, kind, message):
    with pytest.raises(TurnsError) as info:
        parse_turns_fixes(cell, strict=True)
    assert info.value.kind == kind and message in str(info.value)
    assert isinstance(info.value, ValueError)


def test_strict_json_error_keeps_the_decoder_message_as_detail():
    with pytest.raises(TurnsError) as info:
        parse_turns_fixes("not json", strict=True)
    assert info.value.detail == "Expecting value: line 1 column 1 (char 0)"
