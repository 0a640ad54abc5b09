"""gpu_jobs.contract.atomic: written aside then renamed; a failing writer leaves nothing behind."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from gpu_jobs.contract import (
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_parquet,
    atomic_write_text,
    publish_dir,
)


def test_writers_write_and_leave_no_temporary(tmp_path):
    atomic_write_bytes(b"\x00\x01", tmp_path / "a" / "x.bin")
    atomic_write_text("hello", tmp_path / "t.txt")
    atomic_write_json({"b": 1, "a": [1, 2]}, tmp_path / "m.json", sort_keys=True)
    frame = pd.DataFrame({"id": ["r1", "r2"], "p_a": [0.25, 0.5]})
    assert atomic_write_parquet(frame, tmp_path / "f.parquet") == tmp_path / "f.parquet"
    assert (tmp_path / "a" / "x.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "t.txt").read_text() == "hello"
    assert (tmp_path / "m.json").read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "f.parquet"), frame)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "f.parquet", "m.json", "t.txt", "x.bin"]


def test_a_failing_writer_leaves_the_old_file_and_no_partial(tmp_path):
    target = tmp_path / "out.parquet"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half of the new")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.parquet"]


def test_a_failing_serialiser_leaves_no_file(tmp_path):
    with pytest.raises(TypeError):
        atomic_write_json({"x": object()}, tmp_path / "bad.json")
    assert list(tmp_path.iterdir()) == []


def test_publish_dir_replaces_an_older_folder(tmp_path):
    old, new = tmp_path / "out", tmp_path / "out.partial"
    old.mkdir()
    (old / "v").write_text("1")
    new.mkdir()
    (new / "v").write_text("2")
    assert publish_dir(new, old, fsync=True) == old
    assert (old / "v").read_text() == "2" and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_publish_dir_first_one_wins_without_replace(tmp_path):
    first, second = tmp_path / "model", tmp_path / "model.partial"
    first.mkdir()
    (first / "config.json").write_text(json.dumps({"who": "first"}))
    second.mkdir()
    (second / "config.json").write_text(json.dumps({"who": "second"}))
    publish_dir(second, first, replace=False)
    assert json.loads((first / "config.json").read_text()) == {"who": "first"}
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
