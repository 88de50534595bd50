"""Prompt templates: the model's chat template when it has one, a plain template otherwise."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

TASK_INSTRUCTIONS = {
    "summarization": "Summarize the following article in two or three sentences.\n\n{source}",
    "translation": "Translate the following {src_lang} text into {tgt_lang}. Reply with the translation only.\n\n{source}",
    "plain": "{source}",
}
LANGUAGES = {"en": "English", "de": "German", "ro": "Romanian", "fr": "French", "es": "Spanish", "cs": "Czech",
             "ru": "Russian", "zh": "Chinese", "ja": "Japanese", "it": "Italian", "pt": "Portuguese"}


@dataclass(frozen=True)
class PromptTemplate:
    """How a corpus row becomes a prompt.

    template: a str.format template over {source}, {src_lang}, {tgt_lang}; default by task.
    chat: wrap in the tokenizer's chat template (None = when the tokenizer has one).
    """

    task: str = "summarization"
    template: str | None = None
    chat: bool | None = None
    system: str | None = None

    def __post_init__(self) -> None:
        if self.template is None and self.task not in TASK_INSTRUCTIONS:
            raise ValueError(f"task must be one of {', '.join(TASK_INSTRUCTIONS)} (or give a template), got {self.task!r}")
        if self.template is not None and "{source}" not in self.template:
            raise ValueError(f"prompt template must contain {{source}}, got {self.template!r}")

    def render(self, tokenizer: PreTrainedTokenizerBase | None, source: str, src_lang: str | None = None,
               tgt_lang: str | None = None) -> str:
        template = self.template or TASK_INSTRUCTIONS[self.task]
        text = template.format(source=source, src_lang=LANGUAGES.get(src_lang or "", src_lang or "the source language"),
                               tgt_lang=LANGUAGES.get(tgt_lang or "", tgt_lang or "the target language"))
        use_chat = self.chat if self.chat is not None else bool(getattr(tokenizer, "chat_template", None))
        if not use_chat or tokenizer is None:
            return text
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + [
            {"role": "user", "content": text}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
