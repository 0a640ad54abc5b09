from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from arena_pipeline.data.clean import CleaningReport, clean_frame, parse_turns, prompt_group
from arena_pipeline.data.load import read_table
from arena_pipeline.data.schema import LABEL_COLUMNS, TEXT_COLUMNS, DataError
from arena_pipeline_tests.data.conftest import SHIPPED

# --- parse_turns ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cell, expected",
    [
        ('["a", "b"]', ["a", "b"]),
        ('["a", null, "b"]', ["a", "", "b"]),
        ("[null]", [""]),
        ('["hi \\ud83d"]', ["hi \ufffd"]),  # lone surrogate escape in the JSON text
        ('["\\ud83d\\ude00 ok"]', ["\U0001f600 ok"]),  # a proper pair stays the emoji
        ('["\\ude00\\ud83d"]', ["\ufffd\ufffd"]),  # reversed pair: two lone halves
        ("x \ud83d y", ["x \ufffd y"]),  # a str holding a lone surrogate, plain text
        ('["x \ud83d"]', ["x \ufffd"]),  # ... inside a JSON list
        ("plain text, not JSON", ["plain text, not JSON"]),
        ('"a JSON string"', ["a JSON string"]),
        ("42", ["42"]),
        ('{"role": "user"}', ['{"role": "user"}']),
        ("null", [""]),
        (None, [""]),
        (float("nan"), [""]),
        (pd.NA, [""]),
        ("[]", [""]),
        ('[["a", "b"], {"k": 1}, "c", 3, true]', ['["a", "b"]', '{"k": 1}', "c", "3", "true"]),
        (["already", "a list", None], ["already", "a list", ""]),
        (np.array(["from", "arrow"], dtype=object), ["from", "arrow"]),
        ("", [""]),
    ],
)
def test_parse_turns(cell, expected):
    turns = parse_turns(cell)
    assert turns == expected
    for t in turns:
        t.encode("utf-8")


def test_prompt_group():
    assert prompt_group('["  Hello\\n\\tWORLD  again ", "second turn"]') == "hello world again"
    assert prompt_group('["hello world again"]') == prompt_group('["Hello   World Again"]')
    assert prompt_group("not json At All") == "not json at all"
    assert prompt_group("[null]") == ""


# --- clean_frame: quirks --------------------------------------------------------------------


def _frame(rows, labelled=True):
    cols = ["id", *TEXT_COLUMNS, *(LABEL_COLUMNS if labelled else ())]
    return pd.DataFrame(rows, columns=cols, dtype=object)


LONG = "x" * 150_000


def test_clean_frame_quirks():
    df = _frame(
        [
            ["q1", '["What is 2+2?"]', '["4"]', '["four"]', 1, 0, 0],  # clean row
            ["q2", '["Hi", null]', '["Hello", "Sure"]', '["Hey", null]', 0, 1, 0],  # null items
            ["q3", '["hi \\ud83d"]', '["ok"]', '["x \ud83d"]', 0, 0, 1],  # lone surrogates (escape + str)
            ["q4", "plain prompt", "plain answer", '["listed"]', 1, 0, 0],  # non-list cells
            ["q5", '["t1", "t2"]', '["a1"]', '["b1", "b2", "b3"]', 0, 1, 0],  # unequal turns
            ["q6", '["Empty?"]', '[""]', '["not empty"]', 0, 1, 0],  # empty response
            ["q7", '["Long"]', json.dumps([LONG]), '["short"]', 1, 0, 0],  # 150k characters
            ["q8", '["nested"]', '[["a", "b"]]', None, 0, 0, 1],  # nested item, missing cell
        ]
    )
    out, report = clean_frame(df, file="quirks.parquet", labelled=True)
    assert len(out) == 8
    assert report.removed == {"duplicate": 0, "conflicting_duplicate_merged": 0}
    assert report.fixed == {
        "lone_surrogate": 1,
        "null_turn": 1,
        "non_list_cell": 2,  # q4 and q8 (missing cell)
        "nested_turn": 1,
        "empty_turn_list": 0,
        "turns_padded": 1,
    }
    assert report.flagged == {"empty_prompt": 0, "empty_response": 2, "text_over_100k_chars": 1}  # q6, q8

    rows = {r["id"]: r for r in out.to_dict("records")}
    assert json.loads(rows["q2"]["prompt"]) == ["Hi", ""]
    assert json.loads(rows["q2"]["response_b"]) == ["Hey", ""]
    assert json.loads(rows["q3"]["prompt"]) == ["hi \ufffd"]
    assert json.loads(rows["q3"]["response_b"]) == ["x \ufffd"]
    assert json.loads(rows["q4"]["prompt"]) == ["plain prompt"]
    assert [len(json.loads(rows["q5"][c])) for c in TEXT_COLUMNS] == [3, 3, 3]
    assert json.loads(rows["q5"]["response_a"]) == ["a1", "", ""]
    assert json.loads(rows["q6"]["response_a"]) == [""]
    assert json.loads(rows["q7"]["response_a"]) == [LONG]  # untouched
    assert json.loads(rows["q8"]["response_a"]) == ['["a", "b"]']
    assert json.loads(rows["q8"]["response_b"]) == [""]
    # every text column: a JSON list of str, equal turn counts, valid UTF-8, ensure_ascii=False
    for r in rows.values():
        lists = [json.loads(r[c]) for c in TEXT_COLUMNS]
        assert len({len(t) for t in lists}) == 1
        for c in TEXT_COLUMNS:
            r[c].encode("utf-8")
    assert "\ufffd" in rows["q3"]["prompt"]  # stored as the character, not as an escape
    assert rows["q4"]["group"] == "plain prompt"
    assert out["winner_model_a"].dtype == np.int8
    assert report.rows_in - report.rows_out == sum(report.removed.values())


