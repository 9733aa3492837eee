"""Loading user records: JSONL / JSON / Parquet / save_to_disk, with file:line:field errors."""

import json

import datasets
import pytest

from safer_dist.data.records import DataError, load_records, read_jsonl, write_jsonl
from safer_dist.reasoning.exante import Trace, render

RESPONSE = render(Trace("Intent: cook rice. Risk category: none.", "No rule applies; verdict: not violated.",
                        "Strategy: comply. Help.", "Rinse the rice first."))


def _lines(path, *lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_write_and_read_jsonl_round_trip(tmp_path):
    records = [{"prompt": "héllo", "n": 1}, {"prompt": "x", "nested": {"a": [1, 2]}}]
    path = write_jsonl(tmp_path / "sub" / "r.jsonl", records)
    assert read_jsonl(path) == records
    assert path.read_text(encoding="utf-8").splitlines()[0] == '{"prompt": "héllo", "n": 1}'
    assert [p.name for p in path.parent.iterdir()] == ["r.jsonl"]  # no temporary file left


def test_write_jsonl_keeps_old_file_on_failure(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [{"a": 1}])

    def broken():
        yield {"a": 2}
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_jsonl(path, broken())
    assert read_jsonl(path) == [{"a": 1}]
    assert [p.name for p in tmp_path.iterdir()] == ["r.jsonl"]


def test_load_prompts_fills_ids_and_keeps_extra_fields(tmp_path):
    path = _lines(tmp_path / "pool.jsonl",
                  json.dumps({"prompt": "a"}),
                  "",
                  json.dumps({"prompt": "b", "id": "mine", "harmful": True, "source": "web"}),
                  json.dumps({"prompt": "c", "strategy": "comply", "kind": "benign", "category": "none"}))
    ds = load_records(path, "prompts")
    assert isinstance(ds, datasets.Dataset)
    assert ds["id"] == ["pool-0", "mine", "pool-2"]
    # fields first seen in a later record are kept (Dataset.from_list alone would drop them)
    assert ds["source"] == [None, "web", None]
    assert ds["strategy"] == [None, None, "comply"]
    assert ds["harmful"] == [None, True, None]


def test_load_sft(tmp_path):
    path = _lines(tmp_path / "sft.jsonl", json.dumps({"prompt": "rice?", "response": RESPONSE}))
    assert load_records(path, "sft")["response"] == [RESPONSE]
    with pytest.raises(ValueError, match="unknown record kind 'chat'"):
        load_records(path, "chat")


def test_json_array_file(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"prompt": "a"}, {"prompt": ""}]))
    with pytest.raises(DataError, match=r"p\.json: item 1: field 'prompt': expected a non-empty string, got ''"):
        load_records(path, "prompts")
    path.write_text(json.dumps([{"prompt": "a"}]))
    assert load_records(path, "prompts")["id"] == ["p-0"]


JSONL_ERRORS = [
    ("invalid json", ['{"prompt": "a"}', '{"prompt": "b" "x": 1}'], "prompts",
     "{p}:2: invalid JSON: Expecting ',' delimiter (col 16)"),
    ("missing field", ['{"prompt": "a"}', '', '{"text": "b"}'], "prompts", "{p}:3: missing field 'prompt'"),
    ("wrong type", ['{"prompt": 3}'], "prompts", "{p}:1: field 'prompt': expected a non-empty string, got 3"),
    ("blank prompt", ['{"prompt": "  "}'], "prompts", "{p}:1: field 'prompt': expected a non-empty string, got '  '"),
    ("not an object", ['["prompt"]'], "prompts", "{p}:1: expected a JSON object, got list"),
    ("harmful not bool", ['{"prompt": "a", "harmful": "yes"}'], "prompts",
     "{p}:1: field 'harmful': expected a boolean, got 'yes'"),
    ("harmful int", ['{"prompt": "a", "harmful": 1}'], "prompts", "{p}:1: field 'harmful': expected a boolean, got 1"),
    ("id not str", ['{"prompt": "a", "id": 7}'], "prompts", "{p}:1: field 'id': expected a string, got 7"),
    ("unknown strategy", ['{"prompt": "a", "strategy": "refuse"}'], "prompts",
     "{p}:1: field 'strategy': expected one of comply, comply_with_safeguards, refuse_and_redirect, got 'refuse'"),
    ("duplicate id", ['{"prompt": "a", "id": "x"}', '{"prompt": "b", "id": "x"}'], "prompts",
     "{p}:2: field 'id': duplicate id 'x' (first at {p}:1)"),
    ("mixed extra types", ['{"prompt": "a", "score": 1}', '{"prompt": "b", "score": "high"}'], "prompts",
     "{p}:2: field 'score': expected number (as at {p}:1), got 'high'"),
    ("sft missing response", ['{"prompt": "a"}'], "sft", "{p}:1: missing field 'response'"),
    ("sft malformed response", ['{"prompt": "a", "response": "just an answer"}'], "sft",
     "{p}:1: field 'response': not a valid Ex-Ante trace: missing <ex_ante>"),
    ("empty file", [], "prompts", "{p}: empty dataset (no records)"),
    ("only blank lines", ["", "   "], "prompts", "{p}: empty dataset (no records)"),
]


