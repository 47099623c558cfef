"""`mxlm serve` against the official `openai` client (PyPI) on the serve-tiny model: chat and completions,
streaming with usage, stop strings, n, logprobs, tokenize/detokenize, model list, errors and auth. Greedy
outputs are checked against `mxlm generate` (the engine without the server) and HF `tokenizers` decoding; tool
calls and reasoning are driven by recorded M3 outputs (tests/fixtures/m3_outputs) through --scripted-output."""
import json
import os
import subprocess
import sys

import openai
import pytest
from tokenizers import Tokenizer

sys.path.insert(0, os.path.join(os.environ.get("MXLM_SOURCE_DIR", "."), "tests", "server"))
from serve_helpers import MODEL_NAME, MXLM, OUTPUTS, Server, make_model  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    s = Server(model_dir, tmp_path_factory.mktemp("logs"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def hf(model_dir):
    return Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))


MESSAGES = [{"role": "user", "content": "What is 12 times 7? Answer briefly."}]


def generate_ids(model_dir, prompt_ids, n):
    res = subprocess.run([MXLM, "generate", "--model", model_dir, "--tokens", ",".join(map(str, prompt_ids)),
                          "--max-tokens", str(n), "--temperature", "0", "--ignore-eos"],
                         check=True, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return [int(t) for t in res.stdout.strip().split(",")]


def test_models_and_health(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert models.data[0].object == "model"
    status, _ = server.post("/tokenize", {"prompt": "hello"})
    assert status == 200


def test_tokenize_detokenize_match_hf(server, hf):
    text = "Natalia sold clips to 48 of her friends in April. ]~b]<mm:think>"
    status, body = server.post("/tokenize", {"prompt": text, "model": MODEL_NAME})
    assert status == 200
    assert body["tokens"] == hf.encode(text).ids and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == 4096
    status, body = server.post("/detokenize", {"tokens": hf.encode(text).ids})
    assert status == 200 and body["prompt"] == hf.decode(hf.encode(text).ids, skip_special_tokens=False)


def test_completion_greedy_equals_engine_and_hf_decoding(server, client, model_dir, hf):
    prompt_ids = hf.encode("Janet has 3 ducks and").ids
    expected = generate_ids(model_dir, prompt_ids, 12)
    r = client.completions.create(model=MODEL_NAME, prompt=prompt_ids, max_tokens=12, temperature=0, logprobs=0,
                                  extra_body={"ignore_eos": True})
    c = r.choices[0]
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert c.finish_reason == "length"
    assert r.usage.prompt_tokens == len(prompt_ids) and r.usage.completion_tokens == 12
    assert r.usage.total_tokens == len(prompt_ids) + 12
    assert c.text == hf.decode(expected)
    assert [t for t in c.logprobs.tokens] == [hf.decode([i], skip_special_tokens=False) for i in expected]
    assert all(lp <= 0 for lp in c.logprobs.token_logprobs)


def test_completion_string_prompt_echo_and_batch(client, hf):
    r = client.completions.create(model=MODEL_NAME, prompt="The answer is", max_tokens=5, temperature=0, echo=True)
    assert r.choices[0].text.startswith("The answer is")
    r2 = client.completions.create(model=MODEL_NAME, prompt=["The answer is", "Ducks"], max_tokens=5, temperature=0)
    assert len(r2.choices) == 2 and [c.index for c in r2.choices] == [0, 1]
    assert "The answer is" + r2.choices[0].text == r.choices[0].text
    assert r2.usage.prompt_tokens == len(hf.encode("The answer is").ids) + len(hf.encode("Ducks").ids)


def test_chat_shape_usage_and_streaming_agree(server, client):
    r = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=16, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == MODEL_NAME
    m = r.choices[0].message
    assert m.role == "assistant" and r.choices[0].finish_reason in ("length", "stop")
    status, tok = server.post("/tokenize", {"messages": MESSAGES, "add_generation_prompt": True})
    assert r.usage.prompt_tokens == tok["count"]
    assert r.usage.completion_tokens == 16
    text = (m.reasoning_content if hasattr(m, "reasoning_content") and m.reasoning_content else "") + (m.content or "")

    stream = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    content, reasoning, finish, usage = "", "", None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for ch in chunk.choices:
            content += ch.delta.content or ""
            reasoning += getattr(ch.delta, "reasoning_content", None) or ""
            finish = ch.finish_reason or finish
    assert reasoning + content == text
    assert finish == r.choices[0].finish_reason
    assert usage.prompt_tokens == r.usage.prompt_tokens and usage.completion_tokens == 16


def test_lm_eval_style_request_with_extra_fields(server):
    body = {"messages": [{"role": "user", "content": "Q: 2+2?", "type": "text"}], "model": MODEL_NAME,
            "max_tokens": 8, "temperature": 0.0, "stop": ["Question:", "</s>", "<|im_end|>"], "seed": 1234}
    status, r = server.post("/v1/chat/completions", body)
    assert status == 200 and r["choices"][0]["message"]["role"] == "assistant"
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Q: 2+2?"}]}], "max_tokens": 4}
    status, r = server.post("/v1/chat/completions", parts)
    assert status == 200


def test_stop_strings_cut_text_also_when_streaming(client, hf):
    base = client.completions.create(model=MODEL_NAME, prompt="Count: one two", max_tokens=24, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    assert len(base) >= 6
    stop = base[len(base) // 2: len(base) // 2 + 3]
    expected = base[: base.index(stop)]
    r = client.completions.create(model=MODEL_NAME, prompt="Count: one two", max_tokens=24, temperature=0,
                                  stop=[stop], extra_body={"ignore_eos": True})
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL_NAME, prompt="Count: one two", max_tokens=24, temperature=0, stop=[stop], stream=True,
        extra_body={"ignore_eos": True}) if c.choices)
    assert streamed == expected
    r = client.completions.create(model=MODEL_NAME, prompt="Count: one two", max_tokens=24, temperature=0,
                                  stop=[stop], extra_body={"ignore_eos": True, "include_stop_str_in_output": True})
    assert r.choices[0].text == expected + stop


def test_n_and_seeds(client):
    kw = dict(model=MODEL_NAME, messages=MESSAGES, max_tokens=10, temperature=1.0, n=3, seed=7)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    g = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=10, temperature=0, n=2)
    assert g.choices[0].message.content == g.choices[1].message.content
    c = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=10, temperature=1.0, n=1,
                                       seed=7)
    assert c.choices[0].message.content == a.choices[0].message.content  # choice i uses seed + i


