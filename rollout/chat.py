"""How an episode's turns become tokens: each piece is tokenized once, when it is appended.

``ChatFormat`` makes the token ids of the two things an episode appends besides the model's own
samples: the prompt (the environment's first observation) and an observation after a model turn.
Nothing is ever re-tokenized: the model's turn stays the exact ids it sampled, and an observation's
text is encoded on its own and appended after them.

Two formats, chosen by the tokenizer:
- chat template (``tokenizer.chat_template`` set, e.g. Qwen): the prompt is the template applied to
  one user message with the generation prompt. An observation is the text the template puts between
  the end of an assistant message and the next generation prompt, around the new messages (role
  'tool': Qwen wraps each in <tool_response>). It is found by rendering the conversation with a
  placeholder assistant message, with and without the new messages: the difference, minus the end
  marker the model already sampled (its eos), is the observation's text.
- plain text (no template, e.g. the character tokenizer of the CPU recipes): the prompt is the
  observation text as is; a tool observation is ``<tool_response>RESULT</tool_response>`` per result,
  a user observation its text as is, both right after the model's turn (which ended with its eos).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE = "<tool_response>", "</tool_response>"
_PLACEHOLDER = "\x00assistant-turn\x00"
SET_BY_THE_RUN = ("conversation", "tools", "tokenize", "add_generation_prompt", "continue_final_message")
"""``apply_chat_template`` arguments the run sets itself: not template variables a config may give."""


def check_template_kwargs(field: str, kwargs: Mapping[str, Any]) -> None:
    """Refuse chat-template variables that would collide with the arguments the run passes."""
    taken = sorted(set(kwargs) & set(SET_BY_THE_RUN))
    if taken:
        raise ValueError(
            f"{field}: {', '.join(taken)} set by the run itself (the messages, tools and generation "
            "prompt); give only the template's own variables, e.g. {enable_thinking: false}"
        )


class ChatFormat:
    """Token ids of prompts and observations for one tokenizer (see the module docstring)."""

    def __init__(
        self,
        tokenizer: Any,
        tool_schemas: list[dict] | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        """``tool_schemas``: JSON schemas handed to the chat template as ``tools`` (ignored by the
        plain format, whose prompt text must describe the tools itself). ``template_kwargs``: the
        template's own variables (e.g. Qwen3's ``enable_thinking``)."""
        self.tokenizer = tokenizer
        self.tool_schemas = tool_schemas
        self.template_kwargs = dict(template_kwargs or {})
        self.uses_template = bool(getattr(tokenizer, "chat_template", None))

    def prompt_ids(self, text: str) -> list[int]:
        """Token ids of the first turn, ending where the model starts its answer."""
        if self.uses_template:
            text = self._render([{"role": "user", "content": text}], generation_prompt=True)
        return self._encode(text)

    def observation_ids(self, contents: list[str], role: str, after_stop: bool) -> list[int]:
        """Token ids appended after a model turn: ``contents`` as messages of ``role``, then what
        the model needs to start its next turn. ``after_stop``: the model's turn ended with its
        stop token (otherwise the format closes the turn itself)."""
        if not self.uses_template:
            if role == "tool":
                return self._encode(
                    "".join(f"{TOOL_RESPONSE_OPEN}{c}{TOOL_RESPONSE_CLOSE}" for c in contents)
                )
            return self._encode("".join(contents))
        history = [{"role": "user", "content": "?"}, {"role": "assistant", "content": _PLACEHOLDER}]
        base = self._render(history, generation_prompt=False)
        full = self._render(
            history + [{"role": role, "content": c} for c in contents], generation_prompt=True
        )
        if not full.startswith(base):
            raise ValueError(
                "the tokenizer's chat template renders earlier messages differently once a new one "
                "follows, so an observation cannot be appended without re-tokenizing; use a template "
                "that renders each message independently of later ones"
            )
        end_of_turn = base[base.index(_PLACEHOLDER) + len(_PLACEHOLDER) :]
        eos = self.tokenizer.eos_token or ""
        if after_stop and eos and end_of_turn.startswith(eos):
            end_of_turn = end_of_turn[len(eos) :]
        return self._encode(end_of_turn + full[len(base) :])

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        kwargs = dict(self.template_kwargs)
        if self.tool_schemas:
            kwargs["tools"] = self.tool_schemas
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt, **kwargs
        )

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))