def test_clean_frame_columns_models_source_and_extras():
    df = _frame([["1", '["p"]', '["a"]', '["b"]', 1.0, 0.0, 0.0], ["2", '["P2"]', '["a"]', '["b"]', 0.0, 0.0, 1.0]])
    df["votes_a"] = [3, 0]
    df["subset"] = ["Natural", "GPTInst"]
    df["model_a"] = ["gpt-4", None]
    out, _ = clean_frame(df, file="/x/y/llmbar_extra.jsonl", labelled=True)
    assert list(out.columns) == [
        "id", "prompt", "response_a", "response_b", "winner_model_a", "winner_model_b", "winner_tie",
        "model_a", "model_b", "source", "group", "votes_a", "subset",
    ]
    assert out["model_a"].tolist() == ["gpt-4", ""]
    assert out["model_b"].tolist() == ["", ""]
    assert out["source"].tolist() == ["llmbar_extra", "llmbar_extra"]  # file stem
    assert out["votes_a"].tolist() == [3, 0] and out["subset"].tolist() == ["Natural", "GPTInst"]
    assert out[list(LABEL_COLUMNS)].to_numpy().tolist() == [[1, 0, 0], [0, 0, 1]]  # Kaggle floats accepted
    assert out["group"].tolist() == ["p", "p2"]

    given, _ = clean_frame(df, file="f.csv", labelled=True, source="mine")
    assert given["source"].tolist() == ["mine", "mine"]
    df["source"] = ["kept", None]
    existing, _ = clean_frame(df, file="f.csv", labelled=True)
    assert existing["source"].tolist() == ["kept", "f"]


def test_to_metadata_is_flat():
    report = CleaningReport(rows_in=10, rows_out=7, removed={"duplicate": 2, "conflicting_duplicate_merged": 1},
                            fixed={"null_turn": 4}, flagged={"empty_response": 1})
    meta = report.to_metadata()
    assert meta == {
        "rows_in": 10, "rows_out": 7, "removed_total": 3, "removed_duplicate": 2,
        "removed_conflicting_duplicate_merged": 1, "fixed_null_turn": 4, "flagged_empty_response": 1,
    }
    json.dumps(meta)


# --- clean_frame: de-duplication ------------------------------------------------------------


