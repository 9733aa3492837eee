"""Record schema and loading of user data into a ``datasets.Dataset``.

Two kinds of data:

- ``prompts`` (ERPO pool, evaluation): required ``prompt`` (a non-empty str, or a message list
  ending with a user turn, see :mod:`safer_dist.data.chat`); optional ``id`` (str, default
  ``f"{stem}-{index}"``), ``harmful`` (bool), ``category`` (str), ``strategy`` (one of
  ``STRATEGIES``), ``kind`` (str). Any other field is kept as is.
- ``sft``: the same plus a required ``response`` (non-empty str), which by default must also
  parse as a format-valid Ex-Ante trace.

Chat shapes are accepted and normalised to ``prompt`` / ``response`` on load:

- TRL conversational ``messages`` (system / user / assistant turns): for ``sft`` the last turn
  must be the assistant's and becomes ``response``, the turns before it ``prompt``; for
  ``prompts`` a trailing assistant turn is ignored. ``messages`` is not kept.
- TRL prompt-completion: ``completion`` (a str, or a list holding one assistant message)
  becomes ``response`` (sft; for prompts it is an ordinary extra field).

A file whose prompts are partly strings and partly message lists gets every string prompt
turned into one user turn, so the ``prompt`` column has one type.

Sources: a ``.jsonl``/``.json`` file (one object per line, or a ``.json`` array), a
``.parquet`` file, or a directory written by ``Dataset.save_to_disk``. Every problem raises
``DataError`` naming the file, the line (JSON) or row (Parquet / dataset dir, 0-based) and the
field, e.g. ``data/x.jsonl:17: field 'prompt': expected a non-empty string, got 3``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from safer_dist.data.chat import ChatError, as_messages, check_messages, check_prompt_messages
from safer_dist.reasoning import exante
from safer_dist.runtime.io import atomic_write_jsonl

if TYPE_CHECKING:
    import datasets

KINDS = ("sft", "prompts")
_OPTIONAL_TYPES = {"id": str, "harmful": bool, "category": str, "kind": str, "strategy": str}
_TYPE_NAMES = {bool: "boolean", int: "integer", float: "float", str: "string", list: "list",
               dict: "object", type(None): "null"}
JSON_SUFFIXES = (".jsonl", ".json")


class DataError(ValueError):
    """A user's data file is missing, unreadable or does not match the record schema."""


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a JSONL file (blank lines skipped); ``DataError`` names the bad line."""
    return [record for _, record in _read_json_records(path)]


def write_jsonl(path: str | Path, records: Iterable[dict]) -> Path:
    """Write one JSON object per line, atomically (:func:`safer_dist.runtime.io.atomic_write_jsonl`),
    so a reader never sees a half-written file. Output is deterministic for equal records."""
    return atomic_write_jsonl(path, records)


def load_records(path: str | Path, kind: str, *, check_format: bool = True,
                 cache_dir: str | Path | None = None) -> datasets.Dataset:
    """Load and validate records of ``kind`` ("sft" or "prompts") from ``path``.

    ``check_format`` (sft only) requires every response to be a format-valid Ex-Ante trace.
    ``cache_dir`` is where ``datasets`` may cache a converted Parquet file (its default cache
    otherwise). Fills a missing ``id``; keeps every extra field.
    """
    import datasets

    if kind not in KINDS:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {', '.join(KINDS)}")
    p = Path(path)
    name = str(path)
    if not p.exists():
        raise DataError(f"{name}: no such file or directory")

    if p.is_dir():
        try:
            ds = datasets.load_from_disk(str(p))
        except Exception as e:  # datasets raises FileNotFoundError / ValueError variants
            raise DataError(f"{name}: not a directory written by Dataset.save_to_disk ({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            raise DataError(f"{name}: holds a DatasetDict with splits {list(ds)}; pass one split's directory")
        return _validate_dataset(ds, name, p.name, kind, check_format)
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            # datasets cannot build a split from a file with no rows; say so plainly instead.
            if pq.ParquetFile(str(p)).metadata.num_rows == 0:
                raise DataError(f"{name}: empty dataset (no records)")
            ds = datasets.Dataset.from_parquet(
                str(p), keep_in_memory=True, cache_dir=None if cache_dir is None else str(cache_dir)
            )
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"{name}: cannot read Parquet: {e}") from None
        return _validate_dataset(ds, name, p.stem, kind, check_format)
    if p.suffix in JSON_SUFFIXES:
        located = _read_json_records(p)
        if not located:
            raise DataError(f"{name}: empty dataset (no records)")
        records = [
            _check_record(record, where, p.stem, index, kind, check_format)
            for index, (where, record) in enumerate(located)
        ]
        wheres = [where for where, _ in located]
        records = _one_prompt_type(records)
        _check_ids([(where, r["id"]) for where, r in zip(wheres, records)])
        _check_extra_types(list(zip(wheres, records)))
        return datasets.Dataset.from_list(_fill_missing_keys(records))
    raise DataError(
        f"{name}: unsupported file type {p.suffix or '(no suffix)'!r}; "
        "expected .jsonl, .json, .parquet, or a directory written by Dataset.save_to_disk"
    )


# --- reading -------------------------------------------------------------------------------

def _read_json_records(path: str | Path) -> list[tuple[str, dict]]:
    """(location, object) for every record, location being ``"file:line"`` (or
    ``"file: item i"`` for a ``.json`` array)."""
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{name}: no such file or directory") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{name}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{name}: cannot read: {e.strerror or e}") from None

    if Path(path).suffix == ".json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{name}:{e.lineno}: invalid JSON: {e.msg} (col {e.colno})") from None
        if not isinstance(items, list):
            raise DataError(f"{name}: expected a JSON array of objects")
        located = [(f"{name}: item {i}", item) for i, item in enumerate(items)]
    else:
        located = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                located.append((f"{name}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{name}:{lineno}: invalid JSON: {e.msg} (col {e.colno})") from None
    for where, item in located:
        if not isinstance(item, dict):
            raise DataError(f"{where}: expected a JSON object, got {_type_name(item)}")
    return located


# --- validation ----------------------------------------------------------------------------

def _from_chat_shapes(record: dict, where: str, kind: str) -> tuple[dict, str]:
    """``messages`` / ``completion`` / message-list ``prompt`` records as ``prompt`` (str or
    validated message list) and ``response`` (str); other records unchanged. Also returns how
    to name the response's source in errors (``'response'``, ``'completion'``, ``'messages'``)."""
    if record.get("messages") is not None:
        clash = [k for k in ("prompt", "response", "completion") if record.get(k) is not None]
        if clash:
            raise DataError(f"{where}: field 'messages': give either 'messages' or "
                            f"{' / '.join(repr(k) for k in clash)}, not both")
        try:
            messages = check_messages(record["messages"])
        except ChatError as e:
            raise DataError(f"{where}: field 'messages': {e}") from None
        record = {k: v for k, v in record.items() if k != "messages"}
        if kind == "sft":
            last = messages[-1]
            if last["role"] != "assistant":
                raise DataError(f"{where}: field 'messages': the last turn must be the assistant's "
                                f"Ex-Ante trace, got role {last['role']!r}")
            record["response"] = last["content"]
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not any(m["role"] == "user" for m in messages):
            raise DataError(f"{where}: field 'messages': no user turn to answer")
        try:
            record["prompt"] = check_prompt_messages(messages)
        except ChatError as e:
            raise DataError(f"{where}: field 'messages': {e}") from None
        return record, "'messages' (last turn)"
    if kind == "sft" and record.get("completion") is not None:
        if record.get("response") is not None:
            raise DataError(f"{where}: field 'completion': give either 'completion' or 'response', not both")
        completion = record["completion"]
        if isinstance(completion, list):
            try:
                turns = check_messages(completion)
            except ChatError as e:
                raise DataError(f"{where}: field 'completion': {e}") from None
            if len(turns) != 1 or turns[0]["role"] != "assistant":
                raise DataError(f"{where}: field 'completion': expected one assistant message, got roles "
                                f"{[t['role'] for t in turns]}")
            completion = turns[0]["content"]
        record = {k: v for k, v in record.items() if k != "completion"}
        record["response"] = completion
        source = "'completion'"
    else:
        source = "'response'"
    if isinstance(record.get("prompt"), list):
        try:
            record = {**record, "prompt": check_prompt_messages(record["prompt"])}
        except ChatError as e:
            raise DataError(f"{where}: field 'prompt': {e}") from None
    return record, source


