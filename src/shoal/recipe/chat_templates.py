"""The ``chat_template`` key of a recipe: a built-in name, ``auto``, or a Jinja template.

A merged model's tokenizer carries the chat template of its tokenizer source unless the
recipe sets one. mergekit recipes name a few well-known formats; shoal writes each as
its own Jinja template (the formats are public conventions: the role markers and the
generation prompt below are what those model families were trained on).
"""

from __future__ import annotations

from shoal.errors import RecipeError

__all__ = ["BUILTIN_CHAT_TEMPLATES", "check_chat_template"]

BUILTIN_CHAT_TEMPLATES: dict[str, str] = {
    # ChatML: <|im_start|>role\ncontent<|im_end|>\n per message
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    # Llama 3: a header per role, each turn closed by <|eot_id|>
    "llama3": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
        "{{ message['content'] | trim }}{{ '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
        "{% endif %}"
    ),
    # Alpaca: ### Instruction / ### Response sections
    "alpaca": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'user' %}"
        "{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'assistant' %}"
        "{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
    ),
}


def check_chat_template(value: str) -> None:
    """Refuse a ``chat_template`` that is no built-in name, not ``auto`` and not Jinja.

    A plain word is taken for a misspelt name rather than written as the template (a
    tokenizer would then render every conversation as that word).

    Raises:
        RecipeError: Naming the key, for an unknown name or a template that does not parse.
    """
    if value == "auto" or value in BUILTIN_CHAT_TEMPLATES:
        return
    if "{{" not in value and "{%" not in value:
        known = ", ".join(["auto", *sorted(BUILTIN_CHAT_TEMPLATES)])
        raise RecipeError(
            f"chat_template: {value!r} is neither a known name ({known}) nor a Jinja template"
        )
    import jinja2  # a dependency of torch

    try:
        _compile(value)
    except jinja2.TemplateSyntaxError as exc:
        raise RecipeError(
            f"chat_template: not a valid Jinja template (line {exc.lineno}: {exc.message})"
        ) from None


def _compile(template: str) -> None:
    """Compile ``template`` as transformers will render it (its extensions and tags)."""
    try:  # a private helper: where a transformers release lacks it, plain Jinja with loops
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:
        import jinja2

        jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(template)
    else:
        _compile_jinja_template(template)