def test_duplicates_identical_and_conflicting():
    A, B, T = (1, 0, 0), (0, 1, 0), (0, 0, 1)
    rows = [
        ["d1", '["same"]', '["x"]', '["y"]', *A],
        ["d2", '["same"]', '["x"]', '["y"]', *A],  # identical label -> duplicate
        ["d3", '["same"]', '["x"]', '["y"]', *A],  # ... again
        ["u1", '["other"]', '["x"]', '["y"]', *B],  # unique
        ["m1", '["maj"]', '["x"]', '["y"]', *B],
        ["m2", '["maj"]', '["x"]', '["y"]', *A],
        ["m3", '["maj"]', '["x"]', '["y"]', *B],  # B, A, B -> B by majority
        ["t1", '["split"]', '["x"]', '["y"]', *A],
        ["t2", '[ "split" ]', '["x"]', '["y"]', *B],  # same after normalising JSON -> A vs B -> tie
        ["s1", '["same"]', '["y"]', '["x"]', *B],  # swapped A/B is a different row
    ]
    out, report = clean_frame(_frame(rows), file="dups.parquet", labelled=True)
    assert report.removed == {"duplicate": 2, "conflicting_duplicate_merged": 3}
    assert (report.rows_in, report.rows_out) == (10, 5)
    assert report.rows_in - report.rows_out == sum(report.removed.values())
    assert out["id"].tolist() == ["d1", "u1", "m1", "t1", "s1"]
    labels = dict(zip(out["id"], out[list(LABEL_COLUMNS)].to_numpy().tolist()))
    assert labels == {"d1": [1, 0, 0], "u1": [0, 1, 0], "m1": [0, 1, 0], "t1": [0, 0, 1], "s1": [0, 1, 0]}


def test_duplicates_unlabelled():
    rows = [["a", '["p"]', '["x"]', '["y"]'], ["b", '["p"]', '["x"]', '["y"]'], ["c", '["p"]', '["x"]', '["z"]']]
    out, report = clean_frame(_frame(rows, labelled=False), file="u.parquet", labelled=False)
    assert out["id"].tolist() == ["a", "c"]
    assert report.removed["duplicate"] == 1


# --- clean_frame: validation errors ---------------------------------------------------------


def _good():
    return _frame([["r1", '["p"]', '["a"]', '["b"]', 1, 0, 0], ["r2", '["q"]', '["a"]', '["b"]', 0, 1, 0]])


def _error(df, labelled=True) -> DataError:
    with pytest.raises(DataError) as info:
        clean_frame(df, file="data/train.csv", labelled=labelled)
    assert "\n" not in str(info.value)
    return info.value


def test_error_missing_column():
    err = _error(_good().drop(columns=["response_b"]))
    assert (err.file, err.row_id, err.column) == ("data/train.csv", None, "response_b")
    assert str(err) == (
        "data/train.csv: column 'response_b': required column is missing (labelled tables need id, prompt, "
        "response_a, response_b, winner_model_a, winner_model_b, winner_tie; found id, prompt, response_a, "
        "winner_model_a, winner_model_b, winner_tie). Rename or add the column."
    )
    err = _error(_good().drop(columns=["winner_tie"]))
    assert err.column == "winner_tie"
    out, _ = clean_frame(_good().drop(columns=list(LABEL_COLUMNS)), file="t.csv", labelled=False)  # fine unlabelled
    assert len(out) == 2


def test_error_duplicate_id():
    df = _good()
    df.loc[1, "id"] = "r1"
    err = _error(df)
    assert str(err) == (
        "data/train.csv: row id=r1: column 'id': duplicate id (1 rows repeat an earlier id). Make ids unique "
        "(e.g. prefix them with the source name) or drop the repeated rows."
    )


def test_error_two_winners():
    df = _good()
    df.loc[1, "winner_model_a"] = 1
    err = _error(df)
    assert (err.row_id, err.column) == ("r2", "winner_model_a,winner_model_b")
    assert str(err) == (
        "data/train.csv: row id=r2: column 'winner_model_a,winner_model_b': 2 winners: winner_model_a and "
        "winner_model_b are 1 (1 such rows). Set exactly one of winner_model_a, winner_model_b, winner_tie to 1."
    )


def test_error_no_winner():
    df = _good()
    df.loc[0, "winner_model_a"] = 0
    err = _error(df)
    assert err.row_id == "r1"
    assert "column 'winner_model_a,winner_model_b,winner_tie': no winner: all three label columns are 0" in str(err)


def test_error_label_two_and_missing():
    df = _good()
    df.loc[1, "winner_model_b"] = 2
    err = _error(df)
    assert str(err) == (
        "data/train.csv: row id=r2: column 'winner_model_b': label value 2 is not 0 or 1 (1 such rows). "
        "Labels are one-hot: 1 for the winner column, 0 for the other two."
    )
    df = _good()
    df.loc[0, "winner_tie"] = None
    err = _error(df)
    assert (err.row_id, err.column) == ("r1", "winner_tie")
    assert "the label is missing" in str(err)
    df = _good()
    df.loc[0, "winner_tie"] = "yes"
    assert "label value 'yes' is not a number" in str(_error(df))


