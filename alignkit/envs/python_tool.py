"""The `python` tool: run a model-written program behind the sandbox `env.sandbox` names
(`alignkit.envs.sandbox`; bubblewrap by default) and hand back what it printed.

The program is `main.py` in a fresh scratch directory (its working directory and $HOME), run by
this interpreter with `-I` (no user site, no environment variables); every limit and failure
ends with a tool error the model reads (timeout, memory, output, exit code).
"""

from __future__ import annotations

from alignkit.envs.sandbox import CodeExecutor, CodeResult, Limits, make_executor

PythonResult = CodeResult  # the name this module used before executors were pluggable


def run_python(
    code: str,
    *,
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    max_output: int = 10_000,
    executor: CodeExecutor | None = None,
) -> CodeResult:
    """Run `code` with `executor` (default: the bubblewrap sandbox, checked on first use)."""
    executor = executor or make_executor("bwrap")
    executor.check()
    return executor.run(code, Limits(timeout_s=timeout_s, memory_mb=memory_mb, max_output=max_output))


class PythonTool:
    """The tool function of `python` (arguments -> the text the model reads), bound to one executor."""

    def __init__(self, executor: CodeExecutor | None = None, limits: Limits = Limits()):
        self.executor, self.limits = executor, limits

    def bind(self, executor: CodeExecutor) -> "PythonTool":
        return PythonTool(executor, self.limits)

    def __call__(self, arguments: dict) -> str:
        code = arguments.get("code")
        if not isinstance(code, str):
            raise ValueError('python needs {"code": "<program>"}')
        executor = self.executor or make_executor("bwrap")
        executor.check()
        return executor.run(code, self.limits).message()
