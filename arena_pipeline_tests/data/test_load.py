from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from arena_pipeline.data.clean import clean_frame
from arena_pipeline.data.load import read_predictions, read_table
from arena_pipeline.data.schema import LABEL_COLUMNS, PROB_COLUMNS, TEXT_COLUMNS, DataError
from arena_pipeline_tests.data.conftest import KAGGLE_TEST_COLUMNS, KAGGLE_TRAIN_COLUMNS, SHIPPED


def _kaggle_train(sample: pd.DataFrame) -> pd.DataFrame:
    df = sample[KAGGLE_TRAIN_COLUMNS].copy()
    df["id"] = np.arange(30192, 30192 + len(df))  # Kaggle ids are integers
    for col in LABEL_COLUMNS:
        df[col] = df[col].astype(int)
    return df


# --- formats --------------------------------------------------------------------------------


def test_kaggle_train_csv(tmp_path, sample):
    df = _kaggle_train(sample)
    df.loc[3, "response_a"] = "NA"  # a plain-text cell that pandas would turn into NaN by default
    df.loc[4, "model_b"] = "null"
    path = tmp_path / "train.csv"
    df.to_csv(path, index=False)

    got = read_table(path)
    assert list(got.columns) == KAGGLE_TRAIN_COLUMNS
    assert len(got) == 24
    assert got["id"].tolist() == [str(i) for i in range(30192, 30216)]
    assert pd.api.types.is_string_dtype(got["id"])
    for col in TEXT_COLUMNS:
        assert got[col].tolist() == df[col].tolist()  # multi-line, quoted, unicode text survives
    assert got.loc[3, "response_a"] == "NA"
    assert got.loc[4, "model_b"] == "null"
    assert got[list(LABEL_COLUMNS)].to_numpy().tolist() == df[list(LABEL_COLUMNS)].to_numpy().tolist()

    clean, report = clean_frame(got, file=str(path), labelled=True)
    assert (report.rows_in, report.rows_out) == (24, 24)
    assert clean["source"].unique().tolist() == ["train"]
    assert json.loads(clean.loc[3, "response_a"]) == ["NA"]
    assert report.fixed["non_list_cell"] == 1
    assert clean[list(LABEL_COLUMNS)].sum().tolist() == [8, 8, 8]


def test_kaggle_test_csv(tmp_path, sample):
    df = sample[KAGGLE_TEST_COLUMNS].copy()
    df["id"] = np.arange(136060, 136060 + len(df))
    path = tmp_path / "test.csv"
    df.to_csv(path, index=False)

    got = read_table(path)
    assert list(got.columns) == KAGGLE_TEST_COLUMNS
    assert got["id"].iloc[0] == "136060"
    clean, report = clean_frame(got, file=str(path), labelled=False)
    assert report.rows_out == 24
    assert not any(c in clean.columns for c in LABEL_COLUMNS)
    assert clean["model_a"].tolist() == [""] * 24
    assert clean["source"].tolist() == ["test"] * 24


def test_parquet_with_integer_ids(tmp_path, sample):
    df = sample.copy()
    df["id"] = np.arange(len(df), dtype=np.int64) * 7
    path = tmp_path / "pairs.parquet"
    df.to_parquet(path)
    got = read_table(path)
    assert got["id"].tolist() == [str(7 * i) for i in range(24)]
    assert got["score_a"].tolist() == df["score_a"].tolist()
    assert got["prompt"].tolist() == df["prompt"].tolist()


def test_shipped_parquet_as_is():
    got = read_table(SHIPPED / "pandalm_test.parquet")
    assert got.shape == (881, 15)
    assert got["id"].iloc[0] == "pandalm-00000"
    assert got[["votes_a", "votes_b", "votes_tie"]].to_numpy().sum() == 881 * 3


