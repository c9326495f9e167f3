"""Conversations: instruction records read as messages, rendered with a model's own chat template.

    messages = conversation({"prompt": "2+2?", "response": "4"})   # ValueError(reason) if malformed
    template = ChatTemplate.load(WS)            # WS/chat_template.jinja + WS/tokenizer.json
    ids, mask = template.encode(messages)       # int64 (T,), uint8 (T,): 1 on the assistant's tokens

A record is one of (keys other than these are ignored):

- OpenAI `messages`: a list of `{"role": "system" | "user" | "assistant", "content": str}`;
- `prompt` / `response`;
- Alpaca `instruction` / `input` (optional) / `output`: the user turn is the instruction,
  then a blank line and the input when there is one.

A conversation needs a user turn before its first assistant turn, a non-empty answer in every
assistant turn, ends with an assistant turn, and has a system turn only first.

The template is the model's own (`fedlm data tokenizer --from-model` installs it beside the
tokenizer as WS/chat_template.jinja) and is rendered by transformers' `apply_chat_template`,
the same jinja environment a Hugging Face user of the model gets. Which tokens are the
assistant's is found by rendering the conversation prefix by prefix: the text between
"everything before turn i, plus the generation prompt" and "everything up to turn i" is
turn i's answer (with the template's end-of-turn token, so the model learns to stop).
Templates with `{% generation %}` markers would give the mask directly, but few models' (not
SmolLM2's) have them; the prefix rule works for any template that renders a conversation as
the concatenation of its turns, and one that does not is refused.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers

from fedlm.errors import UserError

TEMPLATE_FILE = "chat_template.jinja"
"""The workspace's chat template, beside its tokenizer.json."""
ROLES = ("system", "user", "assistant")
CHAT_KEYS = ("messages", "prompt", "response", "instruction", "output")
"""A JSON record holding any of these is read as a conversation, not as text."""

Message = dict[str, str]


def is_chat_record(obj: Any) -> bool:
    """Does this JSON record (or parquet row) hold a conversation rather than text?"""
    return isinstance(obj, dict) and any(k in obj for k in CHAT_KEYS)


def _kind(value: Any) -> str:
    """How a bad value reads in a reason: 'missing', 'a list', 'an int'."""
    if value is None:
        return "missing"
    name = {"int": "integer", "float": "number", "bool": "boolean", "dict": "object", "str": "string"}.get(
        type(value).__name__, type(value).__name__)
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _string(obj: dict[str, Any], key: str, *, required: bool = True) -> str:
    value = obj.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{key!r} is {_kind(value)}, not a string")
    return value


def conversation(obj: Any) -> list[Message]:
    """The messages of one record (see the module docstring); ValueError(reason) if malformed."""
    if not isinstance(obj, dict):
        raise ValueError(f"{_kind(obj)}, not a JSON object")
    if "messages" in obj:
        raw = obj["messages"]
        if not isinstance(raw, list) or not raw:
            raise ValueError("'messages' is not a non-empty list")
        messages: list[Message] = []
        for i, m in enumerate(raw):
            if not isinstance(m, dict):
                raise ValueError(f"messages[{i}] is {_kind(m)}, not an object")
            role = m.get("role")
            if role not in ROLES:
                raise ValueError(f"messages[{i}] has role {role!r} (missing or not one of {', '.join(ROLES)})")
            content = m.get("content")
            if not isinstance(content, str):
                raise ValueError(f"messages[{i}] ({role}) content is {_kind(content)}, not a string")
            messages.append({"role": str(role), "content": content})
    elif "instruction" in obj or "output" in obj:
        instruction, extra = _string(obj, "instruction"), _string(obj, "input", required=False)
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = [{"role": "user", "content": user},
                    {"role": "assistant", "content": _string(obj, "output")}]
    else:
        messages = [{"role": "user", "content": _string(obj, "prompt")},
                    {"role": "assistant", "content": _string(obj, "response")}]
    check_conversation(messages)
    return messages


