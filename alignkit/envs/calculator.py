"""A safe arithmetic evaluator for the `calculator` tool: a small recursive-descent parser over
numbers and + - * / ( ) ** (and unary +/-). Model text is never passed to Python's `eval`.

Grammar (usual precedence; ** binds tighter than unary minus and is right-associative, as in Python):
    expr   := term (('+' | '-') term)*
    term   := unary (('*' | '/') unary)*
    unary  := ('+' | '-') unary | power
    power  := atom ('**' unary)?
    atom   := NUMBER | '(' expr ')'
Limits keep a hostile expression cheap: at most 200 characters, nesting depth 50, exponents of
magnitude at most 64, and every number of magnitude at most 1e100: the literals read, each
intermediate result and the value returned (a bare 200-digit literal is refused, not returned as
1.1e199); a violation is a `CalculatorError` with a message the model can read.
"""

from __future__ import annotations

import math
import re

MAX_CHARS, MAX_DEPTH, MAX_EXPONENT, MAX_MAGNITUDE = 200, 50, 64, 1e100
_TOKEN = re.compile(r"\s*(?:(\d+(?:\.\d*)?|\.\d+)|(\*\*|[-+*/()]))")


class CalculatorError(ValueError):
    """An expression the calculator refuses, with the reason."""


def _tokens(text: str) -> list:
    out, pos = [], 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise CalculatorError(
                f"unexpected character {text[pos]!r} at position {pos}; use numbers and + - * / ( ) **"
            )
        out.append(_literal(m.group(1)) if m.group(1) is not None else m.group(2))
        pos = m.end()
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return out


def _literal(text: str) -> float:
    value = float(text)
    if abs(value) > MAX_MAGNITUDE:
        shown = text if len(text) <= 24 else f"{text[:12]}...({len(text)} characters)"
        raise CalculatorError(f"number {shown} is too large (magnitude above {MAX_MAGNITUDE:g})")
    return value


class _Parser:
    def __init__(self, tokens: list):
        self.tokens, self.i, self.depth = tokens, 0, 0

    def peek(self):
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self):
        tok = self.peek()
        self.i += 1
        return tok

    def expr(self) -> float:
        value = self.term()
        while self.peek() in ("+", "-"):
            value = _check(value + self.term() if self.take() == "+" else value - self.term())
        return value

    def term(self) -> float:
        value = self.unary()
        while self.peek() in ("*", "/"):
            if self.take() == "*":
                value = _check(value * self.unary())
            else:
                divisor = self.unary()
                if divisor == 0:
                    raise CalculatorError("division by zero")
                value = _check(value / divisor)
        return value

    def unary(self) -> float:
        if self.peek() in ("+", "-"):
            sign = -1.0 if self.take() == "-" else 1.0
            return sign * self.unary()
        return self.power()

    def power(self) -> float:
        base = self.atom()
        if self.peek() == "**":
            self.take()
            exponent = self.unary()
            if abs(exponent) > MAX_EXPONENT:
                raise CalculatorError(f"exponent {exponent:g} is too large (at most {MAX_EXPONENT})")
            if base == 0 and exponent < 0:
                raise CalculatorError("division by zero (0 to a negative power)")
            if base < 0 and exponent != int(exponent):
                raise CalculatorError("a negative number to a fractional power is not a real number")
            return _check(base**exponent)
        return base

    def atom(self) -> float:
        tok = self.take()
        if isinstance(tok, float):
            return tok
        if tok == "(":
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise CalculatorError(f"parentheses nested deeper than {MAX_DEPTH}")
            value = self.expr()
            if self.take() != ")":
                raise CalculatorError("missing closing parenthesis")
            self.depth -= 1
            return value
        raise CalculatorError("expression ended early" if tok is None else f"unexpected {tok!r}")


def _check(value: float) -> float:
    if not math.isfinite(value) or abs(value) > MAX_MAGNITUDE:
        raise CalculatorError(f"result too large (magnitude above {MAX_MAGNITUDE:g})")
    return value


def evaluate(expression: str) -> float:
    """The value of an arithmetic `expression`; CalculatorError when it is not one or is too big."""
    if not isinstance(expression, str) or not expression.strip():
        raise CalculatorError("empty expression; give an arithmetic expression such as 12 * (3 + 4)")
    if len(expression) > MAX_CHARS:
        raise CalculatorError(f"expression longer than {MAX_CHARS} characters")
    parser = _Parser(_tokens(expression))
    value = parser.expr()
    if parser.peek() is not None:
        raise CalculatorError(f"unexpected {parser.peek()!r} after a complete expression")
    return _check(value)  # literals and every operation are checked already; the cap holds for any return


def format_number(value: float) -> str:
    """How the tool reports a value: integers without a decimal point, others to 10 significant digits."""
    return str(int(value)) if value == int(value) and abs(value) < 1e16 else f"{value:.10g}"
