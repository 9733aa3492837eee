"""Teacher backends for trace synthesis: one method, ``generate(prompts) -> [Completion]``.

- :class:`RayTeacher`: a local Hugging Face directory on rollout workers (``RolloutGroup``),
  chat-formatted with the model's own chat template.
- :class:`HttpTeacher`: any OpenAI-compatible ``/chat/completions`` endpoint (vLLM,
  ``transformers serve``, hosted APIs). Standard library only (``urllib``). At most
  ``max_concurrency`` requests in flight; each has a socket timeout of ``timeout_s``; a
  connection error, a timeout, a malformed reply or HTTP 408/409/425/429/5xx is retried up to
  ``max_retries`` times after ``backoff_s * 2**attempt`` seconds (capped at ``max_backoff_s``,
  scaled by a random factor in [0.5, 1] so that clients do not retry in lockstep; a numeric
  ``Retry-After`` header wins, under the same cap). Other 4xx fail at once. The API key is
  read from the environment variable *named* by ``api_key_env``, never from a config file.

A prompt that still fails comes back as ``Completion(text=None, error=...)``: failures are
per prompt, so one bad request does not lose a batch.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from safer_dist.runtime.log import get_logger

log = get_logger("teachers")

RETRY_STATUS = (408, 409, 425, 429)


@dataclass
class Completion:
    text: str | None
    error: str | None = None
    latency_s: float = 0.0
    attempts: int = 1
    num_tokens: int | None = None
    finish_reason: str | None = None


class TeacherUnavailable(RuntimeError):
    """The teacher answered none of a round's prompts (endpoint down, bad URL or key)."""


class RayTeacher:
    """A local model on ``RolloutGroup`` workers (``group`` is owned: ``shutdown`` stops it)."""

    def __init__(self, group, *, batch_size: int = 32, seed: int = 0):
        self.group, self.batch_size, self.seed = group, batch_size, seed

    def generate(self, prompts: list[str], *, max_new_tokens: int, temperature: float) -> list[Completion]:
        outs = self.group.generate(prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                                   batch_size=self.batch_size, seed=self.seed)
        return [Completion(o["text"], latency_s=o["latency_s"], num_tokens=o["num_tokens"]) for o in outs]

    def shutdown(self) -> None:
        self.group.shutdown()


class HttpTeacher:
    def __init__(self, base_url: str, model_name: str, *, api_key_env: str | None = None, max_concurrency: int = 4,
                 timeout_s: float = 120.0, max_retries: int = 4, backoff_s: float = 1.0, max_backoff_s: float = 30.0,
                 seed: int = 0):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model_name = model_name
        self.api_key_env = api_key_env
        self.api_key = None
        if api_key_env:
            self.api_key = os.environ.get(api_key_env)
            if not self.api_key:
                raise ValueError(f"synth.api_key_env={api_key_env}: environment variable {api_key_env} is not set")
        self.max_concurrency, self.timeout_s = max_concurrency, timeout_s
        self.max_retries, self.backoff_s, self.max_backoff_s = max_retries, backoff_s, max_backoff_s
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, synth, seed: int = 0) -> HttpTeacher:
        return cls(synth.base_url, synth.model_name, api_key_env=synth.api_key_env,
                   max_concurrency=synth.max_concurrency, timeout_s=synth.timeout_s, max_retries=synth.max_retries,
                   backoff_s=synth.backoff_s, max_backoff_s=synth.max_backoff_s, seed=seed)

    def generate(self, prompts: list[str], *, max_new_tokens: int, temperature: float) -> list[Completion]:
        """One chat completion per prompt (a single user message), in input order."""
        with ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix="teacher") as pool:
            return list(pool.map(lambda p: self.complete(p, max_new_tokens=max_new_tokens, temperature=temperature),
                                 prompts))

    def complete(self, prompt: str, *, max_new_tokens: int, temperature: float) -> Completion:
        body = json.dumps({
            "model": self.model_name, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_new_tokens, "temperature": temperature, "stream": False,
        }).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        t0 = time.perf_counter()
        error = "no attempt made"
        for attempt in range(self.max_retries + 1):
            retry_after = None
            try:
                req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    raw = resp.read()
                text, tokens, finish = _parse_reply(raw)
                return Completion(text, latency_s=time.perf_counter() - t0, attempts=attempt + 1,
                                  num_tokens=tokens, finish_reason=finish)
            except urllib.error.HTTPError as e:
                detail = _error_body(e)
                error = f"HTTP {e.code} from {self.url}: {detail}"
                if e.code == 401 or e.code == 403:
                    error += f" (check the key in ${self.api_key_env})" if self.api_key_env else " (set synth.api_key_env)"
                if not (e.code in RETRY_STATUS or e.code >= 500):
                    return Completion(None, error=error, latency_s=time.perf_counter() - t0, attempts=attempt + 1)
                retry_after = _retry_after(e.headers.get("Retry-After") if e.headers else None)
            except (TimeoutError, socket.timeout):
                error = f"timed out after {self.timeout_s:g} s ({self.url})"
            except urllib.error.URLError as e:
                reason = e.reason
                error = (f"timed out after {self.timeout_s:g} s ({self.url})" if isinstance(reason, (TimeoutError, socket.timeout))
                         else f"cannot reach {self.url}: {reason}")
            except (OSError, http.client.HTTPException) as e:  # e.g. the server closed the connection mid-reply
                error = f"connection to {self.url} failed: {e}"
            except _BadReply as e:
                error = f"malformed reply from {self.url}: {e}"
            if attempt < self.max_retries:
                time.sleep(self._delay(attempt, retry_after))
        log.warning("teacher request failed after %d attempt(s): %s", self.max_retries + 1, error)
        return Completion(None, error=error, latency_s=time.perf_counter() - t0, attempts=self.max_retries + 1)

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_backoff_s)
        with self._lock:
            jitter = self._rng.uniform(0.5, 1.0)
        return min(self.max_backoff_s, self.backoff_s * 2**attempt) * jitter

    def shutdown(self) -> None:
        pass


class _BadReply(ValueError):
    pass


def _parse_reply(raw: bytes) -> tuple[str, int | None, str | None]:
    try:
        data = json.loads(raw)
        choice = data["choices"][0]
        text = choice["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise _BadReply(f"{type(e).__name__}: {e}; body starts {raw[:120]!r}") from None
    if not isinstance(text, str):
        raise _BadReply(f"message content is {type(text).__name__}, not text")
    usage = data.get("usage") or {}
    return text, usage.get("completion_tokens"), choice.get("finish_reason")


def _error_body(e: urllib.error.HTTPError) -> str:
    try:
        body = e.read().decode("utf-8", "replace").strip()
    except Exception:  # noqa: BLE001 - the body is only for the message
        body = ""
    return (body[:200] or e.reason or "").replace("\n", " ")


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to exponential backoff