def check_conversation(messages: list[Message]) -> None:
    """ValueError naming the first turn that makes `messages` unusable for instruction tuning."""
    seen_user = False
    for i, m in enumerate(messages):
        role, content = m["role"], m["content"]
        if role == "system" and i > 0:
            raise ValueError(f"messages[{i}]: a system turn after the first")
        if role == "user":
            if not content.strip():
                raise ValueError(f"messages[{i}]: empty question")
            seen_user = True
        if role == "assistant":
            if not seen_user:
                raise ValueError(f"messages[{i}]: an assistant turn before any user turn")
            if not content.strip():
                raise ValueError(f"messages[{i}]: empty answer")
    if messages[-1]["role"] != "assistant":
        raise ValueError("the last turn is not the assistant's (no answer to train on)")


def flat_text(messages: list[Message]) -> str:
    """The conversation's words, turns separated by blank lines: what the quality filter, dedup
    and the tokenizer's counts see (no template: the silo does not know the model yet)."""
    return "\n\n".join(m["content"] for m in messages)


def template_path(workspace: Path) -> Path:
    return Path(workspace) / TEMPLATE_FILE


def template_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class ChatTemplate:
    """A chat template bound to a tokenizer: renders conversations and finds the answers' tokens."""

    text: str
    tokenizer: tokenizers.Tokenizer
    _hf: Any  # transformers' tokenizer wrapper, for apply_chat_template

    @classmethod
    def load(cls, workspace: Path, *, what: str = "") -> ChatTemplate:
        """The workspace's template and tokenizer; UserError (naming `what` needs it) if none."""
        workspace = Path(workspace)
        path = template_path(workspace)
        if not path.is_file():
            raise UserError(
                f"{what or 'formatting conversations'} needs a chat template, but {workspace / 'tokenizer.json'} "
                f"has none ({path} is missing: the tokenizer was not installed from a chat model); run "
                f"`fedlm data tokenizer --workspace {workspace} --from-model smollm2` (or another chat "
                "model), then `fedlm data shard` again")
        return cls.from_text(path.read_text(encoding="utf-8"), workspace / "tokenizer.json")

    @classmethod
    def from_text(cls, text: str, tokenizer_path: Path) -> ChatTemplate:
        try:
            from transformers import PreTrainedTokenizerFast
        except ImportError:
            raise UserError("formatting conversations needs transformers: pip install 'fedlm[hf]'") from None
        tok = tokenizers.Tokenizer.from_file(str(tokenizer_path))
        tok.encode_special_tokens = False  # the template's own markers (<|im_start|>) are special
        return cls(text, tok, PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=text))

    @property
    def sha256(self) -> str:
        return template_sha256(self.text)

    def specials(self) -> list[str]:
        return [t.content for t in self.tokenizer.get_added_tokens_decoder().values() if t.special]

    def render(self, messages: list[Message], *, add_generation_prompt: bool = False) -> str:
        """The conversation as the model sees it (ValueError if the template refuses it)."""
        try:
            out = self._hf.apply_chat_template(messages, tokenize=False,
                                               add_generation_prompt=add_generation_prompt)
        except Exception as e:  # jinja's TemplateError, raise_exception() in the template
            raise ValueError(f"the chat template refused it ({type(e).__name__}: {e})") from None
        return str(out)

    def answer_spans(self, messages: list[Message]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the [start, end) character span of each assistant turn."""
        text = self.render(messages)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            head = self.render(messages[:i], add_generation_prompt=True)
            upto = self.render(messages[: i + 1])
            if not (upto.startswith(head) and text.startswith(upto)):
                raise UserError(
                    "this chat template does not render a conversation as the concatenation of its "
                    "turns, so the answers' tokens cannot be found; use a model whose template does")
            spans.append((len(head), len(upto.rstrip())))  # the turn's end marker, not the newline after it
        return text, spans

    def encode(self, messages: list[Message]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids (int64) and loss mask (uint8, 1 on the assistant's tokens) of a conversation.

        ValueError when a message holds one of the tokenizer's special tokens as text (it would
        be read as a turn marker) or the template refuses the conversation."""
        specials = self.specials()
        for m in messages:
            hit = next((s for s in specials if s in m["content"]), None)
            if hit is not None:
                raise ValueError(f"a {m['role']} turn holds the special token {hit!r} as text")
        text, spans = self.answer_spans(messages)
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        ids = np.asarray(enc.ids, dtype=np.int64)
        starts = np.asarray([o[0] for o in enc.offsets], dtype=np.int64)
        mask = np.zeros(len(ids), dtype=np.uint8)
        for a, b in spans:
            mask[(starts >= a) & (starts < b)] = 1
        return ids, mask