def test_chat_logprobs(client):
    r = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=6, temperature=0,
                                       logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    entries = r.choices[0].logprobs.content
    assert len(entries) == 6
    for e in entries:
        assert len(e.top_logprobs) == 3
        assert e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob >= e.top_logprobs[2].logprob
        assert e.token == e.top_logprobs[0].token and abs(e.logprob - e.top_logprobs[0].logprob) < 1e-6
        assert bytes(e.bytes).decode("utf-8") == e.token


def test_errors_are_openai_errors(server, client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MESSAGES, max_tokens=4)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=10**9)
    assert "max_tokens" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL_NAME, prompt="x " * 4200, max_tokens=4)
    assert "maximum context length" in str(e.value)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, temperature="hot")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL_NAME, messages=[], max_tokens=4)
    status, body = server.post("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2})
    assert status == 200


@pytest.fixture(scope="module")
def auth_server(model_dir, tmp_path_factory):
    s = Server(model_dir, tmp_path_factory.mktemp("logs"), api_key="sekret")
    yield s
    s.stop()


def test_api_key(auth_server):
    ok = auth_server.client().chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=2)
    assert ok.choices
    import openai as oa
    bad = oa.OpenAI(base_url=auth_server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(oa.AuthenticationError):
        bad.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=2)
    status, _ = auth_server.post("/v1/completions", {"prompt": "x", "max_tokens": 1})
    assert status == 401