@pytest.mark.parametrize("what,lines,kind,message", JSONL_ERRORS, ids=[e[0] for e in JSONL_ERRORS])
def test_jsonl_errors_name_file_line_and_field(tmp_path, what, lines, kind, message):
    path = _lines(tmp_path / "x.jsonl", *lines)
    with pytest.raises(DataError) as info:
        load_records(path, kind)
    assert str(info.value) == message.format(p=path)
    assert isinstance(info.value, ValueError)


def test_sft_format_check_can_be_disabled(tmp_path):
    path = _lines(tmp_path / "x.jsonl", '{"prompt": "a", "response": "plain answer"}')
    assert load_records(path, "sft", check_format=False)["response"] == ["plain answer"]


def test_path_errors(tmp_path):
    with pytest.raises(DataError) as info:
        load_records(tmp_path / "nonexistent.jsonl", "prompts")
    assert str(info.value) == f"{tmp_path / 'nonexistent.jsonl'}: no such file or directory"
    with pytest.raises(DataError, match="nonexistent: no such file or directory"):
        read_jsonl(tmp_path / "nonexistent")
    csv = tmp_path / "x.csv"
    csv.write_text("prompt\na\n")
    with pytest.raises(DataError, match=r"x\.csv: unsupported file type '\.csv'"):
        load_records(csv, "prompts")
    (tmp_path / "not_a_dataset").mkdir()
    with pytest.raises(DataError, match="not_a_dataset: not a directory written by Dataset.save_to_disk"):
        load_records(tmp_path / "not_a_dataset", "prompts")


def test_parquet_round_trip_and_row_errors(tmp_path):
    rows = [{"prompt": "a", "response": RESPONSE, "harmful": False, "score": 0.5},
            {"prompt": "b", "response": RESPONSE, "harmful": True, "score": 1.5}]
    path = tmp_path / "train.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    ds = load_records(path, "sft", cache_dir=tmp_path / "cache")
    assert ds["id"] == ["train-0", "train-1"]
    assert ds.select_columns(["prompt", "response", "harmful", "score"]).to_list() == rows

    datasets.Dataset.from_list([{"prompt": "a", "strategy": "comply"},
                                {"prompt": "b", "strategy": "maybe"}]).to_parquet(str(path))
    with pytest.raises(DataError) as info:
        load_records(path, "prompts", cache_dir=tmp_path / "cache")
    assert str(info.value) == (f"{path}: row 1: field 'strategy': expected one of comply, "
                               "comply_with_safeguards, refuse_and_redirect, got 'maybe'")
    datasets.Dataset.from_list([{"text": "a"}]).to_parquet(str(path))
    with pytest.raises(DataError, match=r"train\.parquet: missing field 'prompt' \(columns: text\)"):
        load_records(path, "prompts", cache_dir=tmp_path / "cache")
    datasets.Dataset.from_list([{"prompt": "a"}]).select([]).to_parquet(str(path))
    with pytest.raises(DataError, match=r"train\.parquet: empty dataset \(no records\)"):
        load_records(path, "prompts", cache_dir=tmp_path / "cache")
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(DataError, match=r"bad\.parquet: cannot read Parquet"):
        load_records(bad, "prompts", cache_dir=tmp_path / "cache")


