"""Which chat template a batch's chat lines are rendered with: the one the server renders
`/v1/chat/completions` with, or none (chat batches refused, saying why).

SGLang 0.5.17 loads the server's template once, at startup, in the launcher's process
(`sglang.srt.parser.template_manager.TemplateManager.initialize_templates`, called by
`http_server` before it sets its global state):

- `--chat-template FILE.jinja`, or no `--chat-template` and no built-in template matched to the
  model path: a Jinja template, which SGLang writes onto `tokenizer_manager.tokenizer.chat_template`
  (the file's text, or the HF template it resolved, e.g. from a multimodal processor). That
  string is what `/v1/chat/completions` renders with; the batch API renders with the same string.
- `--chat-template NAME` (a built-in name), a JSON template file, or a built-in template SGLang
  inferred from the model path: `template_manager.chat_template_name` is set and SGLang renders
  with its own conversation templates (`sglang.srt.parser.conversation`), not with Jinja. The
  batch API tokenizes chats with a Jinja template only, so rather than render them differently
  from the server, it refuses chat batches at creation with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ChatRendering:
    template: str | None = None  # the Jinja text to render chats with; None: the tokenizer's own
    refused: str | None = None  # why chat batches are refused on this server; None: they are not


def chat_rendering(template_manager: Any, tokenizer: Any) -> ChatRendering:
    """From SGLang's template manager and the tokenizer manager's tokenizer, after startup."""
    name = getattr(template_manager, "chat_template_name", None) if template_manager is not None else None
    if name is not None:
        return ChatRendering(refused=(
            f"this server renders chats with SGLang's built-in conversation template {name!r} (from "
            "--chat-template, or matched to the model path), which is not a Jinja template, and the batch API "
            "renders chats only with Jinja templates, so its prompts would differ from /v1/chat/completions'; "
            "start the server with --chat-template FILE.jinja, or send /v1/completions lines with the chat "
            "already rendered as the prompt"))
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if template is not None and not isinstance(template, str):
        return ChatRendering(refused=(
            f"the server's tokenizer holds {type(template).__name__} chat templates, not one, and the batch API "
            "cannot tell which one the server renders with; start the server with --chat-template FILE.jinja"))
    return ChatRendering(template=template)


def sglang_chat_rendering(tokenizer: Any, model_path: str, chat_template_arg: str | None,
                          hf_chat_template_name: str | None = None) -> ChatRendering:
    """Run SGLang's own template loading on `tokenizer` (a Hugging Face tokenizer, changed in
    place as SGLang changes the server's) and read the result: what the fake-engine server uses,
    so its tests go through the code SGLang's server runs."""
    from types import SimpleNamespace

    from sglang.srt.parser.template_manager import TemplateManager

    holder = SimpleNamespace(tokenizer=tokenizer, processor=None,
                             server_args=SimpleNamespace(hf_chat_template_name=hf_chat_template_name))
    manager = TemplateManager()
    manager.initialize_templates(tokenizer_manager=holder, model_path=model_path, chat_template=chat_template_arg)
    return chat_rendering(manager, tokenizer)
