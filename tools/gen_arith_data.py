"""Grade-school arithmetic word problems in GSM8K's answer style, for the bundled default model.

Every problem has a question, a worked answer with calculator annotations (`<<3*4=12>>12`) and a final line
`#### N`, exactly like `openai/gsm8k`. Templates: shopping, change, rates, ages, sharing, packs, multi-step.
Numbers are kept small (one-digit times at most two-digit factors, sums of at most three digits) so that a
model of a few million parameters can learn the arithmetic.

Deterministic by seed. The held-out test split is generated from its own seed and every training problem whose
question text is also a test question is dropped, so the splits are disjoint.

Formats (all rendered with the real MiniMax-M3 chat template, `models/default/chat_template.jinja`, through
Python Jinja2 configured as transformers does):
  fewshot  5-shot multi-turn conversations exactly as `mxlm eval` / lm-eval send them ("Question: ...\nAnswer:"
           user turns, the full answers as assistant turns), plus the model's reply to the last question.
  think    one question in plain words; the assistant reasons inside <mm:think> and gives the answer.
  tool     a calculator tool in the M3 tool-call format: one tool call per step, tool results, final answer.

CLI:
  python3 tools/gen_arith_data.py --out data/arith            # test.jsonl + train.jsonl.xz (the few-shot pool)
  python3 tools/gen_arith_data.py --samples 3                 # print rendered samples of each format
"""

import argparse
import json
import lzma
import os
import random
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATE_PATH = os.path.join(ROOT, "models", "default", "chat_template.jinja")

TEST_SEED = 20261126
TRAIN_SEED = 7
POOL_SIZE = 2000  # few-shot pool written to train.jsonl.xz
TEST_SIZE = 500

NAMES = [("Mia", "she"), ("Liam", "he"), ("Ava", "she"), ("Noah", "he"), ("Emma", "she"), ("Omar", "he"),
         ("Sofia", "she"), ("Lucas", "he"), ("Zoe", "she"), ("Ethan", "he"), ("Lily", "she"), ("Jack", "he"),
         ("Nora", "she"), ("Leo", "he"), ("Chloe", "she"), ("Sam", "he"), ("Maya", "she"), ("Ben", "he"),
         ("Grace", "she"), ("Ravi", "he"), ("Hana", "she"), ("Diego", "he"), ("Ella", "she"), ("Tom", "he")]
ITEMS = ["notebooks", "pens", "apples", "cupcakes", "stickers", "books", "toy cars", "candles", "mugs", "pencils",
         "oranges", "cookies", "marbles", "shirts", "plants", "tickets", "balloons", "bracelets"]
MAKES = [("machine", "bottles"), ("baker", "loaves"), ("printer", "pages"), ("factory", "chairs"),
         ("farmer", "baskets"), ("robot", "boxes"), ("team", "posters"), ("tailor", "shirts")]
ANIMALS = ["cows", "sheep", "chickens", "goats", "ducks", "rabbits", "horses", "pigs"]
CONTAINERS = [("boxes", "pencils"), ("bags", "marbles"), ("crates", "apples"), ("packs", "cards"),
              ("jars", "candies"), ("trays", "eggs"), ("shelves", "books")]


class Problem:
    def __init__(self, question, lines, answer):
        self.question = question
        self.lines = lines  # list of (text_before, a, op, b, result, text_after)
        self.answer = answer

    def steps(self):
        return [(f"{a}{op}{b}", r) for (_, a, op, b, r, _) in self.lines]

    def gsm8k_answer(self):
        out = []
        for before, a, op, b, r, after in self.lines:
            out.append(f"{before}{a} {op} {b} = <<{a}{op}{b}={r}>>{r}{after}")
        out.append(f"#### {self.answer}")
        return "\n".join(out)

    def reasoning(self):
        return "\n".join(f"{before}{a} {op} {b} = {r}{after}" for before, a, op, b, r, after in self.lines)

    def record(self):
        return {"question": self.question, "answer": self.gsm8k_answer()}


def shopping(r):
    name, pron = r.choice(NAMES)
    i1, i2 = r.sample(ITEMS, 2)
    n, p, m, q = r.randint(2, 9), r.randint(2, 12), r.randint(2, 9), r.randint(2, 12)
    x, y = n * p, m * q
    question = (f"{name} buys {n} {i1} for ${p} each and {m} {i2} for ${q} each. "
                f"How much does {pron} spend in all?")
    return Problem(question, [
        (f"The {i1} cost ", n, "*", p, x, " dollars."),
        (f"The {i2} cost ", m, "*", q, y, " dollars."),
        (f"In all, {name} spends ", x, "+", y, x + y, " dollars."),
    ], x + y)


