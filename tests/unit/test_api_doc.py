"""docs/api.md is the contract as implemented: it names every route the edge serves, every
error code the code can answer or stream, and every status the OpenAPI document promises."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

from starlette.routing import Mount, Route

from broker.core.settings import Settings
from broker.edge import aisdk_routes, openapi, producers
from broker.edge.routes import routes

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "api.md").read_text()
# Calls that carry an error code (HTTP answers, `event: error` data, LLM failures), and the
# position of the code among their arguments.
CODE_ARGUMENT = {"ApiError": 1, "error_response": 1, "error_data": 0, "new_error": 0, "LLMError": 0,
                 "error": 0}
CODE = re.compile(r"[a-z]+(?:_[a-z]+)*")


def _name(call: ast.Call) -> str:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def _strings(node: ast.AST) -> Iterator[str]:
    for child in ast.walk(node):
        if isinstance(child, ast.Constant) and isinstance(child.value, str):
            yield child.value


def error_codes(path: Path) -> set[str]:
    """The codes a module passes to ``CODE_ARGUMENT``'s calls: literals, and the literals a
    variable passed there was assigned from in the same function (``code = {...}.get(...)``,
    ``kind = "a" if ... else "b"``)."""
    tree = ast.parse(path.read_text())
    codes: set[str] = set()
    for function in ast.walk(tree):
        if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        assigned: dict[str, list[ast.AST]] = {}
        for node in ast.walk(function):
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        assigned.setdefault(target.id, []).append(node.value)
        for node in ast.walk(function):
            if not isinstance(node, ast.Call):
                continue
            position = CODE_ARGUMENT.get(_name(node))
            if position is None or len(node.args) <= position:
                continue
            arg = node.args[position]
            sources = assigned.get(arg.id, []) if isinstance(arg, ast.Name) else [arg]
            for source in sources:
                codes |= {s for s in _strings(source) if CODE.fullmatch(s)}
    return codes


def all_error_codes() -> set[str]:
    return {code for package in ("broker", "worker")
            for path in sorted((ROOT / package).rglob("*.py")) for code in error_codes(path)}


def test_the_code_scan_finds_the_codes_it_must() -> None:
    """The scan itself: codes from each kind of call site (else the next test proves little)."""
    codes = all_error_codes()
    assert {"unauthorized", "forbidden", "invalid_json", "history_lost", "worker_lost",
            "worker_shutdown", "llm_rejected", "llm_server_error", "method_not_allowed",
            "http_error", "redis_unavailable", "already_finished"} <= codes
    assert len(codes) >= 25


def test_every_error_code_is_documented() -> None:
    missing = sorted(code for code in all_error_codes() if f"`{code}`" not in DOC)
    assert not missing, f"docs/api.md does not name these error codes: {missing}"


def documented_path(path: str) -> str:
    return path.replace("{gen_id}", "{id}").replace("{chat_id}", "{id}")


def test_every_route_is_documented() -> None:
    for route in [*routes, *aisdk_routes.routes, *producers.routes]:
        if isinstance(route, Mount):
            assert f"`GET {route.path}/" in DOC, route.path
            continue
        assert isinstance(route, Route)
        for method in sorted((route.methods or set()) - {"HEAD"}):
            assert f"`{method} {documented_path(route.path)}`" in DOC, (method, route.path)


def documentation_of(endpoint: str) -> str:
    """The ``##`` section an endpoint heads, or else the table row that names it."""
    heading = re.search(rf"^## {re.escape(endpoint)}.*?(?=^## |\Z)", DOC, re.M | re.S)
    if heading:
        return heading.group(0)
    rows = [line for line in DOC.splitlines() if line.startswith(f"| {endpoint} ")]
    assert len(rows) == 1, f"docs/api.md: no section or table row for {endpoint}"
    return rows[0]


def test_every_status_the_openapi_document_promises_is_documented_with_its_endpoint() -> None:
    for path, operations in openapi.document(Settings())["paths"].items():
        for method, operation in operations.items():
            endpoint = f"`{method.upper()} {documented_path(path)}`"
            text = documentation_of(endpoint)
            for status in operation["responses"]:
                assert f"`{status}" in text, (endpoint, status)
