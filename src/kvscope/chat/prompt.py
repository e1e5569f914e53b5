"""Messages to token ids, keeping the ids a session already holds.

A reply the model generated comes back in the next request as text. Tokenizing that text again does not always give
the ids that were generated, and any difference would make the cache recompute from there. So when the new prompt's
text starts with the text of the ids the session holds, those ids are kept as they are and only the rest of the text
is tokenized; otherwise the whole text is tokenized and compared id by id (an edited history).
"""

from __future__ import annotations

from kvscope.errors import usage

FALLBACK_TEMPLATE = "{role}: {content}\n"  # for tokenizers without a chat template


class Renderer:
    """Chat template + tokenizer of one model."""

    def __init__(self, tokenizer):
        if tokenizer is None:
            raise usage("this model has no tokenizer, so it cannot take chat messages",
                        expected="a model directory with tokenizer files, a .gguf, or smollm2-135m",
                        fix="MODEL, or use token ids (ChatEngine.generate_ids) with a random-weight shape")
        self.tokenizer = tokenizer
        self.templated = bool(getattr(tokenizer, "chat_template", None))

    def text(self, messages: list[dict]) -> str:
        """The prompt as the model sees it, ending where the assistant's reply starts."""
        if self.templated:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "".join(FALLBACK_TEMPLATE.format(**m) for m in messages) + "assistant:"

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False).input_ids) if text else []

    def decode(self, ids: list[int], special: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=not special)

    def count(self, messages: list[dict]) -> int:
        return len(self.encode(self.text(messages)))

    def ids(self, messages: list[dict], held: list[int]) -> list[int]:
        """Token ids of the prompt; `held` (ids a session's cache holds) are kept when the text continues them."""
        text = self.text(messages)
        if held:
            held_text = self.decode(held, special=True)
            if held_text and text.startswith(held_text):
                return held + self.encode(text[len(held_text):])
        return self.encode(text)


class TextStream:
    """Generated ids to text deltas for streaming: never a half character, never part of a stop string."""

    def __init__(self, renderer: Renderer, stop_strings: list[str] | None = None):
        self.renderer, self.stops = renderer, [s for s in stop_strings or [] if s]
        self.ids: list[int] = []
        self.sent = ""
        self.hold = max((len(s) for s in self.stops), default=1) - 1

    def push(self, token: int) -> str:
        self.ids.append(token)
        return self._delta(final=False)

    def finish(self, ids: list[int] | None = None) -> str:
        """The rest of the text; `ids` (the reply's final ids) replace what was pushed, if given."""
        if ids is not None:
            self.ids = list(ids)
        return self._delta(final=True)

    def _delta(self, final: bool) -> str:
        from kvscope.runtime.stops import cut_at_stop

        text = self.renderer.decode(self.ids)
        visible = cut_at_stop(text, self.stops)
        if not final:
            visible = visible.rstrip("\ufffd")  # a multi-byte character not complete yet
            if self.hold and visible == text:
                visible = visible[:max(len(self.sent), len(visible) - self.hold)]
        delta = visible[len(self.sent):] if visible.startswith(self.sent) else ""
        self.sent += delta
        return delta