def change(r):
    name, pron = r.choice(NAMES)
    item = r.choice(ITEMS)
    n, p = r.randint(2, 9), r.randint(2, 12)
    x = n * p
    money = x + r.randint(1, 60)
    question = f"{name} has ${money}. {pron.capitalize()} buys {n} {item} that cost ${p} each. How much money does {name} have left?"
    return Problem(question, [
        (f"The {item} cost ", n, "*", p, x, " dollars."),
        (f"{name} has ", money, "-", x, money - x, " dollars left."),
    ], money - x)


def rates(r):
    maker, things = r.choice(MAKES)
    a, h = r.randint(2, 12), r.randint(2, 9)
    x = a * h
    if r.random() < 0.5:
        question = f"A {maker} makes {a} {things} every hour. How many {things} does it make in {h} hours?"
        return Problem(question, [(f"In {h} hours it makes ", a, "*", h, x, f" {things}.")], x)
    d = r.randint(2, 4)
    question = (f"A {maker} makes {a} {things} every hour and works {h} hours a day. "
                f"How many {things} does it make in {d} days?")
    return Problem(question, [
        ("Each day it makes ", a, "*", h, x, f" {things}."),
        (f"In {d} days it makes ", x, "*", d, x * d, f" {things}."),
    ], x * d)


def ages(r):
    (a, _), (b, _) = r.sample(NAMES, 2)
    k, bage, y = r.randint(2, 30), r.randint(5, 60), r.randint(2, 20)
    now = bage + k
    if r.random() < 0.5:
        question = f"{a} is {k} years older than {b}. {b} is {bage} years old. How old will {a} be in {y} years?"
        return Problem(question, [
            (f"{a} is ", bage, "+", k, now, " years old."),
            (f"In {y} years {a} will be ", now, "+", y, now + y, " years old."),
        ], now + y)
    y = r.randint(1, bage - 1) if bage > 2 else 1
    question = f"{a} is {k} years older than {b}. {b} is {bage} years old. How old was {a} {y} years ago?"
    return Problem(question, [
        (f"{a} is ", bage, "+", k, now, " years old."),
        (f"{y} years ago {a} was ", now, "-", y, now - y, " years old."),
    ], now - y)


def sharing(r):
    name, pron = r.choice(NAMES)
    item = r.choice(ITEMS)
    k, q = r.randint(2, 9), r.randint(2, 12)
    total = k * q
    if r.random() < 0.5:
        question = f"{name} has {total} {item} and shares them equally among {k} friends. How many {item} does each friend get?"
        return Problem(question, [("Each friend gets ", total, "/", k, q, f" {item}.")], q)
    extra = r.randint(1, min(40, total - 1))
    question = (f"{name} has {total - extra} {item} and buys {extra} more. Then {pron} shares them equally among "
                f"{k} friends. How many {item} does each friend get?")
    return Problem(question, [
        (f"{name} has ", total - extra, "+", extra, total, f" {item}."),
        ("Each friend gets ", total, "/", k, q, f" {item}."),
    ], q)


def packs(r):
    name, _ = r.choice(NAMES)
    cont, things = r.choice(CONTAINERS)
    n, k = r.randint(2, 9), r.randint(2, 12)
    x = n * k
    g = r.randint(1, x - 1)
    question = f"There are {n} {cont} with {k} {things} in each. {name} gives away {g} {things}. How many {things} are left?"
    return Problem(question, [
        ("There are ", n, "*", k, x, f" {things}."),
        ("After giving some away, ", x, "-", g, x - g, f" {things} are left."),
    ], x - g)


def multistep(r):
    name, pron = r.choice(NAMES)
    animal = r.choice(ANIMALS)
    a, b = r.randint(5, 150), r.randint(2, 60)
    c = r.randint(1, a + b - 1)
    x = a + b
    question = f"{name} has {a} {animal}. {pron.capitalize()} buys {b} more and then sells {c}. How many {animal} does {name} have now?"
    lines = [
        (f"After buying, {name} has ", a, "+", b, x, f" {animal}."),
        (f"After selling, {name} has ", x, "-", c, x - c, f" {animal}."),
    ]
    if r.random() < 0.4:
        legs = 2 if animal in ("chickens", "ducks") else 4
        y = x - c
        if y <= 60:
            question = (f"{name} has {a} {animal}. {pron.capitalize()} buys {b} more and then sells {c}. "
                        f"How many legs do {name}'s {animal} have now?")
            lines.append(("They have ", y, "*", legs, y * legs, " legs."))
            return Problem(question, lines, y * legs)
    return Problem(question, lines, x - c)