def test_jsonl_and_lone_surrogate_escape(tmp_path, sample):
    df = sample.head(5)
    lines = []
    for i, row in enumerate(df.to_dict("records")):
        record = {k: row[k] for k in ["id", *TEXT_COLUMNS, *LABEL_COLUMNS]}
        record["id"] = 1000 + i
        record["winner_model_a"] = int(record["winner_model_a"])
        record["winner_model_b"] = int(record["winner_model_b"])
        record["winner_tie"] = int(record["winner_tie"])
        lines.append(json.dumps(record))
    # row 1: a JSON string value holding a lone high surrogate escape (as in scraped chat logs)
    lines[1] = lines[1].replace('"response_a": "[', '"response_a": "[\\"broken \\ud83d emoji\\", ', 1)
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    got = read_table(path)
    assert got["id"].tolist() == ["1000", "1001", "1002", "1003", "1004"]
    assert got["response_a"].iloc[1].startswith('["broken \ud83d emoji", ')  # kept for cleaning to count
    clean, report = clean_frame(got, file=str(path), labelled=True)
    assert report.fixed["lone_surrogate"] == 1
    turns = json.loads(clean.loc[1, "response_a"])
    assert turns[0] == "broken \ufffd emoji"
    clean.loc[1, "response_a"].encode("utf-8")  # encodes now
    # prompt and response_b got padded to the new turn count of response_a
    assert report.fixed["turns_padded"] == 1
    assert len(json.loads(clean.loc[1, "prompt"])) == 2


def test_json_array_file(tmp_path, sample):
    records = sample.head(3)[["id", *TEXT_COLUMNS]].to_dict("records")
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    got = read_table(path)
    assert got["id"].tolist() == sample["id"].head(3).tolist()
    assert got["prompt"].tolist() == sample["prompt"].head(3).tolist()


def test_hf_dataset_directory(tmp_path, sample):
    import datasets

    ds = datasets.Dataset.from_pandas(sample, preserve_index=False)
    ds.save_to_disk(str(tmp_path / "ds"))
    got = read_table(tmp_path / "ds")
    assert len(got) == 24
    assert got["id"].tolist() == sample["id"].tolist()
    assert got["response_b"].tolist() == sample["response_b"].tolist()
    assert got["winner_tie"].sum() == 8

    dd = datasets.DatasetDict({"train": ds, "test": ds.select(range(5))})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert len(read_table(tmp_path / "dd", split="test")) == 5
    with pytest.raises(DataError, match=r"split 'validation' not found \(splits: train, test\)"):
        read_table(tmp_path / "dd", split="validation")


# --- errors ---------------------------------------------------------------------------------


def _one_line(exc: DataError) -> str:
    msg = str(exc)
    assert "\n" not in msg
    return msg


def test_missing_file(tmp_path):
    path = tmp_path / "nope.parquet"
    with pytest.raises(DataError) as info:
        read_table(path)
    msg = _one_line(info.value)
    assert msg.startswith(f"{path}: file not found. Check the path")
    assert info.value.file == str(path) and info.value.row_id is None and info.value.column is None