def test_save_to_disk_round_trip_and_errors(tmp_path):
    rows = [{"id": "q1", "prompt": "a", "kind": "benign"}, {"id": "q2", "prompt": "b", "kind": "harmful"}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "pool"))
    ds = load_records(tmp_path / "pool", "prompts")
    assert ds.to_list() == rows

    datasets.Dataset.from_list([{"prompt": "a"}, {"prompt": ""}]).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DataError) as info:
        load_records(tmp_path / "bad", "prompts")
    assert str(info.value) == f"{tmp_path / 'bad'}: row 1: field 'prompt': expected a non-empty string, got ''"

    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"holds a DatasetDict with splits \['train'\]"):
        load_records(tmp_path / "dd", "prompts")


# --- chat shapes: TRL conversational `messages` and prompt-completion ---------------------

SYSTEM = {"role": "system", "content": "Follow the house rules."}
USER = {"role": "user", "content": "rice?"}
ASSISTANT = {"role": "assistant", "content": RESPONSE}


def test_trl_messages_records(tmp_path):
    history = [SYSTEM, USER, {"role": "assistant", "content": "White or brown?"}, {"role": "user", "content": "white"}]
    path = _lines(tmp_path / "chat.jsonl",
                  json.dumps({"messages": [*history, ASSISTANT], "source": "trl"}),
                  json.dumps({"messages": [USER, ASSISTANT], "harmful": False}))
    ds = load_records(path, "sft")
    assert "messages" not in ds.column_names
    assert ds["prompt"] == [history, [USER]]  # everything before the last turn, system kept
    assert ds["response"] == [RESPONSE, RESPONSE]
    assert ds["id"] == ["chat-0", "chat-1"] and ds["source"] == ["trl", None] and ds["harmful"] == [None, False]
    # As prompts (ERPO pool, evaluation), a trailing assistant turn is ignored.
    assert load_records(path, "prompts")["prompt"] == [history, [USER]]
    path = _lines(tmp_path / "pool.jsonl", json.dumps({"messages": [SYSTEM, USER]}))
    assert load_records(path, "prompts")["prompt"] == [[SYSTEM, USER]]


def test_trl_prompt_completion_records(tmp_path):
    path = _lines(tmp_path / "pc.jsonl",
                  json.dumps({"prompt": [SYSTEM, USER], "completion": [ASSISTANT]}),
                  json.dumps({"prompt": "plain?", "completion": RESPONSE}))
    ds = load_records(path, "sft")
    assert "completion" not in ds.column_names
    # One prompt type per column: the string prompt becomes one user turn.
    assert ds["prompt"] == [[SYSTEM, USER], [{"role": "user", "content": "plain?"}]]
    assert ds["response"] == [RESPONSE, RESPONSE]
    # For prompts, `completion` is an ordinary extra field.
    path = _lines(tmp_path / "p.jsonl", json.dumps({"prompt": "plain?", "completion": "kept"}))
    assert load_records(path, "prompts").to_list() == [{"id": "p-0", "prompt": "plain?", "completion": "kept"}]


