"""The built-in chat templates (edge_tune/templates/builtin.py) render as each family's own
template.

Rendered here the way transformers renders a chat template: a sandboxed Jinja environment with
trim_blocks and lstrip_blocks, a ``raise_exception`` global and a ``tojson`` filter that is
plain ``json.dumps`` (no HTML escaping). The expected strings are the published templates'
output for the same messages, written out token for token.
"""

from __future__ import annotations

import json

import pytest
from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edge_tune.errors import EdgeTuneError
from edge_tune.templates.builtin import BUILTIN, EOS, resolve_template, template_name

SPECIALS = {  # bos_token / eos_token of each family's tokenizer
    "chatml": ("<|im_start|>", "<|im_end|>"), "smollm2": ("<|im_start|>", "<|im_end|>"),
    "llama3": ("<|begin_of_text|>", "<|eot_id|>"),
    "qwen2": ("", "<|im_end|>"), "qwen3": ("", "<|im_end|>"), "gemma": ("<bos>", "<eos>"),
    "gemma2": ("<bos>", "<eos>"), "phi3": ("<s>", "<|endoftext|>"), "mistral": ("<s>", "</s>"),
}


def render(name: str, messages: list[dict], add_generation_prompt: bool = False, **kw) -> str:
    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    bos, eos = SPECIALS[name]
    return env.from_string(BUILTIN[name]).render(
        messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos,
        eos_token=eos, **kw)


SYS = [{"role": "system", "content": "Be brief."}]
CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " Hello! "},
        {"role": "user", "content": "Bye"}]

