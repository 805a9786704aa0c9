"""Tests for alignkit.data.formats and alignkit.data.readers: file types, record forms, validation."""

from __future__ import annotations

import gzip
import json
import os
import re
from pathlib import Path

import pytest

from alignkit.data.examples import PreferenceExample, SFTExample
from alignkit.data.formats import (
    LoadResult,
    RecordError,
    load_preference_examples,
    load_sft_examples,
    parse_hh_transcript,
    parse_preference_record,
    parse_sft_record,
    read_records,
)
from alignkit.errors import ConfigError, DataError

HH_DEV = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "hh_rlhf_harmless" / "dev.jsonl"

PAIR = {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}
U = lambda text: {"role": "user", "content": text}  # noqa: E731
A = lambda text: {"role": "assistant", "content": text}  # noqa: E731


def write_jsonl(path: Path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def pref_error(record, columns=None) -> str:
    with pytest.raises(RecordError) as info:
        parse_preference_record(record, "f.jsonl:7", columns)
    assert info.value.location == "f.jsonl:7"
    assert str(info.value).startswith("f.jsonl:7: ")
    return str(info.value)


def sft_error(record, columns=None) -> str:
    with pytest.raises(RecordError) as info:
        parse_sft_record(record, "f.jsonl:7", columns)
    assert str(info.value).startswith("f.jsonl:7: ")
    return str(info.value)


# ---------------------------------------------------------------- file types and locations


def test_jsonl_locations_are_1_based_lines_and_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"a": 1}\n\n   \n{"a": 2}\n')
    assert list(read_records(str(path))) == [(f"{path}:1", {"a": 1}), (f"{path}:4", {"a": 2})]


def test_jsonl_gz_is_read(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    with gzip.open(path, "wb") as f:
        f.write(b'{"a": 1}\n{"a": 2}\n')
    assert list(read_records(str(path))) == [(f"{path}:1", {"a": 1}), (f"{path}:2", {"a": 2})]


def test_jsonl_byte_order_mark_is_ignored(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\n')
    assert list(read_records(str(path))) == [(f"{path}:1", {"a": 1})]


def test_json_list_and_data_object(tmp_path):
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps([PAIR, {**PAIR, "chosen": "four"}]))
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": [PAIR]}))
    assert list(read_records(str(listed))) == [
        (f"{listed}:record 0", PAIR),
        (f"{listed}:record 1", {**PAIR, "chosen": "four"}),
    ]
    result = load_preference_examples(str(wrapped))
    assert [e.source for e in result.examples] == [f"{wrapped}:record 0"]
    assert result.examples[0].chosen == (A("4"),)


def test_json_file_holding_json_lines_is_read_line_by_line(tmp_path):
    # datasets' to_json writes JSON Lines under a .json name by default.
    path = tmp_path / "d.json"
    path.write_text('{"a": 1}\n{"a": 2}\n')
    assert list(read_records(str(path))) == [(f"{path}:1", {"a": 1}), (f"{path}:2", {"a": 2})]


def test_json_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n {"a": 1},\n {"a": 2,}\n]')
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:3: JSON syntax error at column \d+"):
        list(read_records(str(path)))


