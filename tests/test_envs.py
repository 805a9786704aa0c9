"""Issue 18, first parts: the safe calculator, tool-call parsing in the template's format, and
loading an environment class."""

import random
import shutil

import pytest

from alignkit.envs import StepResult, load_environment_class
from alignkit.envs.calculator import CalculatorError, evaluate, format_number
from alignkit.envs.toolcalls import ToolCall, ToolCallError, fallback_instructions, parse_tool_calls, template_style
from alignkit.errors import ConfigError


def _random_expression(rng: random.Random, depth: int = 0) -> str:
    if depth > 3 or rng.random() < 0.3:
        return str(rng.randint(0, 50))
    op = rng.choice(["+", "-", "*", "/", "**"])
    left, right = _random_expression(rng, depth + 1), _random_expression(rng, depth + 1)
    if op == "**":
        right = str(rng.randint(0, 3))
    return f"({left} {op} {right})" if rng.random() < 0.5 else f"{left} {op} {right}"


def test_the_calculator_agrees_with_python_arithmetic():
    rng, checked = random.Random(0), 0
    for _ in range(400):
        text = _random_expression(rng)
        try:
            want = eval(text, {"__builtins__": {}})  # noqa: S307  (the test's own expressions, not model text)
        except (ZeroDivisionError, OverflowError):
            with pytest.raises(CalculatorError):
                evaluate(text)
            continue
        if abs(want) > 1e100:
            continue
        assert evaluate(text) == pytest.approx(want, rel=1e-12, abs=1e-12), text
        checked += 1
    assert checked > 300
    assert evaluate("-2 ** 2") == -4 and evaluate("2 ** 3 ** 2") == 512 and evaluate(".5 + 1.") == 1.5
    assert format_number(evaluate("7 * 6")) == "42" and format_number(evaluate("7 / 2")) == "3.5"


@pytest.mark.parametrize(
    "text,why",
    [
        ('__import__("os").system("ls")', "unexpected character"),
        ("9 ** 9 ** 9", "exponent"),
        ("1 / (2 - 2)", "division by zero"),
        ("(1 + 2", "closing parenthesis"),
        ("1 2", "after a complete expression"),
        ("", "empty"),
        ("2 +", "ended early"),
        ("(" * 60 + "1" + ")" * 60, "nested"),
        ("10 ** 60 * 10 ** 60", "too large"),
        ("x" * 300, "longer than"),
    ],
)
def test_the_calculator_refuses_what_is_not_small_arithmetic(text, why):
    with pytest.raises(CalculatorError, match=why):
        evaluate(text)


@pytest.mark.parametrize("text", ["1" * 200, "-" + "1" * 150, "1" * 101, "(" + "1" * 101 + ".5)", "1" * 150 + " * 0"])
def test_the_calculator_caps_every_number_it_reads_or_returns(text):
    # the 1e100 cap holds for literals too: a bare 200-digit number used to come back as 1.1e199,
    # and a literal too large is refused even where the arithmetic would shrink it (x * 0)
    with pytest.raises(
        CalculatorError, match=r"number 1{12}\.\.\.\(\d+ characters\) is too large \(magnitude above 1e\+100\)"
    ):
        evaluate(text)
    assert evaluate("1" * 100) == float("1" * 100) and evaluate("-" + "1" * 100) == -float(
        "1" * 100
    )  # at the cap: fine


def test_tool_calls_in_the_hermes_format():
    text = (
        'Let me compute.<tool_call>{"name": "calculator", "arguments": {"expression": "17 + 8"}}</tool_call>'
        '<tool_call>\n{"name": "calculator", "arguments": "{\\"expression\\": \\"2*3\\"}"}\n</tool_call>'
    )
    assert parse_tool_calls(text) == [
        ToolCall("calculator", {"expression": "17 + 8"}),
        ToolCall("calculator", {"expression": "2*3"}),
    ]
    assert parse_tool_calls("The answer is 25.") == []
    bad = parse_tool_calls(
        '<tool_call>{"name": calculator}</tool_call><tool_call>{"arguments": {}}</tool_call>'
        '<tool_call>{"name": "calculator", "arguments": [1]}</tool_call><tool_call>{"name"'
    )
    assert [type(c) for c in bad] == [ToolCallError] * 4
    assert "not valid JSON" in bad[0].message and 'no "name"' in bad[1].message
    assert "JSON object" in bad[2].message and "not closed" in bad[3].message