def _one_prompt_type(records: list[dict]) -> list[dict]:
    """Arrow needs one type per column: with any message-list prompt, every string prompt
    becomes one user turn (which tokenizes the same, see :mod:`safer_dist.data.chat`)."""
    if not any(isinstance(r["prompt"], list) for r in records):
        return records
    return [{**r, "prompt": as_messages(r["prompt"])} for r in records]


def _check_record(record: dict, where: str, stem: str, index: int, kind: str,
                  check_format: bool) -> dict:
    """Validate one record (normalising chat shapes, see the module docstring) and return it
    with a default ``id`` filled in."""
    record, response_source = _from_chat_shapes(record, where, kind)
    required = ("prompt", "response") if kind == "sft" else ("prompt",)
    for key in required:
        if key not in record:
            raise DataError(f"{where}: missing field {key!r}")
        value = record[key]
        if key == "prompt" and isinstance(value, list):
            continue  # a message list, validated by _from_chat_shapes
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{where}: field {key!r}: expected a non-empty string, got {_show(value)}")
    if kind == "sft" and check_format:
        result = exante.parse(record["response"])
        if not result.valid:
            raise DataError(
                f"{where}: field {response_source}: not a valid Ex-Ante trace: {'; '.join(result.errors)}"
            )
    for key, expected in _OPTIONAL_TYPES.items():
        value = record.get(key)
        if value is not None and type(value) is not expected:  # type(): a bool is not an int
            raise DataError(f"{where}: field {key!r}: expected a {_TYPE_NAMES[expected]}, got {_show(value)}")
    strategy = record.get("strategy")
    if strategy is not None and strategy not in exante.STRATEGIES:
        raise DataError(
            f"{where}: field 'strategy': expected one of {', '.join(exante.STRATEGIES)}, got {_show(strategy)}"
        )
    if record.get("id") is None:
        record = {"id": f"{stem}-{index}", **{k: v for k, v in record.items() if k != "id"}}
    return record