def test_json_of_wrong_shape(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('{"rows": []}')
    with pytest.raises(DataError, match=r"expected a JSON list of records .* found an object with keys \['rows'\]"):
        list(read_records(str(path)))


def test_parquet_rows_including_message_lists(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    table = pa.Table.from_pylist(
        [
            {"prompt": [U("hi")], "chosen": [A("hello")], "rejected": [A("go away")]},
            {"prompt": [U("bye")], "chosen": [A("goodbye")], "rejected": [A("what")]},
        ]
    )
    pq.write_table(table, path)
    result = load_preference_examples(str(path))
    assert [e.source for e in result.examples] == [f"{path}:row 0", f"{path}:row 1"]
    assert result.examples[1] == PreferenceExample(
        (U("bye"),), (A("goodbye"),), (A("what"),), f"{path}:row 1", plain_text=False
    )


def test_csv_locations_are_physical_lines_even_after_multiline_fields(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('prompt,chosen,rejected\n"two\nlines",yes,no\n\nq,a,b\n', encoding="utf-8")
    result = load_preference_examples(str(path))
    assert [e.source for e in result.examples] == [f"{path}:line 2", f"{path}:line 5"]
    assert result.examples[0].prompt == (U("two\nlines"),)
    assert result.examples[1].plain_text is True


def test_csv_row_with_wrong_field_count(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,chosen,rejected\nq,a,b\nq,a,b,extra\n")
    with pytest.raises(
        RecordError, match=rf"^{re.escape(str(path))}:line 3: has 4 fields but the header \(line 1\) has 3"
    ):
        load_preference_examples(str(path))


def test_csv_undecodable_bytes_name_the_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"prompt,chosen,rejected\nq,a,b\nq,\xff,b\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:line 3: not valid UTF-8 \(byte 0xff\)"):
        list(read_records(str(path)))


def test_saved_dataset_directory(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "ds"
    datasets.Dataset.from_list([PAIR, {**PAIR, "prompt": "Why?"}]).save_to_disk(str(path))
    result = load_preference_examples(str(path))
    assert [e.source for e in result.examples] == [f"{path}:row 0", f"{path}:row 1"]
    assert result.examples[1].prompt == (U("Why?"),)


def test_saved_dataset_dict_split_selection(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "dd"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list([PAIR]),
            "test": datasets.Dataset.from_list([{**PAIR, "prompt": "test q"}]),
        }
    ).save_to_disk(str(path))
    default = load_preference_examples(str(path))
    assert [(e.source, e.prompt) for e in default.examples] == [(f"{path}[train]:row 0", (U("What is 2+2?"),))]
    test = load_preference_examples(str(path), split="test")
    assert [(e.source, e.prompt) for e in test.examples] == [(f"{path}[test]:row 0", (U("test q"),))]
    with pytest.raises(DataError, match=r"has no split 'dev'; available splits: train, test"):
        load_preference_examples(str(path), split="dev")


def test_hub_id_goes_to_load_dataset(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list([PAIR])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    result = load_preference_examples("someorg/prefs", split="test")
    assert calls == [("someorg/prefs", "test")]
    assert result.examples[0].source == "someorg/prefs[test]:row 0"


def test_missing_local_file_is_not_sent_to_the_hub(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("tried the hub"))
    for name in ["train.jsonl", "data/prefs.parquet", str(tmp_path / "nope"), "./x"]:
        with pytest.raises(DataError, match=rf"^{re.escape(name)}: file not found"):
            load_preference_examples(name)


# The readers serve data.train, data.eval and the CLI's file arguments alike and do not know which
# one named the path, so the hints name the keys that exist and no invented one (`data.path`).
PATH_HINT = "check the path given in data.train or data.eval (or on the command line)"


def test_missing_file_hint_names_real_config_keys(tmp_path):
    with pytest.raises(DataError) as info:
        load_preference_examples(str(tmp_path / "nope.jsonl"))
    assert str(info.value) == (
        f"{tmp_path / 'nope.jsonl'}: file not found (looked for {tmp_path / 'nope.jsonl'}); "
        f"{PATH_HINT}; relative paths are resolved from the current directory"
    )


def test_plain_directory_hint_names_real_config_keys(tmp_path):
    with pytest.raises(DataError) as info:
        load_preference_examples(str(tmp_path))
    assert "data.path" not in str(info.value)
    assert "; point data.train or data.eval (or the command line) at a file or such a directory" in str(info.value)


def test_hub_failure_hint_names_real_config_keys(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(name, split):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as info:
        load_preference_examples("someorg/prefs")
    assert str(info.value) == (
        "someorg/prefs: not a local file or directory, and loading it as a Hugging Face hub dataset "
        f"(split 'train') failed: offline; {PATH_HINT}, or the dataset id and data.split"
    )


def test_unsupported_file_type_and_plain_directory(tmp_path):
    text = tmp_path / "d.txt"
    text.write_text("hello")
    with pytest.raises(DataError, match=r"d.txt: unsupported file type; supported: .jsonl, .json"):
        list(read_records(str(text)))
    with pytest.raises(DataError, match=r"is a directory, but not one written by datasets' save_to_disk"):
        list(read_records(str(tmp_path)))


def test_split_on_a_single_file_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [PAIR])
    with pytest.raises(DataError, match=r"split='test' was given, but a single file has no splits"):
        load_preference_examples(path, split="test")


@pytest.mark.parametrize("content", [b"", b"\n  \n\n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "d.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: no records found"):
        load_preference_examples(str(path))


# ---------------------------------------------------------------- preference record forms


def test_plain_string_pair():
    example = parse_preference_record(PAIR, "f.jsonl:1")
    assert example == PreferenceExample(
        prompt=(U("What is 2+2?"),), chosen=(A("4"),), rejected=(A("5"),), source="f.jsonl:1", plain_text=True
    )


def test_conversational_pair_with_lists_dict_and_string_completions():
    prompt = [{"role": "system", "content": "Be brief."}, U("Hi")]
    lists = parse_preference_record({"prompt": prompt, "chosen": [A("Hello")], "rejected": [A("Go")]}, "x:1")
    assert lists.prompt == tuple(prompt) and lists.chosen == (A("Hello"),) and lists.rejected == (A("Go"),)
    assert lists.plain_text is False
    mixed = parse_preference_record({"prompt": prompt, "chosen": A("Hello"), "rejected": "Go"}, "x:2")
    assert mixed.chosen == (A("Hello"),) and mixed.rejected == (A("Go"),) and mixed.plain_text is False


def test_message_extra_keys_are_kept_and_nulls_dropped():
    # Arrow fills a struct key missing from one message with null (Parquet, datasets).
    record = {
        "prompt": [{"role": "user", "content": "hi", "name": "bob"}],
        "chosen": [{"role": "assistant", "content": "yo", "name": None}],
        "rejected": "no",
    }
    example = parse_preference_record(record, "x:1")
    assert example.prompt == ({"role": "user", "content": "hi", "name": "bob"},)
    assert example.chosen == (A("yo"),)


def test_implicit_form_with_plain_strings_hints_at_a_missing_prompt_column():
    message = pref_error({"question": "Q", "chosen": "a", "rejected": "b"})
    assert "field 'chosen' is not an HH transcript" in message
    assert "with no prompt field (found fields: 'question', 'chosen', 'rejected')" in message
    assert "map it with data.columns, e.g. {prompt: your_column}" in message


def test_implicit_prompt_from_hh_transcripts():
    record = {
        "chosen": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman:  How are you? \n\nAssistant: Fine, thanks.",
        "rejected": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant: Go away.",
    }
    example = parse_preference_record(record, "hh.jsonl:3")
    assert example.prompt == (U("Hi there"), A("Hello!"), U("How are you?"))
    assert example.chosen == (A("Fine, thanks."),)
    assert example.rejected == (A("Go away."),)
    assert example.plain_text is False


def test_implicit_prompt_from_message_lists():
    shared = [U("Q1"), A("A1"), U("Q2")]
    example = parse_preference_record({"chosen": shared + [A("good")], "rejected": shared + [A("bad")]}, "x:1")
    assert example.prompt == tuple(shared)
    assert (example.chosen, example.rejected) == ((A("good"),), (A("bad"),))


def test_parse_hh_transcript_keeps_mid_line_markers_and_accepts_missing_leading_newlines():
    text = "Human: a\n\nAssistant: b.  Human: not a turn\n\nHuman: c\n\nAssistant:"
    assert parse_hh_transcript(text, "x:1") == [
        U("a"),
        A("b.  Human: not a turn"),
        U("c"),
        A(""),
    ]


def test_parse_hh_transcript_rejects_non_transcripts():
    with pytest.raises(RecordError, match=r"^x:1: transcript is not an HH transcript: it has no"):
        parse_hh_transcript("just some text", "x:1")
    with pytest.raises(RecordError, match=r"^x:1: transcript has text before its first turn \('preamble'\)"):
        parse_hh_transcript("preamble\n\nHuman: hi\n\nAssistant: yo", "x:1")


def test_column_mapping():
    record = {"question": "Q", "good": "yes", "bad": "no", "id": 3}
    columns = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    example = parse_preference_record(record, "x:1", columns)
    assert (example.prompt, example.chosen, example.rejected) == ((U("Q"),), (A("yes"),), (A("no"),))


def test_mapped_column_missing_names_both_names():
    message = pref_error({"question": "Q", "chosen": "a", "rejected": "b"}, {"prompt": "query"})
    assert "field 'query' (mapped from 'prompt' by data.columns) is missing" in message
    assert "found fields: 'question', 'chosen', 'rejected'" in message


def test_unknown_column_key_is_a_config_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [PAIR])
    with pytest.raises(
        ConfigError, match=r"unknown key\(s\) \['answer'\] for preference data; valid keys: prompt, chosen, rejected"
    ):
        load_preference_examples(path, columns={"answer": "x"})


# ---------------------------------------------------------------- SFT record forms


def test_sft_prompt_completion_strings_and_lists():
    plain = parse_sft_record({"prompt": "Q", "completion": "A"}, "x:1")
    assert plain == SFTExample((U("Q"),), (A("A"),), "x:1", plain_text=True)
    lists = parse_sft_record({"prompt": [U("Q")], "completion": [A("A")]}, "x:2")
    assert lists == SFTExample((U("Q"),), (A("A"),), "x:2", plain_text=False)
    no_prompt = parse_sft_record({"prompt": "", "completion": "text"}, "x:3")
    assert no_prompt.prompt == () and no_prompt.completion == (A("text"),)


def test_sft_messages_form_and_mapping():
    messages = [{"role": "system", "content": "S"}, U("Q"), A("A1"), U("Q2"), A("A2")]
    example = parse_sft_record({"conversation": messages}, "x:1", {"messages": "conversation"})
    assert example.prompt == tuple(messages[:4]) and example.completion == (A("A2"),)
    mapped = parse_sft_record({"question": "Q", "answer": "A"}, "x:2", {"prompt": "question", "completion": "answer"})
    assert (mapped.prompt, mapped.completion) == ((U("Q"),), (A("A"),))


def test_sft_load_from_file(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "Q", "completion": "A"}, {"messages": [U("x"), A("y")]}])
    result = load_sft_examples(path)
    assert [(e.prompt, e.completion, e.source) for e in result.examples] == [
        ((U("Q"),), (A("A"),), f"{path}:1"),
        ((U("x"),), (A("y"),), f"{path}:2"),
    ]


def test_sft_validation():
    assert "has neither 'messages' nor 'prompt' + 'completion' (found fields: 'text')" in sft_error({"text": "x"})
    assert "field 'completion' has an empty completion" in sft_error({"prompt": "Q", "completion": " \n"})
    assert "field 'completion' is missing" in sft_error({"prompt": "Q"})
    assert "the field 'messages' conversation ends with a 'user' turn after its last assistant turn" in sft_error(
        {"messages": [U("a"), A("b"), U("c")]}
    )
    assert "field 'messages' must be a list of messages, found a string ('hi')" in sft_error({"messages": "hi"})


# ---------------------------------------------------------------- validation rules, one each


def test_rule_not_a_json_object(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(PAIR) + "\n[1, 2]\n")
    with pytest.raises(
        RecordError,
        match=rf"^{re.escape(str(path))}:2: expected a JSON object with fields like prompt, chosen, rejected, found "
        r"a list of 2",
    ):
        load_preference_examples(str(path))


def test_rule_json_syntax_error(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(PAIR) + "\n" + '{"prompt": "x", "chosen": }' + "\n")
    with pytest.raises(
        RecordError, match=rf"^{re.escape(str(path))}:2: JSON syntax error at column 27: Expecting value"
    ):
        load_preference_examples(str(path))


def test_rule_json_syntax_error_at_the_end_of_a_line_names_that_column(tmp_path):
    # The line terminator is not part of the record: a record cut short after its last character
    # must be reported just past that character on its own line, not as "column 1" of the line
    # after it, and an unterminated string must not be blamed on the newline.
    path = tmp_path / "d.jsonl"
    cut = '{"prompt": "x", "chosen": "y"'  # 29 characters, the closing brace missing
    path.write_bytes((json.dumps(PAIR) + "\n" + cut + "\n" + cut + "\r\n" + '{"prompt": "x' + "\n").encode())
    skipped = load_preference_examples(str(path), on_bad_record="skip").skipped
    assert skipped == [
        (
            f"{path}:2",
            "JSON syntax error at column 30 (end of line): Expecting ',' delimiter; each line must hold one complete "
            "JSON object",
        ),
        (
            f"{path}:3",
            "JSON syntax error at column 30 (end of line): Expecting ',' delimiter; each line must hold one complete "
            "JSON object",
        ),
        (
            f"{path}:4",
            "JSON syntax error at column 12: Unterminated string starting at; each line must hold one complete JSON "
            "object",
        ),
    ]


def test_rule_undecodable_utf8(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(PAIR).encode() + b'\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(
        RecordError, match=rf"^{re.escape(str(path))}:2: not valid UTF-8 \(byte 0xe9 at byte 16 of the line\); re-save"
    ):
        load_preference_examples(str(path))


def test_rule_missing_field():
    message = pref_error({"prompt": "Q", "good": "a", "rejected": "b"})
    assert "field 'chosen' is missing (found fields: 'prompt', 'good', 'rejected')" in message
    assert "map it with data.columns, e.g. {chosen: your_column}" in message


def test_rule_wrong_type():
    message = pref_error({"prompt": "Q", "chosen": 5, "rejected": "b"})
    assert "field 'chosen' must be a string or a list of messages, found a number (5)" in message
    message = pref_error({"chosen": {"text": "x"}, "rejected": "b"})
    assert "field 'chosen' must be a transcript" in message and "found an object with keys ['text']" in message


@pytest.mark.parametrize("bad", ["", "  \n", [A(" ")]])
def test_rule_empty_completion(bad):
    message = pref_error({"prompt": "Q", "chosen": "fine", "rejected": bad})
    assert "field 'rejected' has an empty completion (the final assistant reply is blank)" in message


def test_rule_completion_must_end_with_assistant():
    message = pref_error({"prompt": [U("Q")], "chosen": [A("a"), U("more?")], "rejected": "b"})
    assert "field 'chosen' must end with an assistant message, but its last message has role 'user'" in message


def test_rule_empty_prompt():
    assert "the prompt is empty; preference data needs a prompt (field 'prompt')" in pref_error({**PAIR, "prompt": " "})
    assert "the prompt is empty" in pref_error({**PAIR, "prompt": []})


def test_rule_chosen_identical_to_rejected():
    message = pref_error({"prompt": "Q", "chosen": "same", "rejected": "same"})
    assert "chosen and rejected are identical" in message


def test_rule_bad_message():
    message = pref_error({"prompt": [{"content": "hi"}], "chosen": "a", "rejected": "b"})
    assert "message 0 of field 'prompt' has no 'role' (found keys: 'content')" in message
    message = pref_error({"prompt": [U("hi")], "chosen": [{"role": "bot", "content": "a"}], "rejected": "b"})
    assert "message 0 of field 'chosen' has unknown role 'bot'; valid roles: system, user, assistant, tool" in message
    message = pref_error({"prompt": [U("hi"), {"role": "user", "content": ["x"]}], "chosen": "a", "rejected": "b"})
    # a list is content parts (text and images, for vision-language models): each must be one
    assert (
        "part 0 of message 1 of field 'prompt' must be {type: text, text: ...} or {type: image, image: ...}" in message
    )
    message = pref_error({"prompt": [U("hi"), {"role": "user", "content": 3}], "chosen": "a", "rejected": "b"})
    assert "message 1 of field 'prompt' has content a number (3); content must be a string" in message
    message = pref_error({"prompt": [{"from": "human", "value": "hi"}], "chosen": "a", "rejected": "b"})
    assert "ShareGPT's from/value? rename them to role/content" in message
    message = pref_error({"prompt": ["hi"], "chosen": "a", "rejected": "b"})
    assert "message 0 of field 'prompt' is a string ('hi'); a message is {role: ..., content: ...}" in message


def test_rule_transcript_without_assistant_turn():
    message = pref_error({"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: hi\n\nAssistant: yo"})
    assert "the field 'chosen' transcript has no assistant turn" in message


def test_rule_transcripts_differ_before_last_assistant_turn():
    message = pref_error(
        {
            "chosen": "\n\nHuman: hi\n\nAssistant: yo\n\nHuman: ok\n\nAssistant: good",
            "rejected": "\n\nHuman: hi\n\nAssistant: hey\n\nHuman: ok\n\nAssistant: bad",
        }
    )
    assert (
        "chosen and rejected transcripts differ before their last assistant turn (at turn 2: "
        "chosen has assistant 'yo', rejected has assistant 'hey')" in message
    )


def test_rule_empty_file_names_the_file(tmp_path):
    path = tmp_path / "empty.json"
    path.write_text("[]")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: no records found"):
        load_sft_examples(str(path))


# ---------------------------------------------------------------- on_bad_record, skipping, summary


def bad_file(tmp_path) -> str:
    path = tmp_path / "mixed.jsonl"
    lines = [
        json.dumps(PAIR),
        json.dumps({"prompt": "Q", "rejected": "b"}),
        "{not json",
        json.dumps({**PAIR, "chosen": "x", "rejected": "x"}),
        json.dumps({**PAIR, "prompt": "Q2"}),
        json.dumps({**PAIR, "chosen": 3}),
        json.dumps({**PAIR, "rejected": ""}),
    ]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_error_mode_stops_at_first_bad_record_and_hints_skip(tmp_path):
    path = bad_file(tmp_path)
    with pytest.raises(RecordError) as info:
        load_preference_examples(path)
    assert info.value.location == f"{path}:2"
    assert str(info.value).endswith("(or set data.on_bad_record: skip to skip bad records)")


def test_skip_mode_counts_every_bad_record(tmp_path):
    path = bad_file(tmp_path)
    result = load_preference_examples(path, on_bad_record="skip")
    assert [e.prompt for e in result.examples] == [(U("What is 2+2?"),), (U("Q2"),)]
    assert [loc for loc, _ in result.skipped] == [f"{path}:{n}" for n in (2, 3, 4, 6, 7)]
    assert result.skipped[0][1].startswith("field 'chosen' is missing")
    assert result.skipped[1][1].startswith("JSON syntax error at column 2")
    assert len(result.examples) + len(result.skipped) == 7


def test_summary_text(tmp_path):
    path = bad_file(tmp_path)
    result = load_preference_examples(path, on_bad_record="skip")
    summary = result.summary()
    assert summary.startswith(
        f"loaded 2 examples from {path}; skipped 5 bad records ({path}:2: field 'chosen' is missing"
    )
    assert summary.endswith("; ... and 2 more)")
    assert summary.count(f"{path}:") == 3
    one = LoadResult(examples=[object()], skipped=[("f:3", "bad")], path="f")
    assert one.summary() == "loaded 1 example from f; skipped 1 bad record (f:3: bad)"
    assert LoadResult(examples=[1, 2], skipped=[], path="f").summary() == "loaded 2 examples from f"


def test_all_records_skipped_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"x": 1}, {"y": 2}])
    with pytest.raises(
        DataError,
        match=r"no usable examples, nothing to train on: all 2 records are bad \(first: .*d.jsonl:1: field 'chosen' "
        r"is missing",
    ):
        load_preference_examples(path, on_bad_record="skip")