def expected_output(name):
    with open(os.path.join(OUTPUTS, "expected.json")) as f:
        return json.load(f)[name]


@pytest.fixture(scope="module")
def tools():
    with open(os.path.join(OUTPUTS, "tools.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("name", ["tool_single", "tool_parallel_nested", "enabled_plain", "tool_enabled_with_content"])
def test_recorded_outputs_through_the_parsers(model_dir, tmp_path_factory, tools, name):
    exp = expected_output(name)
    s = Server(model_dir, tmp_path_factory.mktemp("logs"), scripted=os.path.join(OUTPUTS, name + ".txt"))
    try:
        c = s.client()
        kw = dict(model=MODEL_NAME, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=tools,
                  max_tokens=1000, temperature=0)
        if exp["thinking_enabled"]:
            kw["extra_body"] = {"chat_template_kwargs": {"thinking_mode": "enabled"}}
        r = c.chat.completions.create(**kw)
        m = r.choices[0].message
        assert (m.content or "") == exp["content"]
        assert getattr(m, "reasoning_content", None) == exp["reasoning"]
        assert getattr(m, "reasoning", None) == exp["reasoning"]
        calls = [{"name": t.function.name, "arguments": json.loads(t.function.arguments)} for t in m.tool_calls or []]
        assert calls == exp["tool_calls"]
        assert r.choices[0].finish_reason == ("tool_calls" if calls else "stop")

        # Streaming: the deltas add up to the same message.
        content, reasoning, args, names, finish = "", "", {}, {}, None
        for chunk in c.chat.completions.create(stream=True, **kw):
            for ch in chunk.choices:
                content += ch.delta.content or ""
                reasoning += getattr(ch.delta, "reasoning_content", None) or ""
                for t in ch.delta.tool_calls or []:
                    if t.function and t.function.name:
                        names[t.index] = t.function.name
                    args[t.index] = args.get(t.index, "") + ((t.function.arguments or "") if t.function else "")
                finish = ch.finish_reason or finish
        assert content == exp["content"] and reasoning == (exp["reasoning"] or "")
        assert [{"name": names[i], "arguments": json.loads(args[i])} for i in sorted(names)] == exp["tool_calls"]
        assert finish == ("tool_calls" if calls else "stop")

        # tool_choice none: the block stays content; auto without --enable-auto-tool-choice is refused elsewhere.
        r = c.chat.completions.create(tool_choice="none", **kw)
        assert not r.choices[0].message.tool_calls
    finally:
        s.stop()


def test_auto_tool_choice_needs_the_flag(model_dir, tmp_path_factory, tools):
    s = Server(model_dir, tmp_path_factory.mktemp("logs"), auto_tools=False)
    try:
        with pytest.raises(openai.BadRequestError) as e:
            s.client().chat.completions.create(model=MODEL_NAME, messages=MESSAGES, tools=tools, max_tokens=2)
        assert "--enable-auto-tool-choice" in str(e.value)
        r = s.client().chat.completions.create(model=MODEL_NAME, messages=MESSAGES, tools=tools, tool_choice="none",
                                               max_tokens=2)
        assert r.choices[0].message.tool_calls == []
    finally:
        s.stop()
    res = subprocess.run([MXLM, "serve", model_dir, "--enable-auto-tool-choice", "--block-size", "4"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "--tool-call-parser" in (res.stderr + res.stdout)
    res = subprocess.run([MXLM, "serve", model_dir, "--block-size", "128"], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "sparse attention block size" in (res.stderr + res.stdout)


def test_prefix_cache_serves_repeated_prompts(client):
    messages = [{"role": "user", "content": "Prefix cache check: how many legs do 3 spiders have?"}]
    a = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=8, temperature=0)
    b = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=8, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content
    cached = b.usage.prompt_tokens_details.cached_tokens
    assert b.usage.prompt_tokens - 4 <= cached < b.usage.prompt_tokens  # whole 4-token blocks, one token computed