TEMPLATES = [shopping, change, rates, ages, sharing, packs, multistep]


def problem(r):
    return r.choice(TEMPLATES)(r)


def test_problems(n=TEST_SIZE, seed=TEST_SEED):
    r = random.Random(seed)
    seen, out = set(), []
    while len(out) < n:
        p = problem(r)
        if p.question not in seen:
            seen.add(p.question)
            out.append(p)
    return out


def train_stream(seed, exclude):
    """An endless stream of training problems, none of whose questions is in `exclude`."""
    r = random.Random(seed)
    while True:
        p = problem(r)
        if p.question not in exclude:
            yield p


def few_shot_pool(exclude, n=POOL_SIZE, seed=TRAIN_SEED):
    it = train_stream(seed, exclude)
    return [next(it) for _ in range(n)]


# ---- chat formats ----

CALCULATOR_TOOL = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression with + - * / on integers.",
        "parameters": {"type": "object",
                       "properties": {"expression": {"type": "string", "description": "for example 3*4"}},
                       "required": ["expression"]},
    },
}


def fewshot_messages(shots):
    """The 10 few-shot messages lm-eval/mxlm eval send before the question."""
    msgs = []
    for s in shots:
        msgs.append({"role": "user", "content": f"Question: {s.question}\nAnswer:"})
        msgs.append({"role": "assistant", "content": s.gsm8k_answer()})
    return msgs


def think_messages(p, r):
    ask = r.choice(["{q}", "{q} Think step by step.", "Please solve: {q}", "{q} Show your work."])
    return [{"role": "user", "content": ask.format(q=p.question)},
            {"role": "assistant", "reasoning_content": p.reasoning(),
             "content": f"The answer is {p.answer}.\n#### {p.answer}"}]


def tool_messages(p, r):
    msgs = [{"role": "user", "content": r.choice(["{q}", "Use the calculator. {q}"]).format(q=p.question)}]
    for i, (expr, res) in enumerate(p.steps()):
        why = "I need " + expr + " first." if i == 0 else "Next I need " + expr + "."
        msgs.append({"role": "assistant", "reasoning_content": why, "content": "",
                     "tool_calls": [{"type": "function",
                                     "function": {"name": "calculator", "arguments": {"expression": expr}}}]})
        msgs.append({"role": "tool", "content": str(res)})
    msgs.append({"role": "assistant", "reasoning_content": "The calculator gave " + str(p.answer) + ".",
                 "content": f"The answer is {p.answer}.\n#### {p.answer}"})
    return msgs


def jinja_env():
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env


class Renderer:
    def __init__(self, template_path=TEMPLATE_PATH):
        with open(template_path, encoding="utf-8") as f:
            self.template = jinja_env().from_string(f.read())

    def __call__(self, messages, tools=None, add_generation_prompt=False):
        return self.template.render(messages=messages, tools=tools, add_generation_prompt=add_generation_prompt)


def training_text(kind, r, stream, pool, render):
    """One rendered training conversation of the given kind (the whole conversation incl. replies)."""
    if kind == "fewshot":
        shots = r.sample(pool, 5)
        target = next(stream)
        msgs = fewshot_messages(shots)
        msgs += [{"role": "user", "content": f"Question: {target.question}\nAnswer:"},
                 {"role": "assistant", "content": target.gsm8k_answer()}]
        return render(msgs)
    p = next(stream)
    if kind == "think":
        return render(think_messages(p, r))
    return render(tool_messages(p, r), tools=[CALCULATOR_TOOL])


def write_jsonl(path, records):
    data = "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in records).encode("utf-8")
    if path.endswith(".xz"):
        data = lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)
    with open(path, "wb") as f:
        f.write(data)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "data", "arith"))
    ap.add_argument("--samples", type=int, default=0, help="print N rendered samples of each format and exit")
    args = ap.parse_args()
    test = test_problems()
    exclude = {p.question for p in test}
    pool = few_shot_pool(exclude)
    if args.samples:
        render = Renderer()
        r = random.Random(1)
        stream = train_stream(99, exclude)
        for kind in ["fewshot", "think", "tool"]:
            for _ in range(args.samples):
                print(f"===== {kind} =====")
                print(training_text(kind, r, stream, pool, render))
        return
    os.makedirs(args.out, exist_ok=True)
    assert not exclude & {p.question for p in pool}
    write_jsonl(os.path.join(args.out, "test.jsonl"), [p.record() for p in test])
    write_jsonl(os.path.join(args.out, "train.jsonl.xz"), [p.record() for p in pool])
    print(f"wrote {len(test)} test and {len(pool)} train problems to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
