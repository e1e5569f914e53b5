"""History strategies: what part of a conversation is sent to the model when it grows long.

- `keep`: everything; the session's cache policy evicts (or, under `full`, a turn that does not fit is refused).
- `truncate`: drop the oldest whole turns (a user message and the replies after it) until the prompt plus the new
  tokens fit in `limit`; system messages are never dropped, nor the last turn.
- `summarize`: when the history passes `limit`, the model itself summarizes the oldest turns into one system message
  that replaces them. The summary is remembered by the session and put in place of the same turns in every later
  request, so the prompt's prefix stays the same and the summary's KV is built once and reused.

A turn is counted by rendering the messages through the chat template (`count`), the way the model will see them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kvscope.errors import UsageError, usage

STRATEGIES = ("keep", "truncate", "summarize")
SUMMARY_PREFIX = "Summary of the earlier conversation: "
SUMMARY_REQUEST = ("Summarize the conversation so far in a few sentences, keeping names, numbers and what was "
                   "decided. Reply with the summary only.")

Messages = list[dict]
Count = Callable[[Messages], int]  # tokens of the rendered prompt
Summarizer = Callable[[Messages], str]  # the model's summary of these messages


class TooLongError(UsageError):
    """A prompt that cannot fit the limit, whatever the strategy drops."""


@dataclass
class Summary:
    """Turns already summarized: their (role, content) pairs, and the summary that replaces them."""

    covered: tuple[tuple[str, str], ...]
    text: str

    def message(self) -> dict:
        return {"role": "system", "content": SUMMARY_PREFIX + self.text}


@dataclass(frozen=True)
class History:
    """A history strategy: `name` in STRATEGIES, `limit` the most tokens of prompt plus new tokens (None: no limit of
    its own; the session's budget still applies), `keep_turns` the newest turns `summarize` never summarizes."""

    name: str = "keep"
    limit: int | None = None
    keep_turns: int = 2

    def __post_init__(self):
        if self.name not in STRATEGIES:
            raise usage(f"unknown history strategy {self.name!r}", expected="one of " + ", ".join(STRATEGIES),
                        fix="--history (the request's `history` field)")
        if self.limit is not None and (isinstance(self.limit, bool) or not isinstance(self.limit, int)
                                       or self.limit < 1):
            raise usage(f"the history limit must be a whole number of tokens >= 1, got {self.limit!r}",
                        fix="--history-tokens (the request's `history_tokens` field)")

    def prepare(self, messages: Messages, new_tokens: int, count: Count, summary: Summary | None,
                summarize: Summarizer) -> tuple[Messages, Summary | None]:
        """The messages to render for this turn, and the session's summary afterwards."""
        if self.name == "keep" or self.limit is None:
            return messages, summary
        system, turns = split_turns(messages)
        if self.name == "truncate":
            return self._truncate(system, turns, new_tokens, count), summary
        return self._summarize(system, turns, new_tokens, count, summary, summarize)

    def _fits(self, messages: Messages, new_tokens: int, count: Count) -> bool:
        return count(messages) + new_tokens <= self.limit

    def _truncate(self, system: Messages, turns: list[Messages], new_tokens: int, count: Count) -> Messages:
        for start in range(len(turns)):
            candidate = system + flatten(turns[start:])
            if self._fits(candidate, new_tokens, count):
                return candidate
        raise self._too_long(system + flatten(turns[-1:]), new_tokens, count)

    def _summarize(self, system, turns, new_tokens, count, summary, summarize) -> tuple[Messages, Summary | None]:
        start = covered_turns(summary, turns)
        done = start > 0
        head = [summary.message()] if done else []
        candidate = system + head + flatten(turns[start:])
        if self._fits(candidate, new_tokens, count):
            return candidate, summary if done else None
        keep = min(self.keep_turns, len(turns) - 1)
        while keep >= 1:
            cut = len(turns) - keep
            if cut > start:  # there are turns to summarize beyond what the summary covers
                text = summarize(system + head + flatten(turns[start:cut]))
                summary = Summary(covered=pairs(flatten(turns[:cut])), text=text)
                head, start = [summary.message()], cut
            candidate = system + head + flatten(turns[start:])
            if self._fits(candidate, new_tokens, count):
                return candidate, summary
            keep -= 1
        raise self._too_long(system + head + flatten(turns[-1:]), new_tokens, count)

    def _too_long(self, messages: Messages, new_tokens: int, count: Count) -> TooLongError:
        n = count(messages)
        return TooLongError(f"the last turn alone needs {n} prompt tokens + {new_tokens} new tokens = "
                            f"{n + new_tokens}, over the history limit of {self.limit} tokens; expected a shorter "
                            "message or fewer new tokens; change --history-tokens, --new-tokens (max_tokens) or "
                            "--budget")


def split_turns(messages: Messages) -> tuple[Messages, list[Messages]]:
    """Leading system messages, and the turns after them (each starts at a user message)."""
    i = 0
    while i < len(messages) and messages[i]["role"] == "system":
        i += 1
    turns: list[Messages] = []
    for m in messages[i:]:
        if m["role"] == "user" or not turns:
            turns.append([m])
        else:
            turns[-1].append(m)
    return messages[:i], turns


def flatten(turns: list[Messages]) -> Messages:
    return [m for turn in turns for m in turn]


def pairs(messages: Messages) -> tuple[tuple[str, str], ...]:
    return tuple((m["role"], m["content"]) for m in messages)


def covered_turns(summary: Summary | None, turns: list[Messages]) -> int:
    """How many of this request's turns the summary covers: all its turns, ending at a turn boundary, with at least
    one turn after them; 0 when it does not apply (no summary, or an earlier turn was edited)."""
    if summary is None:
        return 0
    n, seen = len(summary.covered), 0
    for i, turn in enumerate(turns[:-1]):
        seen += len(turn)
        if seen == n:
            return i + 1 if pairs(flatten(turns[:i + 1])) == summary.covered else 0
        if seen > n:
            return 0
    return 0


def check_messages(messages) -> Messages:
    """Messages as [{"role", "content"}] with a known role and text content, ending with a user message."""
    if not isinstance(messages, list) or not messages:
        raise usage("messages must be a non-empty list", expected='[{"role": "user", "content": "..."}]',
                    fix="messages")
    out = []
    for i, m in enumerate(messages):
        role, content = (m.get("role"), m.get("content")) if isinstance(m, dict) else (None, None)
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            raise usage(f"messages[{i}] is not a chat message: {m!r}",
                        expected="a role of system, user or assistant and text content", fix=f"messages[{i}]")
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "user":
        raise usage(f"the last message is from {out[-1]['role']!r}", expected="a user message last",
                    fix="messages")
    return out