def _check_ids(located_ids: list[tuple[str, str]]) -> None:
    first_seen: dict[str, str] = {}
    for where, rid in located_ids:
        if rid in first_seen:
            raise DataError(f"{where}: field 'id': duplicate id {rid!r} (first at {first_seen[rid]})")
        first_seen[rid] = where


def _check_extra_types(located: list[tuple[str, dict]]) -> None:
    """Arrow needs one type per column: report the first record whose field type differs."""
    first: dict[str, tuple[str, str]] = {}
    for where, record in located:
        for key, value in record.items():
            if value is None:
                continue
            kind = _type_name(value)
            kind = "number" if kind in ("integer", "float") else kind
            if key not in first:
                first[key] = (kind, where)
            elif first[key][0] != kind:
                seen_kind, seen_where = first[key]
                raise DataError(
                    f"{where}: field {key!r}: expected {seen_kind} (as at {seen_where}), got {_show(value)}"
                )


def _fill_missing_keys(records: list[dict]) -> list[dict]:
    # Dataset.from_list takes its columns from the first record only; give every record
    # every key so optional fields that first appear later are not silently dropped.
    keys = list(dict.fromkeys(k for r in records for k in r))
    return [{k: r.get(k) for k in keys} for r in records]


def _validate_dataset(ds: datasets.Dataset, name: str, stem: str, kind: str,
                      check_format: bool) -> datasets.Dataset:
    if len(ds) == 0:
        raise DataError(f"{name}: empty dataset (no records)")
    columns = ds.column_names
    # For prompts, ``completion`` is an ordinary extra column (see the module docstring).
    chat_columns = [c for c in (("messages", "completion") if kind == "sft" else ("messages",)) if c in columns]
    required = ("prompt", "response") if kind == "sft" else ("prompt",)
    alternatives = {"prompt": ("messages",), "response": ("messages", "completion")}
    for key in required:
        if key not in columns and not any(a in columns for a in alternatives[key]):
            raise DataError(f"{name}: missing field {key!r} (columns: {', '.join(columns)})")
    known = [c for c in ("id", "prompt", "response", "harmful", "category", "kind", "strategy", *chat_columns)
             if c in columns]
    checked = [
        _check_record(row, f"{name}: row {index}", stem, index, kind, check_format)
        for index, row in enumerate(ds.select_columns(known).to_list())
    ]
    ids = [(f"{name}: row {index}", r["id"]) for index, r in enumerate(checked)]
    _check_ids(ids)
    if chat_columns or any(isinstance(r["prompt"], list) for r in checked):
        # Chat shapes were normalised: replace the source columns by the normalised ones.
        checked = _one_prompt_type(checked)
        import datasets

        rebuilt = {key: [r[key] for r in checked] for key in (("prompt", "response") if kind == "sft" else ("prompt",))}
        kept = [c for c in columns if c not in chat_columns and c not in rebuilt]
        if not kept:  # a dataset with no columns has no rows left to add columns to
            ds = datasets.Dataset.from_dict(rebuilt)
        else:
            ds = ds.select_columns(kept)
            for key, values in rebuilt.items():
                ds = ds.add_column(key, values)
    if "id" not in ds.column_names:
        ds = ds.add_column("id", [rid for _, rid in ids])
    elif any(v is None for v in ds["id"]):
        ds = ds.remove_columns("id").add_column("id", [rid for _, rid in ids])
    return ds


def _type_name(value: Any) -> str:
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
