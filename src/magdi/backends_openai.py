"""Chat backend for any OpenAI-compatible endpoint: OpenAI, vLLM (``vllm serve``), Ollama, llama.cpp server.

* The API key is read only from ``os.environ[api_key_env]`` (``api_key_env=None`` -> the placeholder key
  ``"EMPTY"``, which vLLM / Ollama / llama.cpp accept).  It never enters a message, a log line, a cache entry,
  an exception message or ``repr``.
* The ``openai`` client is built with ``max_retries=0``; retries are ours (tenacity, exponential backoff with
  jitter, honouring ``Retry-After`` up to a cap) on 408/429, 5xx, timeouts, connection errors and malformed
  responses (undecodable JSON, no choices, ``content`` None).  Other 4xx (400/401/403/404/422...) fail at once.
  Every failure surfaces as a one-line :class:`TeacherCallError` naming model, endpoint, last error and the
  number of attempts.
* Every finished call goes into the :class:`~magdi.cache.CallCache` as soon as it arrives, so a crash in the
  middle of a batch keeps the conversations that had already come back.
"""

from __future__ import annotations

import email.utils
import logging
import os
import re
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import Any

import openai
from tenacity import (
    RetryCallState,
    RetryError,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from magdi.cache import CallCache, cache_key

log = logging.getLogger(__name__)

#: Placeholder key for local servers that do not check one.
NO_KEY = "EMPTY"
#: HTTP statuses (besides >= 500) that are worth another try.
RETRYABLE_STATUS = frozenset({408, 429})


class TeacherCallError(RuntimeError):
    """A teacher call failed for good (retries exhausted, or a non-retryable error). One line, never the key."""


class TeacherConfigError(ValueError):
    """The backend cannot be built (e.g. the API-key environment variable is missing)."""


class MalformedResponseError(Exception):
    """HTTP 200 but not a usable chat completion (bad JSON, no choices, no content). Retried."""


def _field(obj: Any, name: str) -> Any:
    """``obj.name`` or ``obj[name]`` (lenient parsing may leave plain dicts inside a model), else None."""
    if isinstance(obj, dict):
        return obj.get(name)
    return getattr(obj, name, None)


def _extract(resp: Any) -> dict:
    """``{"text", "n_tokens"}`` from a chat-completion response, or raise :class:`MalformedResponseError`."""
    if isinstance(resp, (str, bytes)):
        raise MalformedResponseError("response body is not JSON")
    choices = _field(resp, "choices")
    if not isinstance(choices, list) or not choices:
        raise MalformedResponseError("response has no choices")
    content = _field(_field(choices[0], "message"), "content")
    if not isinstance(content, str):
        raise MalformedResponseError("response message content is missing")
    completion_tokens = _field(_field(resp, "usage"), "completion_tokens")
    if (
        isinstance(completion_tokens, int)
        and not isinstance(completion_tokens, bool)
        and completion_tokens >= 0
    ):
        n_tokens = completion_tokens
    else:
        n_tokens = len(content.split())
    return {"text": content, "n_tokens": n_tokens}


def _is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, (MalformedResponseError, openai.APIConnectionError)):  # includes APITimeoutError
        return True
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code >= 500 or exc.status_code in RETRYABLE_STATUS
    return False


def _retry_after_s(exc: BaseException | None) -> float | None:
    """Seconds the server asked us to wait (``retry-after-ms`` / ``Retry-After`` seconds or HTTP date)."""
    if not isinstance(exc, openai.APIStatusError):
        return None
    headers = exc.response.headers
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return max(0.0, float(value) * scale)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value:
        try:
            parsed = email.utils.parsedate_tz(value)
            if parsed is not None:
                return max(0.0, email.utils.mktime_tz(parsed) - time.time())
        except (TypeError, ValueError, OverflowError):
            pass
    return None