CHAT_ERRORS = [
    ("sft last turn not assistant", {"messages": [USER]}, "sft",
     "{p}:1: field 'messages': the last turn must be the assistant's Ex-Ante trace, got role 'user'"),
    ("no user turn", {"messages": [SYSTEM, ASSISTANT]}, "sft", "{p}:1: field 'messages': no user turn to answer"),
    ("unknown role", {"messages": [{"role": "tool", "content": "x"}, ASSISTANT]}, "sft",
     "{p}:1: field 'messages': turn 0: 'role' must be one of system, user, assistant, got 'tool'"),
    ("empty content", {"messages": [{"role": "user", "content": " "}, ASSISTANT]}, "sft",
     "{p}:1: field 'messages': turn 0: 'content' must be a non-empty string, got ' '"),
    ("content parts", {"messages": [{"role": "user", "content": [{"type": "text"}]}, ASSISTANT]}, "sft",
     "{p}:1: field 'messages': turn 0: 'content' must be a non-empty string, got [{{'type': 'text'}}]"),
    ("late system", {"messages": [USER, SYSTEM, ASSISTANT]}, "sft",
     "{p}:1: field 'messages': turn 1: a system message may only be the first turn"),
    ("not a list", {"messages": "hi"}, "prompts",
     "{p}:1: field 'messages': expected a non-empty list of {{role, content}} messages, got 'hi'"),
    ("turn not an object", {"messages": ["hi"]}, "prompts",
     "{p}:1: field 'messages': turn 0: expected an object with 'role' and 'content', got 'hi'"),
    ("prompt ends with assistant", {"messages": [USER, ASSISTANT, ASSISTANT]}, "sft",
     "{p}:1: field 'messages': turn 1: a prompt must end with a user turn, got role 'assistant'"),
    ("messages and prompt", {"messages": [USER, ASSISTANT], "prompt": "x"}, "sft",
     "{p}:1: field 'messages': give either 'messages' or 'prompt', not both"),
    ("prompt list", {"prompt": [USER, ASSISTANT]}, "prompts",
     "{p}:1: field 'prompt': turn 1: a prompt must end with a user turn, got role 'assistant'"),
    ("completion two turns", {"prompt": [USER], "completion": [ASSISTANT, ASSISTANT]}, "sft",
     "{p}:1: field 'completion': expected one assistant message, got roles ['assistant', 'assistant']"),
    ("completion and response", {"prompt": "x", "completion": RESPONSE, "response": RESPONSE}, "sft",
     "{p}:1: field 'completion': give either 'completion' or 'response', not both"),
    ("completion malformed", {"prompt": "x", "completion": [{"role": "assistant", "content": "plain"}]}, "sft",
     "{p}:1: field 'completion': not a valid Ex-Ante trace: missing <ex_ante>"),
    ("messages malformed trace", {"messages": [USER, {"role": "assistant", "content": "plain"}]}, "sft",
     "{p}:1: field 'messages' (last turn): not a valid Ex-Ante trace: missing <ex_ante>"),
]


@pytest.mark.parametrize("what,record,kind,message", CHAT_ERRORS, ids=[e[0] for e in CHAT_ERRORS])
def test_chat_shape_errors_name_file_line_and_field(tmp_path, what, record, kind, message):
    path = _lines(tmp_path / "x.jsonl", json.dumps(record))
    with pytest.raises(DataError) as info:
        load_records(path, kind)
    assert str(info.value) == message.format(p=path)


def test_messages_in_parquet_and_dataset_dirs(tmp_path):
    # Arrow stores messages as structs; a later turn's extra key becomes None in the others.
    rows = [{"messages": [SYSTEM, USER, ASSISTANT], "harmful": False},
            {"messages": [USER, {**ASSISTANT, "name": "bot"}], "harmful": True}]
    path = tmp_path / "train.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    ds = load_records(path, "sft", cache_dir=tmp_path / "cache")
    assert sorted(ds.column_names) == ["harmful", "id", "prompt", "response"]
    assert ds["prompt"] == [[SYSTEM, USER], [USER]] and ds["response"] == [RESPONSE, RESPONSE]
    assert ds["harmful"] == [False, True] and ds["id"] == ["train-0", "train-1"]
    assert load_records(path, "prompts", cache_dir=tmp_path / "cache")["prompt"] == [[SYSTEM, USER], [USER]]

    datasets.Dataset.from_list([{"prompt": [USER], "completion": [ASSISTANT]}]).save_to_disk(str(tmp_path / "pc"))
    ds = load_records(tmp_path / "pc", "sft")
    assert ds.to_list() == [{"prompt": [USER], "response": RESPONSE, "id": "pc-0"}]

    datasets.Dataset.from_list([{"messages": [USER]}]).to_parquet(str(path))
    with pytest.raises(DataError) as info:
        load_records(path, "sft", cache_dir=tmp_path / "cache")
    assert str(info.value) == (f"{path}: row 0: field 'messages': the last turn must be the assistant's "
                               "Ex-Ante trace, got role 'user'")