def test_tool_calls_in_the_llama3_format_and_template_detection():
    assert parse_tool_calls('<|python_tag|>{"name": "calculator", "parameters": {"expression": "1+1"}}', "llama3") == [
        ToolCall("calculator", {"expression": "1+1"})
    ]
    assert parse_tool_calls("It is 2.", "llama3") == []
    assert isinstance(parse_tool_calls('{"name": "calculator", "parameters": ', "llama3")[0], ToolCallError)

    class Tok:
        chat_template = "{% for m in messages %}{% if tools %}<tool_call>{% endif %}{% endfor %}"

    assert template_style(Tok()) == "hermes"
    Tok.chat_template = "{{ '<|python_tag|>' }}"
    assert template_style(Tok()) == "llama3"
    Tok.chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert template_style(Tok()) == "fallback"
    schema = {"type": "function", "function": {"name": "calculator", "parameters": {"type": "object"}}}
    assert '"name": "calculator"' in fallback_instructions([schema]) and "<tool_call>" in fallback_instructions(
        [schema]
    )


def test_environment_classes_load_from_a_file_with_clear_errors(tmp_path):
    (tmp_path / "env.py").write_text(
        "from alignkit.envs import StepResult\n"
        "class Echo:\n"
        "    def reset(self, record):\n        return [{'role': 'user', 'content': record['prompt']}]\n"
        "    def step(self, message):\n        return StepResult([], float(len(message['content'])), True)\n"
        "class Half:\n    def reset(self, record):\n        return []\n"
    )
    cls = load_environment_class(f"{tmp_path / 'env.py'}:Echo")
    env = cls()
    assert env.reset({"prompt": "hi"}) == [{"role": "user", "content": "hi"}]
    assert env.step({"role": "assistant", "content": "abc"}) == StepResult([], 3.0, True)
    for spec, why in [
        (f"{tmp_path / 'env.py'}:Half", "lacks step"),
        (f"{tmp_path / 'nope.py'}:X", "does not exist"),
        (f"{tmp_path / 'env.py'}:Missing", "has no Missing"),
        ("no_such_env", "built-in name"),
    ]:
        with pytest.raises(ConfigError, match=why):
            load_environment_class(spec)


@pytest.mark.parametrize(
    "code,why",
    [
        ("while True:\n    pass\n", "timed out after 1 s"),
        ("import os\nfor _ in range(100):\n    os.fork()\n", "Resource temporarily unavailable"),
        ("x = bytearray(2 * 1024 ** 3)\n", "out of memory"),
        ("print(open('/etc/hostname').read())\n", "No such file or directory: '/etc/hostname'"),
        ("open('../escape.txt', 'w').write('x')\n", "Read-only file system"),
        ("import socket\nsocket.create_connection(('10.0.0.1', 9), timeout=1)\n", "Network is unreachable"),
        ("raise ValueError('bad input')\n", "ValueError: bad input"),
    ],
)
def test_the_python_tool_ends_abuse_with_a_clear_error(code, why):
    """The sandbox's own escape tests are tests/test_sandbox.py; these are the limits' messages."""
    from alignkit.envs.python_tool import run_python

    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap is not installed (apt-get install bubblewrap; `make test` does it)")
    # 1 s for the loop that must time out; room for the others on a busy machine
    result = run_python(code, timeout_s=1 if "timed out" in why else 20, memory_mb=256)
    assert result.error is not None and why in result.error, result
    assert why in result.message()


def test_the_python_tool_runs_ordinary_code_in_its_scratch_directory():
    from alignkit.envs.python_tool import run_python

    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap is not installed (apt-get install bubblewrap; `make test` does it)")
    result = run_python(
        "import math, os\nopen('notes.txt', 'w').write('ok')\n"
        "print(round(math.sqrt(2), 4), open('notes.txt').read(), sorted(os.listdir('.')))\n"
    )
    assert result.error is None and result.stdout.strip() == "1.4142 ok ['main.py', 'notes.txt']"
    assert run_python("pass").message() == "(no output)"


