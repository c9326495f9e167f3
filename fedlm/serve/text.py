"""Text in and out of the tokenizer for serving: chat templates and streamed detokenization.

    template = chat_template(tokenizer)            # a model without a template of its own: "chatml" or "fedlm"
    prompt = render_chat(messages, template)       # ends where the assistant's reply starts
    decoder = TextDecoder(tokenizer, stop=["\\n\\n"])
    delta, stopped = decoder.push(token_id)        # text that is safe to send now

The decoder sends text only once it can no longer change: a token that ends inside a UTF-8
character (byte-level BPE decodes it as U+FFFD) and a tail that could still become a stop
string are held back until the next token settles them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from tokenizers import Tokenizer

ChatTemplate = Literal["fedlm", "chatml"]

EOS_TOKENS = ("<|endoftext|>", "<|im_end|>", "</s>", "<|end_of_text|>", "<|eot_id|>")
"""Special tokens that end a reply, where the tokenizer has them."""

FEDLM_STOPS = ("<|user|>", "<|system|>")
"""In the fedlm template the roles are plain text, so a reply ends where the next turn begins."""


def chat_template(tokenizer: Tokenizer) -> ChatTemplate:
    """SmolLM2's ChatML when the tokenizer knows `<|im_start|>`, else fedlm's plain template."""
    return "chatml" if tokenizer.token_to_id("<|im_start|>") is not None else "fedlm"


def render_chat(messages: Sequence[tuple[str, str]], template: ChatTemplate) -> str:
    """The prompt for (role, content) turns, ending with the opening of the assistant's turn."""
    if template == "chatml":
        turns = [f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in messages]
        return "".join(turns) + "<|im_start|>assistant\n"
    turns = [f"<|{role}|>\n{content}\n" for role, content in messages]
    return "".join(turns) + "<|assistant|>\n"


def eos_ids(tokenizer: Tokenizer) -> list[int]:
    """Ids of the end-of-text tokens this tokenizer has (none for a tokenizer without them)."""
    ids = [tokenizer.token_to_id(token) for token in EOS_TOKENS]
    return [i for i in ids if i is not None]


class TextDecoder:
    """Turns a stream of token ids into text deltas, cut at the first stop string."""

    def __init__(self, tokenizer: Tokenizer, *, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already returned

    def _safe_end(self, text: str) -> int:
        """How much of `text` can no longer change: no broken character, no partial stop."""
        end = len(text.rstrip("\ufffd"))
        for s in self.stop:
            for k in range(min(len(s) - 1, end), 0, -1):
                if text[:end].endswith(s[:k]):
                    end -= k
                    break
        return end

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add one token: (text to send now, whether a stop string was reached)."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            delta = text[self.sent : max(cut, self.sent)]
            self.sent = max(cut, self.sent)
            return delta, True
        end = self._safe_end(text)
        delta = text[self.sent : max(end, self.sent)]
        self.sent = max(end, self.sent)
        return delta, False

    def flush(self) -> str:
        """The held-back tail, once no more tokens will come."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        delta = text[self.sent :]
        self.sent = len(text)
        return delta