def test_corrupt_parquet(tmp_path, sample):
    good = tmp_path / "good.parquet"
    sample.to_parquet(good)
    data = good.read_bytes()
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(data[: len(data) // 2])  # cut in half: footer gone
    with pytest.raises(DataError) as info:
        read_table(bad)
    msg = _one_line(info.value)
    assert msg.startswith(f"{bad}: cannot read as parquet (")
    assert msg.endswith("The file is corrupt or not parquet; re-create it.")


def test_truncated_csv_unterminated_quote(tmp_path, sample):
    path = tmp_path / "train.csv"
    _kaggle_train(sample).to_csv(path, index=False)
    text = path.read_text(encoding="utf-8")
    cut = text.rindex('"[') + 40  # inside the last quoted text cell
    path.write_text(text[:cut], encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_table(path)
    msg = _one_line(info.value)
    assert msg.startswith(f"{path}: cannot parse the CSV (")
    assert "unterminated quote" in msg and "EOF inside string" in msg


def test_truncated_csv_mid_row(tmp_path, sample):
    path = tmp_path / "train.csv"
    df = _kaggle_train(sample)
    df.to_csv(path, index=False)
    text = path.read_text(encoding="utf-8").rstrip("\n")
    path.write_text(text[: text.rindex(",")], encoding="utf-8")  # last row loses winner_tie
    with pytest.raises(DataError) as info:
        read_table(path)
    assert info.value.row_id == str(df["id"].iloc[-1])
    assert info.value.column == "winner_tie"
    assert "column 'winner_tie': the last row ends early (the cell is missing" in str(info.value)


def test_unsupported_and_broken_jsonl(tmp_path):
    txt = tmp_path / "pairs.txt"
    txt.write_text("x")
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'"):
        read_table(txt)
    jl = tmp_path / "pairs.jsonl"
    jl.write_text('{"id": 1, "prompt": "[\\"a\\"]"}\n{"id": 2, "prompt": "[\\"b', encoding="utf-8")
    with pytest.raises(DataError, match=r"pairs\.jsonl: line 2 is not valid JSON"):
        read_table(jl)


# --- predictions ----------------------------------------------------------------------------


def _write_preds(tmp_path, rows, columns=PROB_COLUMNS, name="preds.parquet"):
    df = pd.DataFrame(rows, columns=["id", *columns])
    path = tmp_path / name
    if name.endswith(".csv"):
        df.to_csv(path, index=False)
    else:
        df.to_parquet(path)
    return path


def test_read_predictions_valid(tmp_path):
    path = _write_preds(tmp_path, [["a", 0.2, 0.5, 0.3], ["b", 1.0, 0.0, 0.0], ["c", 0.3333, 0.3333, 0.3334]])
    got = read_predictions(path)
    assert list(got.columns) == ["id", "p_a", "p_b", "p_tie"]
    assert got["p_b"].tolist() == [0.5, 0.0, 0.3333]
    # Kaggle submission layout: winner_* columns as probabilities, integer ids in a CSV
    sub = _write_preds(tmp_path, [[136060, 0.4, 0.4, 0.2001]], columns=LABEL_COLUMNS, name="submission.csv")
    got = read_predictions(sub)
    assert got["id"].tolist() == ["136060"]
    assert got[list(PROB_COLUMNS)].to_numpy().tolist() == [[0.4, 0.4, 0.2001]]


@pytest.mark.parametrize(
    "rows, expected",
    [
        ([["a", 0.2, 0.5, 0.3], ["b", np.nan, 0.5, 0.5]],
         "row id=b: column 'p_a': probability is nan (1 such rows). Probabilities must be finite"),
        ([["a", 0.2, np.inf, 0.3]], "row id=a: column 'p_b': probability is inf (1 such rows)"),
        ([["a", 0.2, 0.5, 0.3], ["b", 1.2, -0.1, -0.1]],
         "row id=b: column 'p_a': probability 1.2 is outside [0, 1] (1 such rows)"),
        ([["a", 0.2, 0.5, 0.3], ["b", 0.2, 0.5, 0.2], ["c", 0.5, 0.5, 0.5]],
         "row id=b: column 'p_a,p_b,p_tie': probabilities sum to 0.9, not 1 within 0.001 (2 such rows). "
         "Normalise each row to sum to 1."),
        ([["a", 0.2, 0.5, 0.3], ["a", 0.2, 0.5, 0.3]], "row id=a: column 'id': duplicate id (1 repeated rows)"),
    ],
)
def test_read_predictions_errors(tmp_path, rows, expected):
    path = _write_preds(tmp_path, rows)
    with pytest.raises(DataError) as info:
        read_predictions(path)
    msg = _one_line(info.value)
    assert msg.startswith(f"{path}: ")
    assert expected in msg


def test_read_predictions_missing_columns(tmp_path):
    path = tmp_path / "p.parquet"
    pd.DataFrame({"id": ["a"], "p_a": [1.0]}).to_parquet(path)
    with pytest.raises(DataError) as info:
        read_predictions(path)
    assert info.value.column == "p_b"
    assert "no probability columns: expected p_a, p_b, p_tie or winner_model_a" in str(info.value)


def test_compressed_jsonl_and_csv(tmp_path, sample):
    import gzip

    rows = sample.head(4)[["id", *TEXT_COLUMNS]]
    text = "\n".join(json.dumps(r) for r in rows.to_dict("records"))
    (tmp_path / "p.jsonl.gz").write_bytes(gzip.compress(text.encode("utf-8")))
    assert read_table(tmp_path / "p.jsonl.gz")["prompt"].tolist() == rows["prompt"].tolist()
    rows.to_csv(tmp_path / "p.csv.gz", index=False)
    assert read_table(tmp_path / "p.csv.gz")["response_a"].tolist() == rows["response_a"].tolist()