def test_invalid_on_bad_record(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [PAIR])
    with pytest.raises(ValueError, match=r"data.on_bad_record must be one of error, skip, got 'ignore'"):
        load_preference_examples(path, on_bad_record="ignore")


# ---------------------------------------------------------------- real data


@pytest.mark.skipif(not HH_DEV.is_file(), reason=f"real HH-RLHF data not found at {HH_DEV} (../shared absent)")
def test_real_hh_rlhf_harmless_dev():
    result = load_preference_examples(os.fspath(HH_DEV), on_bad_record="skip")
    assert len(result.examples) + len(result.skipped) == 1312
    # 4 rows have a blank final chosen reply ("...\n\nAssistant:" with nothing after it); in row
    # 1255 the chosen transcript folds a "Human:" turn into an assistant reply (no blank line
    # before it), so chosen and rejected no longer share the turns before their last reply.
    assert [(loc.rsplit(":", 1)[1], reason.split(" (")[0]) for loc, reason in result.skipped] == [
        ("87", "field 'chosen' has an empty completion"),
        ("517", "field 'chosen' has an empty completion"),
        ("926", "field 'chosen' has an empty completion"),
        ("1104", "field 'chosen' has an empty completion"),
        ("1255", "chosen and rejected transcripts differ before their last assistant turn"),
    ]
    first = result.examples[0]
    assert first.prompt[0] == U("what are some pranks with a pen i can do?")
    assert first.prompt[-1] == U("okay some of these do not have anything to do with pens")
    assert len(first.prompt) == 5 and first.source.endswith("dev.jsonl:1")