def test_gsm8k_tools_episode_runs_tools_counts_errors_and_scores_the_answer():
    env = load_environment_class("gsm8k_tools")()
    assert env.reset({"question": "Ann has 17 apples and buys 8. How many?", "answer": "17 + 8 = 25\n#### 25"}) == [
        {"role": "user", "content": "Ann has 17 apples and buys 8. How many?"}
    ]
    call = '<tool_call>{"name": "calculator", "arguments": {"expression": "17 + 8"}}</tool_call>'
    assert env.step({"role": "assistant", "content": call}) == StepResult(
        [{"role": "tool", "content": "25"}], 0.0, False
    )
    bad = env.step(
        {
            "role": "assistant",
            "content": '<tool_call>{"name": "calculator", "arguments": {"expression": '
            '"1/0"}}</tool_call><tool_call>{"name": "search"}</tool_call>',
        }
    )
    assert [m["content"] for m in bad.messages] == [
        "error: division by zero",
        "error: no tool named 'search'; the tools are calculator",
    ]
    assert env.step({"role": "assistant", "content": "She has 25 apples."}) == StepResult([], 1.0, True)
    assert env.counts == {"tool_calls": 3, "tool_errors": 2}
    env.reset({"question": "q", "answer": "#### 25"})
    assert env.step({"role": "assistant", "content": "26"}).reward == 0.0 and env.counts["tool_calls"] == 0
    assert [s["function"]["name"] for s in env.schemas] == ["calculator"]
    assert env.reset({"prompt": "from the prompt column"})[0]["content"] == "from the prompt column"
    with pytest.raises(ValueError, match="question"):
        env.reset({"answer": "no question, no prompt"})


USER_TOOL = '''
def word_count(text: str) -> int:
    """Count the words of a text.

    Args:
        text: the text to count
    """
    return len(text.split())


def undocumented(x):
    return x
'''

TOOL_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nTools:{% for t in tools %} {{ t.function.name }}{% endfor %}\n"
    "Reply with <tool_call>{...}</tool_call><|im_end|>\n{%- endif %}{%- for m in messages %}"
    "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)


def test_tools_from_config_python_environment_and_the_template_or_fallback(tmp_path):
    from alignkit.config import load_config
    from alignkit.data.prompts import PromptExample
    from alignkit.envs.builtin import resolve_tools
    from alignkit.testing import tiny_tokenizer
    from alignkit.train.episodes import EpisodeSampler

    (tmp_path / "tools.py").write_text(USER_TOOL)
    tools = resolve_tools(["calculator", f"{tmp_path / 'tools.py'}:word_count"])
    assert list(tools) == ["calculator", "word_count"]
    assert tools["word_count"][0]["function"]["parameters"]["properties"]["text"]["type"] == "string"
    assert tools["word_count"][1]({"text": "one two three"}) == "3"
    with pytest.raises(ConfigError, match="docstring"):
        resolve_tools([f"{tmp_path / 'tools.py'}:undocumented"])
    with pytest.raises(ConfigError, match="neither a built-in"):
        resolve_tools(["search"])

    env = load_environment_class("python")()  # the python tool, scored like the calculator
    env.reset({"prompt": "6 * 7?", "answer": "42"})
    out = env.step(
        {
            "role": "assistant",
            "content": '<tool_call>{"name": "python", "arguments": {"code": "print(6 * 7)"}}</tool_call>',
        }
    )
    assert out.messages == [{"role": "tool", "content": "42"}]
    assert env.step({"role": "assistant", "content": "42"}) == StepResult([], 1.0, True)

    ex = PromptExample(({"role": "user", "content": "What is 2 + 2?"},), {"answer": "4"})
    cfg = load_config(
        None,
        [
            "model.name_or_path=x",
            "data.train=x.jsonl",
            "recipe=grpo",
            "env.name=calculator",
            f"env.tools=[calculator, {tmp_path / 'tools.py'}:word_count]",
        ],
    )
    tok = tiny_tokenizer()  # ChatML without tool support: the fallback system message
    sampler = EpisodeSampler(cfg, tok)
    msgs, schemas = sampler.start(sampler.make(), ex)
    assert schemas is None and msgs[0]["role"] == "system" and '"word_count"' in msgs[0]["content"]
    assert msgs[1] == {"role": "user", "content": "What is 2 + 2?"}
    tok.chat_template = TOOL_TEMPLATE  # a template that takes tools: they go through apply_chat_template
    sampler = EpisodeSampler(cfg, tok)
    env = sampler.make()
    msgs, schemas = sampler.start(env, ex)
    assert env.style == "hermes" and msgs == [{"role": "user", "content": "What is 2 + 2?"}]
    assert [s["function"]["name"] for s in schemas] == ["calculator", "word_count"]
    from alignkit.generation.multiturn import render

    text = render(tok, msgs, schemas, generation_prompt=True)
    assert text.startswith("<|im_start|>system\nTools: calculator word_count")
    assert sampler.prompt_ids(ex) == tok(text, add_special_tokens=False)["input_ids"]
