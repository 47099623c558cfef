"""`mxlm chat-template` must print exactly what Python Jinja2 renders, configured as transformers does.

The reference environment below is transformers' `_compile_jinja_template` (utils/chat_template_utils.py):
ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]), its `tojson`
filter (json.dumps with ensure_ascii=False, no key sorting, no HTML escaping) and `raise_exception` global.
The variables are the ones transformers' apply_chat_template passes: messages, tools (None when absent),
documents=None, add_generation_prompt, the special tokens of tokenizer_config.json (None ones left out)
and the chat_template_kwargs.

A random but seeded suite of conversations is generated per template (MiniMax-M3, Qwen3, DeepSeek-V3):
system/root/developer roles, multi-turn, tools with nested schemas, tool calls with nested arguments (as
objects and as JSON strings), tool results, reasoning content (field and inline markers), list content with
text/image/video parts, thinking_mode values and add_generation_prompt both ways. Each conversation is
rendered either "raw" (messages reach the template unchanged, like transformers) or "normalised" (the
vLLM-style request normalisation of mxlm's ChatTemplate, re-implemented here in `normalize`). When Jinja2
raises, mxlm must fail too (and show raise_exception's message).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import tempfile
from pathlib import Path

import pytest
from jinja2.exceptions import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

SOURCE = Path(os.environ.get("MXLM_SOURCE_DIR", Path(__file__).resolve().parents[2]))
BIN = os.environ.get("MXLM_BIN", str(SOURCE / "build" / "mxlm"))
CONVERSATIONS_PER_TEMPLATE = int(os.environ.get("MXLM_CHAT_TEMPLATE_CASES", "250"))

MODELS = {
    "minimax_m3": SOURCE / "models" / "minimax-m3",
    "qwen3": SOURCE / "tests" / "fixtures" / "chat_templates" / "qwen3",
    "deepseek_v3": SOURCE / "tests" / "fixtures" / "chat_templates" / "deepseek_v3",
}


def transformers_environment() -> ImmutableSandboxedEnvironment:
    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env


def load_model(model_dir: Path) -> tuple[str, dict]:
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}
    jinja_path = model_dir / "chat_template.jinja"
    source = jinja_path.read_text(encoding="utf-8") if jinja_path.exists() else config["chat_template"]
    tokens = {}
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        t = config.get(name)
        if isinstance(t, dict):
            t = t.get("content")
        if isinstance(t, str):
            tokens[name] = t
    return source, tokens


# ---------------------------------------------------------------------------------------------------------
# Conversation generator

TEXTS = [
    "Hello!",
    "What is the weather in Paris?",
    "",
    " ",
    "Line one\nLine two\n",
    "\n\nleading newlines",
    "Quotes ' and \" and `backticks`",
    "Unicode: héllo wörld — 你好 🌍 \u2028 end",
    "Braces {{ not a template }} {% neither %}",
    "JSON-ish {\"a\": 1, \"b\": [1, 2]}",
    "<tool_call>not really</tool_call>",
    "Tabs\tand\r\ncarriage returns",
    "x" * 50,
    "Math: 2 < 3 && 4 > 1",
]
REASONING = ["Let me think.", "Step 1: add.\nStep 2: done.", "", "\nnewline-wrapped\n", "思考中…"]


def rand_scalar(r: random.Random):
    return r.choice([
        r.randint(-1000, 1000), 0, 1, -1, 1.5, 2.0, 1e-05, 1e20, 3.14159, 0.1, True, False, None,
        r.choice(TEXTS), "Paris", "München", "a<b>&c", "null", "",
    ])


def rand_value(r: random.Random, depth: int = 0):
    kind = r.random()
    if depth < 3 and kind < 0.2:
        return {f"k{i}_{r.choice(['a', 'b', 'long_key'])}": rand_value(r, depth + 1) for i in range(r.randint(0, 3))}
    if depth < 3 and kind < 0.35:
        return [rand_value(r, depth + 1) for _ in range(r.randint(0, 3))]
    return rand_scalar(r)


def rand_tool(r: random.Random, i: int) -> dict:
    props = {}
    for j in range(r.randint(0, 4)):
        t = r.choice(["string", "integer", "number", "boolean", "array", "object"])
        p = {"type": t, "description": r.choice(["A value", "Température en °C", "Quoted \"x\"", "multi\nline"])}
        if t == "array":
            p["items"] = {"type": r.choice(["string", "integer", "object"])}
        if t == "object":
            p["properties"] = {"inner": {"type": "number", "default": 1.0}}
        if t == "number" and r.random() < 0.5:
            p["minimum"] = r.choice([0, 0.5, 1e-05, -1.0])
        if t == "string" and r.random() < 0.3:
            p["enum"] = ["a", "b", "ü"]
        props[f"param_{j}"] = p
    fn = {"name": f"tool_{i}_{r.choice(['get', 'set', 'search'])}", "description": r.choice(TEXTS),
          "parameters": {"type": "object", "properties": props, "required": list(props)[:1]}}
    if r.random() < 0.1:
        del fn["description"]
    return {"type": "function", "function": fn}


def rand_content(r: random.Random, allow_parts: bool = True):
    if allow_parts and r.random() < 0.25:
        parts = []
        for _ in range(r.randint(0, 4)):
            c = r.random()
            if c < 0.55:
                parts.append({"type": "text", "text": r.choice(TEXTS)})
            elif c < 0.75:
                parts.append({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}})
            elif c < 0.85:
                parts.append({"type": "image"})
            else:
                parts.append({"type": "video"})
        return parts
    return r.choice(TEXTS)


def rand_tool_call(r: random.Random, tools: list, as_string: bool) -> dict:
    name = r.choice(tools)["function"]["name"] if tools and r.random() < 0.8 else "unknown_tool"
    args = {f"arg_{i}": rand_value(r) for i in range(r.randint(0, 4))}
    call = {"id": f"call_{r.randint(0, 10**6)}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=r.random() < 0.5) if as_string else args}}
    return call


def rand_assistant(r: random.Random, tools: list, model: str, raw: bool) -> dict:
    msg = {"role": "assistant"}
    content = r.choice(TEXTS)
    marker_open, marker_close = ("<mm:think>", "</mm:think>") if model == "minimax_m3" else ("<think>", "</think>")
    c = r.random()
    if c < 0.25:
        msg["reasoning_content"] = r.choice(REASONING)
    elif c < 0.45:
        content = r.choice(["", marker_open]) + r.choice(REASONING) + marker_close + r.choice(["", "\n\n"]) + content
    if r.random() < 0.1 and model == "minimax_m3":
        content = rand_content(r)
    msg["content"] = content
    if r.random() < 0.4:
        # Raw messages reach the template as given: MiniMax-M3 needs objects, DeepSeek-V3 concatenates strings.
        as_string = r.random() < (0.9 if model == "deepseek_v3" else 0.6 if not raw else 0.1)
        msg["tool_calls"] = [rand_tool_call(r, tools, as_string) for _ in range(r.randint(1, 3))]
        if model == "deepseek_v3" and r.random() < 0.8:
            msg["content"] = None
    return msg


def generate(model: str, seed: int) -> dict:
    r = random.Random(seed)
    raw = r.random() < (0.7 if model == "deepseek_v3" else 0.4)
    tools = [rand_tool(r, i) for i in range(r.randint(1, 3))] if r.random() < 0.5 else None
    messages = []
    first = r.random()
    if model == "minimax_m3" and first < 0.2:
        messages.append({"role": "root", "content": rand_content(r)})
        if r.random() < 0.5:
            messages.append({"role": r.choice(["system", "developer"]), "content": rand_content(r)})
    elif first < 0.6:
        role = r.choice(["system", "developer"]) if model == "minimax_m3" else "system"
        messages.append({"role": role, "content": rand_content(r, allow_parts=not raw or model == "minimax_m3")})
    for turn in range(r.randint(1, 4)):
        parts_ok = model == "minimax_m3" or not raw
        messages.append({"role": "user", "content": rand_content(r, allow_parts=parts_ok)})
        if r.random() < 0.05 and model == "deepseek_v3":
            messages.append({"role": "system", "content": r.choice(TEXTS)})
        if turn == 0 and r.random() < 0.3 and len(messages) > 0:
            continue
        a = rand_assistant(r, tools or [], model, raw)
        messages.append(a)
        if "tool_calls" in a and r.random() < 0.85:
            for _ in range(len(a["tool_calls"]) if r.random() < 0.7 else r.randint(1, 3)):
                c = r.random()
                if c < 0.7 or model != "minimax_m3":
                    content = r.choice(['{"temp": 21}', "ok", "", "multi\nline result", "[1, 2, 3]"])
                else:
                    content = r.choice([
                        [{"type": "text", "text": "result text"}],
                        [{"type": "image"}, {"output": "out"}],
                        ["bare string", {"type": "video"}],
                        [{"type": "text", "text": "a"}, {"type": "other", "text": "b"}],
                    ])
                messages.append({"role": "tool", "tool_call_id": "call_x", "content": content})
            if r.random() < 0.6:
                messages.append(rand_assistant(r, tools or [], model, raw))
        elif r.random() < 0.03:
            messages.append({"role": "tool", "content": "orphan tool result"})
    if r.random() < 0.1:
        messages.append({"role": r.choice(["observer", "function"]), "content": "other role"})
    kwargs = {}
    if model == "minimax_m3":
        tm = r.choice([None, "enabled", "disabled", "adaptive", "other"])
        if tm is not None:
            kwargs["thinking_mode"] = tm
        if r.random() < 0.15:
            kwargs["model_identity"] = "You are Mini."
    elif model == "qwen3":
        et = r.choice([None, True, False])
        if et is not None:
            kwargs["enable_thinking"] = et
    return {"messages": messages, "tools": tools, "add_generation_prompt": r.random() < 0.5, "kwargs": kwargs,
            "raw": raw}


# ---------------------------------------------------------------------------------------------------------
# The server normalisation (mirror of ChatTemplate::normalize_messages)


def content_format(source: str) -> str:
    import re

    if re.search(r"\{%-?\s*for\s+\w+\s+in\s+[\w.\[\]'\"]*content\b", source) or re.search(
            r"content\s+is\s+(not\s+)?(string|iterable|sequence|mapping)", source):
        return "openai"
    return "string"


def normalize(messages: list, fmt: str) -> list:
    out = []
    for m in messages:
        m = json.loads(json.dumps(m))
        if isinstance(m.get("content"), list):
            if fmt == "string":
                texts = [p if isinstance(p, str) else p["text"] for p in m["content"]
                         if isinstance(p, str) or (isinstance(p, dict) and p.get("type") in ("text", "input_text")
                                                   and isinstance(p.get("text"), str))]
                m["content"] = "\n".join(texts)
            else:
                parts = []
                for p in m["content"]:
                    t = p.get("type") if isinstance(p, dict) else None
                    if t in ("text", "input_text"):
                        parts.append({"type": "text", "text": p.get("text", "")})
                    elif t in ("image_url", "image", "input_image", "image_pil", "image_embeds"):
                        parts.append({"type": "image"})
                    elif t in ("video_url", "video"):
                        parts.append({"type": "video"})
                    elif t in ("input_audio", "audio_url", "audio"):
                        parts.append({"type": "audio"})
                    else:
                        parts.append(p)
                m["content"] = parts
        if m.get("role") == "assistant" and isinstance(m.get("tool_calls"), list):
            for call in m["tool_calls"]:
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                    fn["arguments"] = json.loads(fn["arguments"])
        out.append(m)
    return out


# ---------------------------------------------------------------------------------------------------------


def render_reference(template, source, tokens, case) -> tuple[bool, str]:
    messages = case["messages"] if case["raw"] else normalize(case["messages"], content_format(source))
    try:
        text = template.render(messages=messages, tools=case["tools"], documents=None,
                                              add_generation_prompt=case["add_generation_prompt"],
                                              **{**tokens, **case["kwargs"]})
        return True, text
    except Exception as e:  # any Jinja2/Python error: mxlm must fail as well
        return False, f"{type(e).__name__}: {e}"


def render_mxlm(model_dir: Path, case, workdir: Path) -> tuple[bool, str]:
    (workdir / "messages.json").write_text(json.dumps(case["messages"]), encoding="utf-8")
    cmd = [BIN, "chat-template", "--model", str(model_dir), "--messages", str(workdir / "messages.json"),
           "--chat-template-kwargs", json.dumps(case["kwargs"])]
    if case["tools"] is not None:
        (workdir / "tools.json").write_text(json.dumps(case["tools"]), encoding="utf-8")
        cmd += ["--tools", str(workdir / "tools.json")]
    if case["add_generation_prompt"]:
        cmd.append("--add-generation-prompt")
    if case["raw"]:
        cmd.append("--raw-messages")
    p = subprocess.run(cmd, capture_output=True, timeout=60)
    if p.returncode != 0:
        return False, p.stderr.decode("utf-8", "replace")
    return True, p.stdout.decode("utf-8")


@pytest.mark.parametrize("model", sorted(MODELS))
def test_generated_conversations_match_jinja2(model, tmp_path):
    env = transformers_environment()
    source, tokens = load_model(MODELS[model])
    template = env.from_string(source)
    reasons = {}
    rendered = errors = 0
    mismatches = []
    for seed in range(CONVERSATIONS_PER_TEMPLATE):
        case = generate(model, seed)
        ok_ref, ref = render_reference(template, source, tokens, case)
        ok_got, got = render_mxlm(MODELS[model], case, tmp_path)
        if ok_ref and ok_got and ref == got:
            rendered += 1
        elif not ok_ref and not ok_got:
            errors += 1
            reasons[ref[:60]] = reasons.get(ref[:60], 0) + 1
            if "TemplateError" in ref and ref.split(": ", 1)[1] not in got:
                mismatches.append((seed, "raise_exception message lost", ref, got))
        else:
            mismatches.append((seed, "output differs", ref, got))
    print(f"\n{model}: {rendered} conversations rendered byte-identical, {errors} rejected by both, "
          f"{len(mismatches)} mismatches; errors: {reasons}")
    assert not mismatches, "\n".join(f"seed {s}: {why}\n  jinja2: {r!r}\n  mxlm:   {g!r}" for s, why, r, g in mismatches[:5])
    # The suite must exercise real renderings, not only errors.
    assert rendered >= CONVERSATIONS_PER_TEMPLATE // 3


def test_template_errors_name_the_line(tmp_path):
    (tmp_path / "t.jinja").write_text("line one\n{% if messages %}\n{{ messages[0].content + 1 }}\n{% endif %}\n")
    (tmp_path / "m.json").write_text(json.dumps([{"role": "user", "content": "hi"}]))
    p = subprocess.run([BIN, "chat-template", "--template", str(tmp_path / "t.jinja"), "--messages",
                        str(tmp_path / "m.json")], capture_output=True)
    assert p.returncode != 0
    assert ":3:" in p.stderr.decode() and "concatenate" in p.stderr.decode()
    (tmp_path / "bad.jinja").write_text("{% for x in y %}\nno end")
    p = subprocess.run([BIN, "chat-template", "--template", str(tmp_path / "bad.jinja"), "--messages",
                        str(tmp_path / "m.json")], capture_output=True)
    assert p.returncode != 0 and "never closed" in p.stderr.decode()


def test_output_has_no_added_newline(tmp_path):
    (tmp_path / "t.jinja").write_text("{{ messages[0].content }}\n")
    (tmp_path / "m.json").write_text(json.dumps([{"role": "user", "content": "x"}]))
    p = subprocess.run([BIN, "chat-template", "--template", str(tmp_path / "t.jinja"), "--messages",
                        str(tmp_path / "m.json")], capture_output=True, check=True)
    assert p.stdout == b"x"  # Jinja2 drops the template's one trailing newline and mxlm adds none
