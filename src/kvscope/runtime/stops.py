"""When a row of a generation is done: a stop token id, a stop string, or the token limit.

Tokens reach the host one step late (kvscope.runtime.generate copies each step's ids asynchronously and reads them
while the next step runs), so a row is known to be done at most one step after it is; the steps it makes after its
stop are dropped here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvscope.errors import usage


@dataclass
class StopRule:
    eos_ids: frozenset[int] = frozenset()
    strings: tuple[str, ...] = ()
    tokenizer: object = None

    def __post_init__(self):
        if any(not isinstance(s, str) or not s for s in self.strings):
            raise usage(f"stop strings must be non-empty text, got {list(self.strings)!r}", fix="stop_strings")
        if self.strings and self.tokenizer is None:
            raise usage("stop strings need the tokenizer to read the generated text", fix="tokenizer")

    @property
    def active(self) -> bool:
        return bool(self.eos_ids or self.strings)


@dataclass
class RowState:
    tokens: list[int] = field(default_factory=list)
    length: int | None = None  # tokens to keep, once the row is done
    reason: str = "length"  # "stop" (a stop token or string) or "length" (the token limit, or stopped by the caller)
    _scanned: int = 0  # characters of decoded text already searched for stop strings


class Stops:
    """Per-row bookkeeping of a batch: feed each step's ids, ask whether every row is done."""

    def __init__(self, batch: int, rule: StopRule):
        self.rule = rule
        self.rows = [RowState() for _ in range(batch)]
        self.steps = 0  # steps fed so far

    def feed(self, ids: list[int]) -> None:
        self.steps += 1
        for row, token in zip(self.rows, ids):
            if row.length is not None:
                continue
            row.tokens.append(token)
            if token in self.rule.eos_ids:
                row.length, row.reason = len(row.tokens) - 1, "stop"
            elif self.rule.strings and self._hit_string(row):
                row.length, row.reason = len(row.tokens), "stop"

    def _hit_string(self, row: RowState) -> bool:
        text = self.rule.tokenizer.decode(row.tokens, skip_special_tokens=False)
        longest = max(len(s) for s in self.rule.strings)
        start = max(0, row._scanned - longest + 1)  # a string may straddle what was scanned and what is new
        row._scanned = len(text)
        return any(s in text[start:] for s in self.rule.strings)

    @property
    def all_done(self) -> bool:
        return all(r.length is not None for r in self.rows)

    def lengths(self) -> list[int]:
        return [len(r.tokens) if r.length is None else r.length for r in self.rows]

    def reasons(self) -> list[str]:
        return [r.reason for r in self.rows]


def cut_at_stop(text: str, strings) -> str:
    """`text` up to the first stop string (the string itself removed), as OpenAI-style APIs return it."""
    hits = [text.find(s) for s in strings or () if s in text]
    return text[:min(hits)] if hits else text
