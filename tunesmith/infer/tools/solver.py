"""An equation solver on sympy. Input is checked by the calculator's `ast` whitelist and converted to sympy
objects node by node, so sympy's own string parser (which uses `eval`) is never called.

Accepted: one or more equations separated by `;` or `,` (``x^2 - 4 = 0; y = 2x`` needs an explicit `*`:
``y = 2*x``). An expression without `=` means "= 0". Unknowns are the names that are not constants or
functions. Solving runs in a forked child with a time and memory limit (`bounded.run_bounded`): sympy can
take hours on an equation like ``x = 9**9**9``.
"""

from __future__ import annotations

import ast

from tunesmith.infer.tools.base import ToolError, strip_quotes
from tunesmith.infer.tools.bounded import run_bounded
from tunesmith.infer.tools.calculator import FUNCTIONS, parse_safe

_SYMPY_FUNCS = {
    "sqrt": "sqrt", "exp": "exp", "log": "log", "ln": "log", "sin": "sin", "cos": "cos", "tan": "tan",
    "asin": "asin", "acos": "acos", "atan": "atan", "sinh": "sinh", "cosh": "cosh", "tanh": "tanh",
    "abs": "Abs", "floor": "floor", "ceil": "ceiling", "factorial": "factorial", "min": "Min", "max": "Max",
}


def _to_sympy(node: ast.expr, symbols: dict):
    import sympy

    if isinstance(node, ast.Constant):
        return sympy.nsimplify(node.value) if isinstance(node.value, float) else sympy.Integer(node.value)
    if isinstance(node, ast.Name):
        if node.id == "pi":
            return sympy.pi
        if node.id == "e" and "e" not in symbols:
            return sympy.E
        return symbols.setdefault(node.id, sympy.Symbol(node.id))
    if isinstance(node, ast.UnaryOp):
        value = _to_sympy(node.operand, symbols)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp):
        a, b = _to_sympy(node.left, symbols), _to_sympy(node.right, symbols)
        op = type(node.op)
        if op is ast.Add:
            return a + b
        if op is ast.Sub:
            return a - b
        if op is ast.Mult:
            return a * b
        if op is ast.Div:
            return a / b
        if op is ast.Pow:
            return a**b
        if op is ast.FloorDiv:
            return sympy.floor(a / b)
        if op is ast.Mod:
            return sympy.Mod(a, b)
    if isinstance(node, ast.Call) and node.func.id in _SYMPY_FUNCS:
        return getattr(sympy, _SYMPY_FUNCS[node.func.id])(*[_to_sympy(a, symbols) for a in node.args])
    raise ToolError(f"cannot use {ast.unparse(node)!r} in an equation")


def _equation(text: str, symbols: dict):
    import sympy

    sides = text.split("=")
    sides = [s for s in sides if s.strip()] if "==" in text else sides
    if len(sides) == 1:
        return _to_sympy(parse_safe(sides[0], allow_names=True), symbols)
    if len(sides) != 2:
        raise ToolError(f"an equation needs exactly one '=': {text.strip()!r}")
    left = _to_sympy(parse_safe(sides[0], allow_names=True), symbols)
    right = _to_sympy(parse_safe(sides[1], allow_names=True), symbols)
    return sympy.Eq(left, right)


def solve(text: str) -> str:
    """Solve equations; returns e.g. 'x = -2; x = 2' or 'x = 1, y = 2'."""
    import sympy

    text = text.replace("==", "=")
    parts = [p for p in text.replace(";", "\n").replace(",", "\n").splitlines() if p.strip()]
    if not parts:
        raise ToolError("no equation given")
    symbols: dict = {}
    equations = [_equation(p, symbols) for p in parts]
    unknowns = [symbols[k] for k in sorted(symbols) if k not in FUNCTIONS]
    if not unknowns:
        raise ToolError("no unknown to solve for (use a name like x)")
    try:
        solutions = sympy.solve(equations, unknowns, dict=True)
    except (NotImplementedError, ValueError, TypeError) as exc:
        raise ToolError(f"sympy cannot solve this: {exc}") from None
    if not solutions:
        return "no solution"
    rendered = []
    for sol in solutions:
        rendered.append(", ".join(f"{k} = {sympy.sstr(v)}" for k, v in sol.items()))
    return "; ".join(rendered)


class Solver:
    name = "solve"
    description = "Equation solver: solves equations like x^2 - 4 = 0 or x + y = 3; x - y = 1."
    example = "x^2 - 5*x + 6 = 0"

    def __init__(self, timeout: float = 10.0):
        self.timeout = timeout

    def run(self, text: str) -> str:
        import sympy  # noqa: F401 - imported here, not in the child: a fork must not take the import lock

        return run_bounded(solve, strip_quotes(text), timeout=self.timeout)