EXPECTED = {  # (with system, without system) for CHAT + generation prompt
    "chatml": (  # plain: no default system message
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n Hello! <|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\n",
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n Hello! <|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"),
    "smollm2": (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n Hello! <|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\n",
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n Hello! "
        "<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"),
    "llama3": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: "
        "December 2023\nToday Date: 26 Jul 2024\n\nBe brief.<|eot_id|><|start_header_id|>user"
        "<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        "Hello!<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: "
        "December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user"
        "<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        "Hello!<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    "qwen2": (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n Hello! <|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\n",
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
        "assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n Hello! "
        "<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"),
    "qwen3": (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n Hello! <|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\n",
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n Hello! <|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"),
    "gemma": (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!"
        "<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n",
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"),
    "gemma2": (
        None,  # "System role not supported"
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"),
    "phi3": (
        "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n Hello! <|end|>\n"
        "<|user|>\nBye<|end|>\n<|assistant|>\n",
        "<|user|>\nHi<|end|>\n<|assistant|>\n Hello! <|end|>\n<|user|>\nBye<|end|>\n"
        "<|assistant|>\n"),
    "mistral": (
        "<s>[INST] Hi[/INST] Hello!</s>[INST] Be brief.\n\nBye[/INST]",
        "<s>[INST] Hi[/INST] Hello!</s>[INST] Bye[/INST]"),
}


def test_every_builtin_is_tested_and_has_an_end_of_turn_token():
    assert set(BUILTIN) == set(EXPECTED) == set(EOS) == set(SPECIALS)
    assert {"chatml", "llama3", "gemma", "mistral", "qwen3"} <= set(BUILTIN)


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_two_turn_chat_with_generation_prompt(name):
    with_system, without = EXPECTED[name]
    assert render(name, CHAT, add_generation_prompt=True) == without
    if with_system is None:
        with pytest.raises(TemplateError, match="System role not supported"):
            render(name, SYS + CHAT, add_generation_prompt=True)
    else:
        assert render(name, SYS + CHAT, add_generation_prompt=True) == with_system
    # The answer's turn ends with the family's end-of-turn token.
    done = render(name, CHAT[:2])
    assert EOS[name] in done[done.index("Hello!"):]


def test_training_renders_end_as_the_real_templates_do():
    assert render("phi3", CHAT[:2]).endswith("Hello! <|end|>\n<|endoftext|>")
    assert render("mistral", CHAT[:2]) == "<s>[INST] Hi[/INST] Hello!</s>"
    assert render("gemma", CHAT[:2]).endswith("Hello!<end_of_turn>\n")


@pytest.mark.parametrize("name", ["gemma", "gemma2", "mistral"])
def test_roles_must_alternate(name):
    with pytest.raises(TemplateError, match="must alternate"):
        render(name, [CHAT[0], CHAT[0]])


def test_qwen3_reasoning_rewrites_history():
    msgs = [{"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nA1"},
            {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]
    assert render("qwen3", msgs) == (
        "<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
        "<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
        "A2<|im_end|>\n")
    assert render("qwen3", msgs[:2]).endswith(
        "<|im_start|>assistant\n<think>\nhmm\n</think>\n\nA1<|im_end|>\n")
    assert render("qwen3", msgs[:1], add_generation_prompt=True, enable_thinking=False) \
        .endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                         "parameters": {"type": "object", "properties": {
                                             "city": {"type": "string"}}}}}
CALL = [{"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "abcdefghi", "type": "function",
             "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "tool_call_id": "abcdefghi", "content": "-3 C"}]


def test_tool_formats():
    qwen = render("qwen2", CALL, tools=[TOOL])
    assert "# Tools\n\nYou may call one or more functions" in qwen
    assert "<tools>\n" + json.dumps(TOOL) + "\n</tools>" in qwen
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": '
            '{"city": "Oslo"}}\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n'
            '-3 C\n</tool_response><|im_end|>\n') in qwen
    # Qwen3's own template tests `'</think>' in message.content`: content None raises there.
    with pytest.raises(TypeError):
        render("qwen3", CALL, tools=[TOOL])
    qwen3 = render("qwen3", [CALL[0], {**CALL[1], "content": ""}, CALL[2]], tools=[TOOL])
    assert qwen3.startswith("<|im_start|>system\n# Tools\n") and "<tool_call>\n" in qwen3
    llama = render("llama3", CALL, tools=[TOOL])
    assert "Environment: ipython\n" in llama
    assert json.dumps(TOOL, indent=4) + "\n\nWeather in Oslo?<|eot_id|>" in llama
    assert ('<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather", '
            '"parameters": {"city": "Oslo"}}<|eot_id|><|start_header_id|>ipython'
            '<|end_header_id|>\n\n"-3 C"<|eot_id|>') in llama
    mistral = render("mistral", CALL, tools=[TOOL])
    assert mistral == (
        '<s>[AVAILABLE_TOOLS] [{"type": "function", "function": {"name": "get_weather", '
        '"description": "Weather now", "parameters": {"type": "object", "properties": '
        '{"city": {"type": "string"}}}}}][/AVAILABLE_TOOLS][INST] Weather in Oslo?[/INST]'
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo"}, "id": '
        '"abcdefghi"}]</s>[TOOL_RESULTS] {"content": -3 C, "call_id": "abcdefghi"}'
        '[/TOOL_RESULTS]')


def test_resolve_and_name(tmp_path):
    for name, text in BUILTIN.items():
        assert resolve_template(name) == text and template_name(text) == name
    f = tmp_path / "t.jinja"
    f.write_text("{{ messages[0]['content'] }}", encoding="utf-8")
    assert resolve_template(str(f)) == "{{ messages[0]['content'] }}"
    assert template_name("{{ messages[0]['content'] }}") is None
    with pytest.raises(EdgeTuneError, match=r"^--chat-template nope: not a built-in name "
                                            r"\(chatml, smollm2, llama3, .*\) or a file$"):
        resolve_template("nope")
    bad = tmp_path / "bad.jinja"
    bad.write_text("ok\n{% if %}", encoding="utf-8")
    with pytest.raises(EdgeTuneError, match=r"bad\.jinja:2: not a valid Jinja template"):
        resolve_template(str(bad))


def test_smollm2_is_the_default_models_own_and_chatml_has_no_persona(default_gguf):
    from edge_tune.templates.choice import gguf_chat_template

    assert template_name(gguf_chat_template(default_gguf)) == "smollm2"
    assert "SmolLM" not in render("chatml", CHAT) and "SmolLM" in render("smollm2", CHAT)
