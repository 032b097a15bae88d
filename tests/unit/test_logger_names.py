"""Every logger of the daemon, the agents and the CLI is ``hotsite.<module>``: one tree, nothing else in it."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("appliance", "failover", "monitoring")


def _formatted(part: ast.expr) -> ast.expr:
    """The expression inside one ``{...}`` of an f-string."""
    assert isinstance(part, ast.FormattedValue), ast.dump(part)
    return part.value


def _name(call: ast.Call) -> str | None:
    """The logger name a getLogger call asks for, as written; None for the root logger."""
    if not call.args:
        return None
    arg = call.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    if isinstance(arg, ast.JoinedStr):
        parts = [
            v.value if isinstance(v, ast.Constant) else "{" + ast.unparse(_formatted(v)) + "}"
            for v in arg.values
        ]
        return "".join(str(p) for p in parts)
    return ast.unparse(arg)


def test_every_module_logger_is_under_hotsite() -> None:
    wrong = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and ast.unparse(node.func) == "logging.getLogger":
                    name = _name(node)
                    if name is None or path.name == "logs.py":
                        continue  # the root logger, configured by appliance.logs.setup; its noisy libraries
                    if not name.startswith("hotsite."):
                        wrong.append(f"{path.relative_to(ROOT)}:{node.lineno}: {name}")
    assert wrong == [], "name loggers hotsite.<module>:\n" + "\n".join(wrong)