class OpenAIChatBackend:
    """Batched chat completions against one model on one OpenAI-compatible endpoint."""

    def __init__(
        self,
        model: str,
        base_url: str | None,
        api_key_env: str | None,
        timeout_s: float = 60.0,
        max_retries: int = 5,
        cache: CallCache | None = None,
        backoff_base_s: float = 1.0,
        concurrency: int = 4,
        max_backoff_s: float = 60.0,
    ):
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.model = model
        self.api_key_env = api_key_env
        self.timeout_s = float(timeout_s)
        self.max_retries = int(max_retries)
        self.cache = cache
        self.backoff_base_s = float(backoff_base_s)
        self.max_backoff_s = float(max_backoff_s)
        self.concurrency = int(concurrency)
        if api_key_env is None:
            api_key = NO_KEY
        else:
            api_key = os.environ.get(api_key_env, "")
            if not api_key.strip():
                raise TeacherConfigError(
                    f"teacher {model!r}: environment variable {api_key_env} (api_key_env) is not set or empty; "
                    f"export it before running (the key itself never goes into params.yaml)"
                )
        # Kept only to scrub it from any server-provided error text; never printed.
        self._secret = api_key if api_key != NO_KEY and len(api_key) >= 4 else None
        self._client = openai.OpenAI(
            base_url=base_url, api_key=api_key, timeout=self.timeout_s, max_retries=0
        )
        self.base_url = str(self._client.base_url).rstrip("/")
        self._n_requests = 0
        self._count_lock = threading.Lock()

    # ------------------------------------------------------------------ introspection
    def __repr__(self) -> str:
        return (
            f"OpenAIChatBackend(model={self.model!r}, base_url={self.base_url!r}, "
            f"api_key_env={self.api_key_env!r}, max_retries={self.max_retries}, concurrency={self.concurrency})"
        )

    @property
    def n_requests(self) -> int:
        """HTTP requests sent by this backend (cache hits excluded)."""
        return self._n_requests

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> OpenAIChatBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ errors
    def _scrub(self, text: str) -> str:
        if self._secret:
            text = text.replace(self._secret, "***")
        text = re.sub(r"(?i)bearer\s+\S+", "Bearer ***", text)
        return " ".join(text.split())

    def _describe(self, exc: BaseException) -> str:
        """``RateLimitError (HTTP 429): <server message>`` — one line, key scrubbed, bounded length."""
        name = type(exc).__name__
        if isinstance(exc, openai.APIStatusError):
            name += f" (HTTP {exc.status_code})"
        detail = exc.message if isinstance(exc, openai.APIError) else str(exc)
        detail = self._scrub(str(detail))
        if len(detail) > 200:
            detail = detail[:197] + "..."
        return f"{name}: {detail}" if detail else name

    def _fail(self, exc: BaseException, attempts: int, retried: bool) -> TeacherCallError:
        what = "gave up after" if retried else "not retried;"
        msg = (
            f"teacher call failed: model={self.model!r} base_url={self.base_url!r} "
            f"{what} {attempts} attempt{'s' if attempts != 1 else ''}; last error: {self._describe(exc)}"
        )
        if isinstance(exc, openai.APIStatusError) and exc.status_code in (401, 403):
            src = (
                f"environment variable {self.api_key_env}"
                if self.api_key_env
                else "no key (api_key_env unset)"
            )
            msg += f" (check the API key: {src})"
        elif isinstance(exc, openai.NotFoundError):
            msg += " (check base_url and that the server serves this model name)"
        return TeacherCallError(msg)

    # ------------------------------------------------------------------ one call
    def _wait(self, state: RetryCallState) -> float:
        backoff = wait_exponential_jitter(
            multiplier=self.backoff_base_s, max=self.max_backoff_s, jitter=self.backoff_base_s
        )(state)
        exc = state.outcome.exception() if state.outcome is not None else None
        asked = _retry_after_s(exc)
        if asked is not None:
            backoff = max(backoff, min(asked, self.max_backoff_s))
        return backoff

    def _before_sleep(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        wait_s = state.next_action.sleep if state.next_action is not None else 0.0
        log.warning(
            "teacher %s @ %s: attempt %d/%d failed (%s); retrying in %.2fs",
            self.model,
            self.base_url,
            state.attempt_number,
            self.max_retries + 1,
            self._describe(exc) if exc is not None else "?",
            wait_s,
        )

    def _request(
        self, messages: list[dict], temperature: float, top_p: float, max_new_tokens: int, seed: int
    ) -> dict:
        with self._count_lock:
            self._n_requests += 1
        try:
            resp = self._client.chat.completions.create(
                model=self.model,
                messages=messages,  # type: ignore[arg-type]
                temperature=temperature,
                top_p=top_p,
                max_tokens=max_new_tokens,
                seed=seed,
                n=1,
            )
        except openai.APIResponseValidationError as exc:
            raise MalformedResponseError(f"response failed validation: {exc.message}") from None
        except ValueError as exc:  # json.JSONDecodeError on a 200 with a broken body
            raise MalformedResponseError(f"response body is not valid JSON ({type(exc).__name__})") from None
        return _extract(resp)

    def complete(
        self, messages: list[dict], temperature: float, top_p: float, max_new_tokens: int, seed: int
    ) -> dict:
        """One conversation, no cache: retries, then ``{"text", "n_tokens"}`` or :class:`TeacherCallError`."""
        retrying = Retrying(
            stop=stop_after_attempt(self.max_retries + 1),
            wait=self._wait,
            retry=retry_if_exception(_is_retryable),
            before_sleep=self._before_sleep,
            reraise=False,
        )
        attempts = 0

        def _attempt() -> dict:
            nonlocal attempts
            attempts += 1
            return self._request(messages, temperature, top_p, max_new_tokens, seed)

        try:
            return retrying(_attempt)
        except RetryError as err:
            exc = err.last_attempt.exception() or RuntimeError("unknown error")
            raise self._fail(exc, err.last_attempt.attempt_number, retried=True) from None
        except (openai.OpenAIError, MalformedResponseError) as exc:
            raise self._fail(exc, attempts, retried=False) from None

    # ------------------------------------------------------------------ batches
    def generate(
        self,
        messages_batch: list[list[dict]],
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        seed: int,
        *,
        attempt: int = 0,
    ) -> list[dict]:
        """One ``{"text": str, "n_tokens": int}`` per conversation, in order.

        Cache first (key: model + messages + ``{temperature, top_p, max_new_tokens, seed, attempt}``); misses go
        out on up to ``concurrency`` threads, identical conversations in one batch are asked once, and each
        answer is put into the cache the moment it arrives.  On a failure the calls already running finish (and
        are cached), the not-yet-started ones are dropped, and the first :class:`TeacherCallError` is raised.

        ``attempt`` > 0 asks again for a fresh sample of the same conversation (e.g. after an unparsable
        answer): it is part of the cache key and shifts the request seed to ``seed + attempt``.
        """
        sampling = {
            "temperature": temperature,
            "top_p": top_p,
            "max_new_tokens": max_new_tokens,
            "seed": seed,
            "attempt": attempt,
        }
        request_seed = seed + attempt
        keys = [cache_key(self.model, msgs, sampling) for msgs in messages_batch]
        results: dict[str, dict] = {}
        todo: dict[str, list[dict]] = {}
        for key, msgs in zip(keys, messages_batch, strict=True):
            if key in results or key in todo:
                continue
            hit = (None if self.cache is None else self.cache.get_finished(
                lambda n, msgs=msgs: cache_key(self.model, msgs, {**sampling, "max_new_tokens": n}), max_new_tokens))
            if hit is not None and isinstance(hit.get("text"), str):
                results[key] = hit
            else:
                todo[key] = msgs

        def _one(key: str, msgs: list[dict]) -> None:
            out = self.complete(msgs, temperature, top_p, max_new_tokens, request_seed)
            if self.cache is not None:
                self.cache.put(key, out)
            results[key] = out

        if len(todo) == 1 or self.concurrency == 1:
            for key, msgs in todo.items():
                _one(key, msgs)
        elif todo:
            pool = ThreadPoolExecutor(
                max_workers=min(self.concurrency, len(todo)), thread_name_prefix="teacher"
            )
            try:
                futures: list[Future] = [pool.submit(_one, key, msgs) for key, msgs in todo.items()]
                done, _ = wait(futures, return_when=FIRST_EXCEPTION)
                failed = next((f for f in futures if f in done and f.exception() is not None), None)
                if failed is not None:
                    for f in futures:
                        f.cancel()
                    pool.shutdown(wait=True)  # let running calls finish and land in the cache
                    raise failed.exception()  # type: ignore[misc]
            finally:
                pool.shutdown(wait=False, cancel_futures=True)
        return [dict(results[key]) for key in keys]
