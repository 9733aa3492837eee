"""Chat prompts: a plain string or a list of messages, the shapes user data comes in.

A *prompt* everywhere in safer (records, rollout workers, pairs, evaluation) is either

- a non-empty string: one user turn, or
- a list of messages ``[{"role", "content"}, ...]`` (TRL's conversational shape): an optional
  ``system`` message first, then ``user`` / ``assistant`` turns, ending with a ``user`` turn
  (the one the model answers).

Both go through :func:`safer_dist.train.sft_data.encode_prompt`, so training, sampling,
evaluation and reference log-probs tokenize a prompt the same way; a string ``s`` and
``[{"role": "user", "content": s}]`` give the same tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Union

from safer_dist.reasoning.rules import Rulebook

ROLES = ("system", "user", "assistant")
Prompt = Union[str, list]  # str, or list[dict] of {"role", "content"}


class ChatError(ValueError):
    """A message list that is not a usable chat; the text names the turn and what is wrong."""


def check_messages(value: Any) -> list[dict]:
    """Validated copy of a message list: ``[{"role": str, "content": str}]``.

    Every turn is an object with ``role`` in :data:`ROLES` and a non-empty string ``content``;
    a ``system`` turn may only come first. Other keys of a turn (``None`` fillers that Arrow adds
    to structs, ``name``) are dropped. Raises :class:`ChatError` naming the 0-based turn.
    """
    if not isinstance(value, list) or not value:
        raise ChatError(f"expected a non-empty list of {{role, content}} messages, got {_show(value)}")
    out = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise ChatError(f"turn {i}: expected an object with 'role' and 'content', got {_show(turn)}")
        role, content = turn.get("role"), turn.get("content")
        if role not in ROLES:
            raise ChatError(f"turn {i}: 'role' must be one of {', '.join(ROLES)}, got {_show(role)}")
        if role == "system" and i:
            raise ChatError(f"turn {i}: a system message may only be the first turn")
        if not isinstance(content, str) or not content.strip():
            raise ChatError(f"turn {i}: 'content' must be a non-empty string, got {_show(content)}")
        out.append({"role": role, "content": content})
    return out


def check_prompt_messages(value: Any) -> list[dict]:
    """:func:`check_messages` for a prompt: it must end with the user turn to be answered."""
    messages = check_messages(value)
    if messages[-1]["role"] != "user":
        raise ChatError(f"turn {len(messages) - 1}: a prompt must end with a user turn, got role "
                        f"{messages[-1]['role']!r}")
    return messages


def as_messages(prompt: Prompt) -> list[dict]:
    """The prompt as a message list (a string is one user turn)."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def prompt_text(prompt: Prompt) -> str:
    """Plain text of a prompt, for judges, teachers, classifiers and tokenizer corpora: a string
    or a lone user turn as is; otherwise ``role: content`` blocks separated by blank lines."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1 and prompt[0]["role"] == "user":
        return prompt[0]["content"]
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def map_last_user(prompt: Prompt, fn: Callable[[str], str]) -> Prompt:
    """The prompt with ``fn`` applied to its last user turn (e.g. a jailbreak transformation);
    a string prompt is transformed as a whole and stays a string."""
    if isinstance(prompt, str):
        return fn(prompt)
    last = max(i for i, m in enumerate(prompt) if m["role"] == "user")
    return [{**m, "content": fn(m["content"])} if i == last else dict(m) for i, m in enumerate(prompt)]


def with_system(prompt: Prompt, text: str) -> Prompt:
    """The prompt with a system turn ``text`` first; as given when ``text`` is empty or the
    prompt has a system turn of its own (``data.system_prompt``)."""
    if not text:
        return prompt
    messages = as_messages(prompt)
    return prompt if messages[0]["role"] == "system" else [{"role": "system", "content": text}, *messages]


def system_prompt(data) -> str:
    """The text ``data.system_prompt`` stands for (``data``: the config's data section):
    ``rulebook``, the listing of ``data.rulebook``
    (:meth:`~safer_dist.reasoning.rules.Rulebook.listing`); else the text as written ("" adds no
    system turn)."""
    return Rulebook.load(data.rulebook).listing() if data.system_prompt == "rulebook" else data.system_prompt


def with_system_records(records, text: str) -> list[dict]:
    """Copies of ``records`` (mappings with ``prompt``) whose prompts have the system turn
    ``text`` (:func:`with_system`)."""
    return [{**r, "prompt": with_system(r["prompt"], text)} for r in records] if text else list(records)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