# --- the shipped files ----------------------------------------------------------------------

SHIPPED_EXPECTED = {
    # file: (labelled, rows, flagged empty_response, flagged text_over_100k_chars, groups)
    "arena_bench_pairs": (True, 5800, 61, 2, 290),
    "pandalm_test": (True, 881, 29, 0, 166),
    "llmbar": (True, 751, 1, 0, 704),
    "arena_bench_unlabelled": (False, 4000, 47, 4, 290),
}


@pytest.mark.parametrize("name", list(SHIPPED_EXPECTED))
def test_shipped_files_clean(name):
    labelled, rows, empty, long, groups = SHIPPED_EXPECTED[name]
    raw = read_table(SHIPPED / f"{name}.parquet")
    out, report = clean_frame(raw, file=f"{name}.parquet", labelled=labelled)
    assert (report.rows_in, report.rows_out) == (rows, rows)
    assert sum(report.removed.values()) == 0
    assert sum(report.fixed.values()) == 0
    assert report.flagged["empty_response"] == empty
    assert report.flagged["text_over_100k_chars"] == long
    assert out["group"].nunique() == groups
    for col in TEXT_COLUMNS:  # already in normal form: cleaning changes no text
        assert (out[col].to_numpy() == raw[col].to_numpy()).all()
    assert out["source"].tolist() == raw["source"].tolist()
    n_contract = 11 if labelled else 8  # Contract 1 columns without fold (and without labels)
    extras = [c for c in raw.columns if c not in out.columns[:n_contract]]
    assert list(out.columns[n_contract:]) == extras
    assert len(extras) == {"arena_bench_pairs": 3, "pandalm_test": 5, "llmbar": 1, "arena_bench_unlabelled": 1}[name]


def test_dedupe_false_keeps_every_row():
    rows = [["a", '["p"]', '["x"]', '["y"]'], ["b", '["p"]', '["x"]', '["y"]']]
    out, report = clean_frame(_frame(rows, labelled=False), file="test.csv", labelled=False, dedupe=False)
    assert out["id"].tolist() == ["a", "b"]
    assert report.removed == {"duplicate": 0, "conflicting_duplicate_merged": 0}


def test_data_error_forms():
    err = DataError("f.csv", "bad thing.\nsecond line", row_id=7, column="prompt", hint="fix it")
    assert str(err) == "f.csv: row id=7: column 'prompt': bad thing. second line. fix it."
    assert (err.file, err.row_id, err.column) == ("f.csv", "7", "prompt")
    assert str(DataError("f.csv", "empty")) == "f.csv: empty."
    pre = DataError("p.parquet: column 'prompt' is missing. Add it.")  # one pre-formatted argument
    assert str(pre) == "p.parquet: column 'prompt' is missing. Add it."
    assert pre.file == "p.parquet" and isinstance(pre, ValueError)


# --- clean_frame: ties_possible --------------------------------------------------------------


def test_tie_free_sources_are_marked_and_a_file_column_is_validated():
    rows = [["r1", '["p"]', '["a"]', '["b"]', 1, 0, 0], ["r2", '["p2"]', '["a"]', '["b"]', 0, 0, 1]]
    frame = _frame(rows).assign(source=["llmbar", "arena"])
    out, _ = clean_frame(frame, file="mixed.parquet", labelled=True, tie_free_sources=("llmbar",))
    assert out["ties_possible"].tolist() == [False, True]
    plain, _ = clean_frame(frame, file="mixed.parquet", labelled=True)
    assert "ties_possible" not in plain.columns  # nothing declared: the column is not invented
    own, _ = clean_frame(frame.assign(ties_possible=["no", ""]), file="own.csv", labelled=True,
                         tie_free_sources=("arena",))  # a file's own column wins over the profile's list
    assert own["ties_possible"].tolist() == [False, True]
    with pytest.raises(DataError, match=r"bad\.csv: row id 'r2': column 'ties_possible' must be true or false"):
        clean_frame(frame.assign(ties_possible=[True, "sometimes"]), file="bad.csv", labelled=True)
    with pytest.raises(DataError, match=r"tied\.csv: row id=r2: column 'ties_possible': labelled a tie"):
        clean_frame(frame, file="tied.csv", labelled=True, tie_free_sources=("arena",))
