"""tool_choice "required" and a named function on `mxlm serve` WITHOUT --scripted-output: the serve-tiny model
has random weights and never writes a tool call by itself (checked with tool_choice "auto"), so every call here
comes from the engine's token constraint. Checked through the official `openai` client: the raw output (the
logprob tokens) opens with the M3 tool-call prefix of the spec, the parsed call names the right function, and
streaming, n > 1 and temperature sampling get the same guarantee."""
import os
import sys

import openai
import pytest

sys.path.insert(0, os.path.join(os.environ.get("MXLM_SOURCE_DIR", "."), "tests", "server"))
from serve_helpers import MODEL_NAME, Server, make_model  # noqa: E402

NS = "]<]minimax[>["  # spec m3_chat_and_tools.md §3
OPEN = NS + "<tool_call>\n" + NS + '<invoke name="'
MESSAGES = [{"role": "user", "content": "What time is it in Paris, and what is the weather?"}]


def tool(name):
    return {"type": "function", "function": {"name": name, "description": name.replace("_", " "),
                                             "parameters": {"type": "object",
                                                            "properties": {"city": {"type": "string"}}}}}


# Names that share prefixes, so the name trie has to branch.
TOOLS = [tool("get_weather"), tool("get_time"), tool("get")]
NAMES = {"get_weather", "get_time", "get"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(make_model(tmp_path_factory.mktemp("model")), tmp_path_factory.mktemp("logs"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def raw_text(choice):
    return "".join(t.token for t in choice.logprobs.content)


def test_auto_makes_no_call_on_this_model(client):
    r = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, tool_choice="auto",
                                       max_tokens=30, temperature=0)
    assert not r.choices[0].message.tool_calls and r.choices[0].finish_reason in ("length", "stop")


@pytest.mark.parametrize("name", ["get_time", "get"])
def test_named_function_is_called(client, name):
    r = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, max_tokens=30,
                                       temperature=0, logprobs=True,
                                       tool_choice={"type": "function", "function": {"name": name}})
    c = r.choices[0]
    assert raw_text(c).startswith(OPEN + name + '">')
    assert [t.function.name for t in c.message.tool_calls] == [name]
    assert c.finish_reason == "tool_calls"


def test_required_calls_one_of_the_tools(client):
    r = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                       max_tokens=30, temperature=0, logprobs=True)
    c = r.choices[0]
    raw = raw_text(c)
    assert raw.startswith(OPEN)
    name = raw[len(OPEN):].split('"')[0]
    assert name in NAMES and raw.startswith(OPEN + name + '">')
    assert [t.function.name for t in c.message.tool_calls][:1] == [name]
    assert c.finish_reason == "tool_calls"


def test_required_with_sampling_and_n(client):
    r = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                       max_tokens=25, temperature=1.5, top_p=1.0, seed=7, n=4)
    assert len(r.choices) == 4
    for c in r.choices:
        assert c.message.tool_calls and c.message.tool_calls[0].function.name in NAMES
        assert c.finish_reason == "tool_calls"


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_streaming(client, tool_choice):
    kw = dict(model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, tool_choice=tool_choice, max_tokens=30,
              temperature=0)
    whole = client.chat.completions.create(**kw).choices[0]
    names, finish = {}, None
    for chunk in client.chat.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            for t in ch.delta.tool_calls or []:
                if t.function and t.function.name:
                    names[t.index] = t.function.name
            finish = ch.finish_reason or finish
    assert names and names[0] in NAMES
    if isinstance(tool_choice, dict):
        assert names[0] == "get_weather"
    assert [names[i] for i in sorted(names)] == [t.function.name for t in whole.message.tool_calls]
    assert finish == "tool_calls"


def test_bad_named_choice_is_refused(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, max_tokens=5,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    assert "nope" in str(e.value)
