"""The module-level assignments of a parsed XTuner config, read as plain values without running anything.

Literals, arithmetic on numbers, strings and lists (with size limits), names of earlier settings and `dict(...)`
are evaluated. A call `f(a=1)` is read the way mmengine reads it, as `dict(type=f, a=1)`; a name the file imports
stays an opaque `Symbol`; anything else (comprehensions, f-strings, conditionals) stays `Opaque`.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_MAX_ITEMS = 100_000  # the longest string or list an expression may build
_MAX_INT_BITS = 4096


@dataclass(frozen=True)
class Symbol:
    """A name the config imports or never defines (a class, a function, `PROMPT_TEMPLATE.x`), dotted, with import
    aliases undone. It is never looked up."""

    path: str

    @property
    def leaf(self) -> str:
        return self.path.rsplit(".", 1)[-1]

    def __repr__(self) -> str:
        return self.path


@dataclass(frozen=True)
class Opaque:
    """An expression this reader does not evaluate, kept as (shortened) source text for the notes."""

    source: str

    def __repr__(self) -> str:
        return self.source


class Call(dict):
    """`f(a=1)` read the way mmengine reads it, as {'type': f, 'a': 1}; `source` is the call as written."""

    def __init__(self, items: dict[Any, Any], source: str):
        super().__init__(items)
        self.source = source


def source_text(node: ast.AST) -> str:
    """`node` as source on one line, cut to 60 characters for the notes."""
    text = " ".join(ast.unparse(node).split())
    return text if len(text) <= 60 else text[:57] + "..."


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _hashable(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool, type(None), Symbol))


_ARITHMETIC: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_PURE_CALLS: dict[str, Callable[..., Any]] = {"int": int, "float": float, "round": round, "abs": abs, "min": min,
                                              "max": max}
_SEQUENCES = (str, list, tuple)


def _small_enough(op: ast.operator, left: Any, right: Any) -> bool:
    """Whether `left op right` is plain arithmetic whose result stays small (no memory or CPU bombs)."""
    if is_number(left) and is_number(right):
        if isinstance(op, ast.Pow) and isinstance(left, int) and isinstance(right, int) and right > 0:
            return max(left.bit_length(), 1) * right <= _MAX_INT_BITS
        return True
    if isinstance(op, ast.Add):
        return type(left) is type(right) and isinstance(left, _SEQUENCES) and len(left) + len(right) <= _MAX_ITEMS
    if isinstance(op, ast.Mult):
        seq, times = (left, right) if isinstance(left, _SEQUENCES) else (right, left)
        return (isinstance(seq, _SEQUENCES) and isinstance(times, int) and not isinstance(times, bool)
                and len(seq) * max(times, 0) <= _MAX_ITEMS)
    return False


def _applied(function: Callable[..., Any], args: list[Any], node: ast.AST) -> Any:
    """`function(*args)`, or Opaque where it fails or builds an integer past the size limit."""
    try:
        result = function(*args)
    except (ArithmeticError, ValueError, TypeError):
        return Opaque(source_text(node))
    if isinstance(result, int) and result.bit_length() > _MAX_INT_BITS:
        return Opaque(source_text(node))
    return result


class ConfigModule:
    """The module-level names of a parsed config, each bound to the value read for it."""

    def __init__(self, tree: ast.Module):
        self.names: dict[str, Any] = {}
        self.inherits = False  # `_base_ = [...]`, `with read_base():` or a relative star import
        for stmt in tree.body:
            self._statement(stmt)

    def _statement(self, stmt: ast.stmt) -> None:
        if isinstance(stmt, ast.Import):
            for alias in stmt.names:
                local = alias.asname or alias.name.split(".")[0]
                self.names[local] = Symbol(alias.name if alias.asname else local)
        elif isinstance(stmt, ast.ImportFrom):
            for alias in stmt.names:
                if alias.name == "*":
                    self.inherits = self.inherits or stmt.level > 0
                    continue
                self.names[alias.asname or alias.name] = Symbol(
                    f"{stmt.module}.{alias.name}" if stmt.module else alias.name)
        elif isinstance(stmt, ast.Assign):
            value = self.value(stmt.value)
            for target in stmt.targets:
                self._bind(target, value)
        elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
            self._bind(stmt.target, self.value(stmt.value))
        elif isinstance(stmt, ast.AugAssign) and isinstance(stmt.target, ast.Name):
            name = stmt.target.id
            current = self.names.get(name, Symbol(name))
            self.names[name] = self._binop(stmt.op, current, self.value(stmt.value), stmt)
        elif isinstance(stmt, ast.With):
            self.inherits = self.inherits or any("read_base" in source_text(item.context_expr)
                                                 for item in stmt.items)
        # everything else (calls, function and class definitions, loops, conditionals) is skipped, never run

    def _bind(self, target: ast.expr, value: Any) -> None:
        if isinstance(target, ast.Name):
            self.names[target.id] = value
            self.inherits = self.inherits or target.id == "_base_"
        elif isinstance(target, (ast.Tuple, ast.List)):
            fits = isinstance(value, (list, tuple)) and len(value) == len(target.elts)
            for i, element in enumerate(target.elts):
                self._bind(element, value[i] if fits else Opaque(source_text(target)))
        elif isinstance(target, ast.Subscript) and isinstance(target.value, ast.Name):
            container, key = self.names.get(target.value.id), self.value(target.slice)
            if isinstance(container, dict) and _hashable(key):
                container[key] = value

    def value(self, node: ast.expr) -> Any:
        try:
            return self._value(node)
        except RecursionError:
            return Opaque(source_text(node))

    def _value(self, node: ast.expr) -> Any:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
            items: list[Any] = []
            for element in node.elts:
                if isinstance(element, ast.Starred):
                    inner = self._value(element.value)
                    if not isinstance(inner, (list, tuple)) or len(items) + len(inner) > _MAX_ITEMS:
                        return Opaque(source_text(node))
                    items.extend(inner)
                else:
                    items.append(self._value(element))
            return tuple(items) if isinstance(node, ast.Tuple) else items
        if isinstance(node, ast.Dict):
            out: dict[Any, Any] = {}
            for key_node, value_node in zip(node.keys, node.values):
                if key_node is None:  # {**other}
                    inner = self._value(value_node)
                    if not isinstance(inner, dict):
                        return Opaque(source_text(node))
                    out.update(inner)
                    continue
                key = self._value(key_node)
                if not _hashable(key):
                    return Opaque(source_text(node))
                out[key] = self._value(value_node)
            return out
        if isinstance(node, ast.Name):
            return self.names.get(node.id, Symbol(node.id))
        if isinstance(node, ast.Attribute):
            base = self._value(node.value)
            if isinstance(base, Symbol):
                return Symbol(f"{base.path}.{node.attr}")
            if isinstance(base, dict) and node.attr in base:  # mmengine's ConfigDict attribute access
                return base[node.attr]
            return Opaque(source_text(node))
        if isinstance(node, ast.Subscript) and not isinstance(node.slice, ast.Slice):
            base, key = self._value(node.value), self._value(node.slice)
            if isinstance(base, Symbol) and isinstance(key, str):
                return Symbol(f"{base.path}.{key}")
            if isinstance(base, dict) and _hashable(key) and key in base:
                return base[key]
            if isinstance(base, _SEQUENCES) and type(key) is int and -len(base) <= key < len(base):
                return base[key]
            return Opaque(source_text(node))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            operand = self._value(node.operand)
            if is_number(operand):
                return -operand if isinstance(node.op, ast.USub) else operand
            return Opaque(source_text(node))
        if isinstance(node, ast.BinOp):
            return self._binop(node.op, self._value(node.left), self._value(node.right), node)
        if isinstance(node, ast.Call):
            return self._call(node)
        return Opaque(source_text(node))

    def _binop(self, op: ast.operator, left: Any, right: Any, node: ast.AST) -> Any:
        function = _ARITHMETIC.get(type(op))
        if function is None or not _small_enough(op, left, right):
            return Opaque(source_text(node))
        return _applied(function, [left, right], node)

    def _call(self, node: ast.Call) -> Any:
        function = self._value(node.func)
        if not isinstance(function, Symbol):
            return Opaque(source_text(node))
        args = [self._value(a) for a in node.args if not isinstance(a, ast.Starred)]
        pure = _PURE_CALLS.get(function.path)
        if pure is not None and not node.keywords and args and all(is_number(a) for a in args):
            return _applied(pure, args, node)
        is_dict = function.path == "dict"
        out: dict[Any, Any] = {} if is_dict else {"type": function}
        if is_dict and args:
            if len(args) != 1 or not isinstance(args[0], dict):
                return Opaque(source_text(node))
            out.update(args[0])
        for keyword in node.keywords:
            if keyword.arg is None:  # f(**other)
                inner = self._value(keyword.value)
                if not isinstance(inner, dict):
                    return Opaque(source_text(node))
                out.update(inner)
            else:
                out[keyword.arg] = self._value(keyword.value)
        return out if is_dict else Call(out, source_text(node))
