"""Multi-turn prompts: render the checkpoint's own chat template (jinja2, sandboxed, as HF does)."""

from __future__ import annotations

from runtime import contract as C
from runtime.generate import Pipeline, PromptError


def render(pipe: Pipeline, turns: list[dict]) -> str:
    """Conversation text for `turns`: [{role, text}] (the image in the first user turn), or HF
    messages [{role, content: [{"type": "image" | "video" | "text", ...}]}] as they are."""
    template = pipe.prompt_cfg.get(C.PR_CHAT)
    if not template:
        raise PromptError("this bundle has no chat template; ask one question with -p instead")
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    messages = []
    for i, t in enumerate(turns):
        if "content" in t:
            messages.append({"role": t["role"], "content": t["content"]})
            continue
        content = [{"type": "text", "text": t["text"]}]
        if i == 0:
            content.insert(0, {"type": "image"})
        messages.append({"role": t["role"], "content": content})
    return env.from_string(template).render(messages=messages, add_generation_prompt=True)
