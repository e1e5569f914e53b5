"""The one source of a generation's phases, for the monitor's marks, the profiler's ranges and the doctor's figures.

Both runtimes give the same signal, a call after every forward: kvscope's `generate()` calls its `on_phase(phase,
done, total)` ("prefill" after each chunk, "decode" after each step), and plain transformers `generate()` calls a
logits processor once per new token, which `Phases.logits_processor()` turns into the same calls. From them `Phases`
tells its listeners two things:

- `on_start(name, detail)`: a forward of a new phase (or prefill chunk) is about to run, so a mark made then covers
  it: "prefill" ("chunk 1/4", or "B x N tokens in one forward" for plain generate()), then "decode";
- `on_progress(phase, done, total)`: a forward finished (for progress bars and counters).

`tokens` is how many KV tokens per sequence the forward in flight leaves in the cache (what an overflow reports).

>>> seen = []
>>> phases = Phases(prompt_tokens=8, new_tokens=3, chunk=4, on_start=lambda n, d: seen.append((n, d)))
>>> phases.begin(); phases("prefill", 4, 8); phases("prefill", 8, 8); phases("decode", 1, 3)
>>> seen[:2], seen[2][0], phases.tokens
([('prefill', 'chunk 1/2'), ('prefill', 'chunk 2/2')], 'decode', 10)
"""

from __future__ import annotations

from collections.abc import Callable

StartListener = Callable[[str, str], object]
ProgressListener = Callable[[str, int, int], object]


class Phases:
    def __init__(self, prompt_tokens: int, new_tokens: int, *, chunk: int | None = None, batch: int = 1,
                 on_start: StartListener | list[StartListener] | None = None,
                 on_progress: ProgressListener | list[ProgressListener] | None = None) -> None:
        """`chunk`: prefill tokens per sequence and forward (kvscope's runtime); None: the whole prompt in one."""
        self.prompt_tokens, self.new_tokens, self.batch = prompt_tokens, new_tokens, batch
        self.chunk = chunk or prompt_tokens
        self.one_forward = chunk is None
        self.starts = _listeners(on_start)
        self.progress = _listeners(on_progress)
        self.current: str | None = None  # "prefill chunk 2/4", "decode": the phase running now
        self.tokens = 0

    @property
    def chunks(self) -> int:
        return -(-self.prompt_tokens // self.chunk)

    def begin(self) -> None:
        """The first forward is about to run."""
        self.tokens = min(self.chunk, self.prompt_tokens)
        self._start("prefill", self._prefill_detail(0))

    def __call__(self, phase: str, done: int, total: int) -> None:
        """A forward finished: `done` of `total` prompt tokens (prefill) or new tokens (decode)."""
        if phase == "prefill" and done < self.prompt_tokens:
            self.tokens = min(done + self.chunk, self.prompt_tokens)
            self._start("prefill", self._prefill_detail(done))
        elif phase == "prefill":
            self.tokens = self.prompt_tokens + 1
            if self.new_tokens > 1:
                self._start("decode", f"{self.new_tokens} new tokens: the first from prefill, then "
                                      f"{self.new_tokens - 1} forwards")
        else:  # decode step `done` is over; the next forward feeds token prompt + done
            self.tokens = self.prompt_tokens + done + 1
        for listener in self.progress:
            listener(phase, done, total)

    def logits_processor(self):
        """A transformers LogitsProcessor that reports plain `generate()`'s forwards here (it changes nothing):
        called with the logits of forward `step`, the prefill's first."""
        from kvscope import _compat

        def on_step(step: int) -> None:
            if step == 0:
                self("prefill", self.prompt_tokens, self.prompt_tokens)
            else:
                self("decode", step, self.new_tokens)

        return _compat.step_callback_processor(on_step)

    def _prefill_detail(self, done: int) -> str:
        if self.one_forward:
            return f"{self.batch} x {self.prompt_tokens} tokens in one forward"
        return f"chunk {done // self.chunk + 1}/{self.chunks}"

    def _start(self, name: str, detail: str) -> None:
        self.current = f"{name} {detail}".strip()
        for listener in self.starts:
            listener(name, detail)


def _listeners(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
