"""Built-in tools and environments: `calculator` (arithmetic on demand), `python` (the same task
with a sandbox-light Python runner as its tool) and `gsm8k_tools` (GSM8K questions with the
calculator, rewarded by the numeric match of the final answer).

A `ToolEnvironment` answers each assistant turn: tool calls (parsed in the template's format, see
`toolcalls`) are run and their results returned as `tool` messages; a turn without a call is the
final answer, scored by `score` and ending the episode. Malformed calls and tool failures are
returned as error messages the model sees, and counted (`tool_errors`). Turn and token limits are
the rollout's to enforce (it knows the tokens); `max_tool_calls` bounds calls within one turn.
"""

from __future__ import annotations

from alignkit.envs import StepResult
from alignkit.envs.calculator import CalculatorError, evaluate, format_number
from alignkit.envs.python_tool import PythonTool
from alignkit.envs.sandbox import Limits
from alignkit.envs.toolcalls import ToolCall, parse_tool_calls
from alignkit.errors import ConfigError
from alignkit.plugins import load_module
from alignkit.rewards.verifiable import final_answer

CALCULATOR = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression with numbers and + - * / ( ) **.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "for example (17 + 8) * 3"}},
            "required": ["expression"],
        },
    },
}


def calculator(arguments: dict) -> str:
    expression = arguments.get("expression")
    if not isinstance(expression, str):
        raise CalculatorError('calculator needs {"expression": "<arithmetic>"}')
    return format_number(evaluate(expression))


PYTHON = {
    "type": "function",
    "function": {
        "name": "python",
        "description": "Run a Python program and read what it prints (5 s, 512 MiB, no network; files only in "
        "its scratch directory).",
        "parameters": {
            "type": "object",
            "properties": {"code": {"type": "string", "description": "the program, for example print(17 * 3)"}},
            "required": ["code"],
        },
    },
}


# name -> (JSON schema, function(arguments: dict) -> str). The python tool runs behind the sandbox
# `env.sandbox` names; `bind_executor` gives each environment's copy that executor.
TOOLS = {"calculator": (CALCULATOR, calculator), "python": (PYTHON, PythonTool())}


def bind_executor(tools: dict, executor) -> dict:
    """`tools` with every code tool bound to `executor` (other tools unchanged)."""
    return {
        name: (schema, fn.bind(executor) if isinstance(fn, PythonTool) else fn) for name, (schema, fn) in tools.items()
    }


def runs_code(tools: dict) -> bool:
    return any(isinstance(fn, PythonTool) for _, fn in tools.values())


def resolve_tools(names: list) -> dict:
    """`env.tools` entries -> {name: (schema, function(arguments) -> str)}: built-in names, or
    `file.py:function` / `module:function`, whose schema transformers reads from its type hints and
    Google-style docstring (`transformers.utils.get_json_schema`, the format chat templates take)."""
    from transformers.utils import get_json_schema

    out = {}
    for entry in names:
        if entry in TOOLS:
            out[entry] = TOOLS[entry]
            continue
        target, sep, name = entry.rpartition(":")
        if not sep or not target or not name:
            raise ConfigError(
                f"`env.tools`: {entry!r} is neither a built-in tool ({', '.join(TOOLS)}) nor `file.py:function`."
            )
        fn = getattr(load_module(target, f"`env.tools` {entry!r}: file"), name, None)
        if not callable(fn):
            raise ConfigError(f"`env.tools` {entry!r}: {target} has no function {name}.")
        try:
            schema = get_json_schema(fn)
        except Exception as e:  # transformers raises its own error types for a missing docstring or type hint
            raise ConfigError(
                f"`env.tools` {entry!r}: cannot read the tool's schema ({e}). Give every argument a "
                "type hint and document it in a Google-style docstring (Args: ...)."
            ) from None
        out[schema["function"]["name"]] = (schema, lambda arguments, fn=fn: str(fn(**arguments)))
    return out


class ToolEnvironment:
    """Tools by name, a prompt column for the question, a final-answer score."""

    tools = {"calculator": TOOLS["calculator"]}  # name -> (JSON schema, function(arguments) -> str)
    question_column = "prompt"
    max_tool_calls = 4

    def __init__(self, style: str = "hermes"):
        self.style = style  # the chat template's tool-call format (`toolcalls.template_style`)
        self.record: dict = {}
        self.counts = {"tool_calls": 0, "tool_errors": 0}

    @property
    def schemas(self) -> list:
        return [schema for schema, _ in self.tools.values()]

    def reset(self, record: dict) -> list:
        self.record, self.counts = dict(record), {"tool_calls": 0, "tool_errors": 0}
        question = record.get(self.question_column, record.get("prompt"))
        if isinstance(question, list) and question and all(isinstance(m, dict) and "role" in m for m in question):
            return [
                dict(m) for m in question
            ]  # a conversation so far (e.g. a demonstration episode, then the question)
        if not isinstance(question, str):
            raise ValueError(f"{type(self).__name__}: the record has no text column {self.question_column!r}")
        return [{"role": "user", "content": question}]

    def step(self, message: dict) -> StepResult:
        calls = parse_tool_calls(message.get("content") or "", self.style)
        if not calls:
            return StepResult([], self.score(message.get("content") or ""), True)
        replies = []
        for call in calls[: self.max_tool_calls]:
            self.counts["tool_calls"] += 1
            replies.append({"role": "tool", "content": self.run(call)})
        if len(calls) > self.max_tool_calls:
            self.counts["tool_errors"] += 1
            replies.append({"role": "tool", "content": f"error: at most {self.max_tool_calls} tool calls per turn"})
        return StepResult(replies, 0.0, False)

    def run(self, call) -> str:
        if not isinstance(call, ToolCall):  # a ToolCallError: the model's call was malformed
            self.counts["tool_errors"] += 1
            return f"error: {call.message}"
        if call.name not in self.tools:
            self.counts["tool_errors"] += 1
            return f"error: no tool named {call.name!r}; the tools are {', '.join(self.tools)}"
        try:
            return self.tools[call.name][1](call.arguments)
        except (CalculatorError, ValueError) as e:
            self.counts["tool_errors"] += 1
            return f"error: {e}"
        except Exception as e:  # a user's tool failing (bad arguments, a bug): the model reads it, the run goes on
            self.counts["tool_errors"] += 1
            return f"error: {call.name} failed: {type(e).__name__}: {e}"

    def score(self, answer: str) -> float:
        return 0.0


class CalculatorEnvironment(ToolEnvironment):
    """`calculator`: any prompt with an `answer` column; reward 1 when the final answer's last
    number equals the answer's, else 0."""

    answer_column = "answer"

    def score(self, answer: str) -> float:
        want = final_answer(str(self.record.get(self.answer_column, "")))
        got = final_answer(answer)
        return float(want is not None and got is not None and got == want)


class PythonEnvironment(CalculatorEnvironment):
    """`python`: as `calculator`, with the Python runner as the tool (behind `env.sandbox`); its
    limits come from `env.args` (timeout_s, memory_mb, max_output, max_processes, scratch_mb)."""

    def __init__(self, style: str = "hermes", **limits):
        super().__init__(style)
        try:
            self.tools = {"python": (PYTHON, PythonTool(limits=Limits(**limits)))}
        except TypeError:
            raise ConfigError(
                f"`env.args` {limits!r}: the python environment takes timeout_s, memory_mb, max_output, "
                "max_processes, scratch_mb and file_mb."
            ) from None


class GSM8KTools(CalculatorEnvironment):
    """`gsm8k_tools`: GSM8K records (`question`, `answer` ending in `#### <number>`) with the calculator."""

    question_column = "question"
