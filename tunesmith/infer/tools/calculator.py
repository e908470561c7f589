"""A calculator that parses arithmetic with `ast` and evaluates a whitelist of nodes. No `eval`.

Accepted: numbers, + - * / // % ** (and ^ as power, as in MOSS / XTuner), parentheses, unary signs, the
constants pi / e / tau, and the functions in `FUNCTIONS`. Several expressions may be separated by `;`.
Anything else (names, attributes, subscripts, calls of other functions, strings, lambdas, ...) is refused
with a `ToolError` that names the offending part. Exponents and factorials are bounded, and the evaluation
runs in a forked child with a time and memory limit (`bounded.run_bounded`), so no input can hang or crash the
agent.
"""

from __future__ import annotations

import ast
import math
import operator

from tunesmith.infer.tools.base import ToolError, strip_quotes
from tunesmith.infer.tools.bounded import run_bounded

MAX_EXPONENT = 10_000
MAX_FACTORIAL = 1_000
MAX_INPUT = 2_000

CONSTANTS = {"pi": math.pi, "e": math.e, "tau": math.tau}
FUNCTIONS = {
    "sqrt": math.sqrt,
    "exp": math.exp,
    "log": math.log,
    "ln": math.log,
    "log10": math.log10,
    "log2": math.log2,
    "sin": math.sin,
    "cos": math.cos,
    "tan": math.tan,
    "asin": math.asin,
    "acos": math.acos,
    "atan": math.atan,
    "sinh": math.sinh,
    "cosh": math.cosh,
    "tanh": math.tanh,
    "abs": abs,
    "round": round,
    "floor": math.floor,
    "ceil": math.ceil,
    "factorial": None,  # bounded below
    "min": min,
    "max": max,
    "degrees": math.degrees,
    "radians": math.radians,
}
_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def parse_safe(text: str, *, allow_names: bool = False) -> ast.expr:
    """Parse one expression and check every node against the whitelist (shared with the solver)."""
    text = text.strip()
    if not text:
        raise ToolError("empty expression")
    if len(text) > MAX_INPUT:
        raise ToolError(f"expression longer than {MAX_INPUT} characters")
    text = text.replace("^", "**").replace("×", "*").replace("÷", "/")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        raise ToolError(f"cannot parse {text!r}: {exc.msg}") from None
    for node in ast.walk(tree):
        if isinstance(node, (ast.Expression, ast.Load, ast.operator, ast.unaryop)):
            continue
        if isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
                raise ToolError(f"only numbers are allowed, not {node.value!r}")
        elif isinstance(node, ast.BinOp):
            if type(node.op) not in _BINARY:
                raise ToolError(f"operator {type(node.op).__name__} is not allowed")
        elif isinstance(node, ast.UnaryOp):
            if type(node.op) not in _UNARY:
                raise ToolError(f"operator {type(node.op).__name__} is not allowed")
        elif isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS or node.keywords:
                name = node.func.id if isinstance(node.func, ast.Name) else ast.unparse(node.func)
                raise ToolError(f"function {name!r} is not allowed (allowed: {', '.join(sorted(FUNCTIONS))})")
        elif isinstance(node, ast.Name):
            if node.id.startswith("_"):
                raise ToolError(f"name {node.id!r} is not allowed")
            if node.id not in CONSTANTS and node.id not in FUNCTIONS and not allow_names:
                raise ToolError(f"unknown name {node.id!r} (constants: {', '.join(CONSTANTS)})")
        else:
            raise ToolError(f"{type(node).__name__} is not allowed in an expression: {ast.unparse(node)!r}")
    return tree.body


def _eval(node: ast.expr):
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return CONSTANTS[node.id]
    if isinstance(node, ast.UnaryOp):
        return _UNARY[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.BinOp):
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow):
            if abs(right) > MAX_EXPONENT or (abs(left) > 1 and abs(right) * math.log10(abs(left)) > MAX_EXPONENT):
                raise ToolError("the result of this power is too large")
        return _BINARY[type(node.op)](left, right)
    if isinstance(node, ast.Call):
        args = [_eval(a) for a in node.args]
        if node.func.id == "factorial":
            if len(args) != 1 or args[0] != int(args[0]) or not 0 <= args[0] <= MAX_FACTORIAL:
                raise ToolError(f"factorial needs a whole number from 0 to {MAX_FACTORIAL}")
            return math.factorial(int(args[0]))
        return FUNCTIONS[node.func.id](*args)
    raise ToolError(f"cannot evaluate {ast.unparse(node)!r}")  # unreachable after parse_safe


MAX_DIGITS = 60  # longer whole numbers are shown in scientific form, with their digit count


def format_number(value) -> str:
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e16:
            return str(int(value))
        return format(value, ".10g")
    if isinstance(value, int) and value.bit_length() > MAX_DIGITS * 3.33:
        digits = int(value.bit_length() * math.log10(2)) + 1
        sign = "-" if value < 0 else ""
        exponent = digits - 1
        try:
            lead = str(abs(value) // 10 ** max(0, exponent - 9))  # the first 10 digits, without str() of it all
            exponent = max(0, exponent - 9) + len(lead) - 1
            return f"{sign}{lead[0]}.{lead[1:]}e+{exponent} ({exponent + 1} digits)"
        except ValueError:
            return f"a number of about {digits} digits"
    return str(value)


def calculate(text: str) -> str:
    """Evaluate one or more `;`-separated expressions; returns the results joined by '; '."""
    results = []
    for part in [p for p in text.split(";") if p.strip()] or [text]:
        tree = parse_safe(part)
        try:
            value = _eval(tree)
        except ToolError:
            raise
        except ZeroDivisionError:
            raise ToolError(f"division by zero in {part.strip()!r}") from None
        except (ValueError, OverflowError, TypeError) as exc:
            raise ToolError(f"cannot evaluate {part.strip()!r}: {exc}") from None
        results.append(format_number(value))
    return "; ".join(results)


class Calculator:
    name = "calculate"
    description = "Calculator: evaluates arithmetic like (3 + 4.5) * 2 ^ 3 or sqrt(2) / 3."
    example = "(12.5 * 4) / 3"

    def __init__(self, timeout: float = 5.0):
        self.timeout = timeout

    def run(self, text: str) -> str:
        return run_bounded(calculate, strip_quotes(text), timeout=self.timeout)
