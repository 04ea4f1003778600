"""Mutation check: small deliberate bugs in the code the suite must guard, and which of them survive.

Each target names functions and the tests that guard them. Every mutant changes one thing inside
one of those functions (a comparison, an arithmetic operator, ``and``/``or``, ``min``/``max``, a
constant, a dropped statement, or the whole body replaced by ``pass``), is written into a private
copy of the tracked tree (the working tree is never touched), and the target's tests run against
it with ``-x``. A mutant is killed when they fail or time out; the survivors are printed so a
person can judge which matter and write the test that kills them.

    python bench/mutants.py                      # every target
    python bench/mutants.py --target validate --max 40 --seed 1

Prints JSON: per target, mutants tried, killed, seconds, and each survivor (file, line, change).
CI does not run it: a full pass takes tens of minutes on two cores.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Target:
    """Functions of one module and the tests that must notice a bug in them."""

    path: str
    functions: tuple[str, ...]
    tests: tuple[str, ...]


TARGETS: dict[str, Target] = {
    "timer": Target("engine/core/timing.py", ("earliest_times",),
                    ("tests/test_timing.py", "tests/test_validate.py", "tests/test_schedules.py")),
    "step_timing": Target("engine/planners/schedules/timing.py", ("time_steps",), ("tests/test_schedules.py",)),
    "compact": Target("engine/planners/validate.py", ("compact", "_stream_chains"),
                      ("tests/test_validate.py", "tests/test_timing.py")),
    "residency": Target("engine/core/memory.py", ("memory_events", "peak_resident", "memory_caps"),
                        ("tests/test_validate.py", "tests/test_heuristic.py", "tests/test_sim_core.py")),
    "memory_timeline": Target("engine/core/memory.py", ("MemoryTimeline",), ("tests/test_heuristic.py",)),
    "validate": Target("engine/planners/validate.py", ("validate_plan", "_check_placements", "_check_precedence",
                                                       "_check_overlap", "_check_order", "_check_memory",
                                                       "_memory_events", "peak_memory", "free_time"),
                       ("tests/test_validate.py",)),
    "loop_update": Target("engine/study/loop.py", ("update_comm",), ("tests/test_loop.py",)),
    "mip_result": Target("engine/planners/mip/solution.py", ("solve_instance", "relative_gap", "integral"),
                         ("tests/test_mip.py", "tests/test_mip_regressions.py")),
    "mip_plan": Target("engine/planners/mip/plan.py", ("plan_mip", "build_plan"),
                       ("tests/test_mip.py", "tests/test_mip_regressions.py")),
}

_FLIP_CMP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
             ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}
_FLIP_BIN = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Mult}
_FLIP_BOOL = {ast.And: ast.Or, ast.Or: ast.And}
_DROPPABLE = (ast.Expr, ast.AugAssign, ast.If, ast.Continue, ast.Break)


def _droppable(stmt: ast.stmt) -> bool:
    """A statement whose removal still parses and is not a docstring."""
    docstring = isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)
    return isinstance(stmt, _DROPPABLE) and not docstring


def _scopes(tree: ast.Module, names: tuple[str, ...]) -> list[ast.AST]:
    """The function or class definitions named ``names`` anywhere in ``tree``."""
    return [n for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.name in names]


def _points(tree: ast.Module, names: tuple[str, ...]) -> list[tuple[int, int, str]]:
    """Every mutation as (scope index, node index in walk order, kind); deterministic for a source."""
    out: list[tuple[int, int, str]] = []
    for si, scope in enumerate(_scopes(tree, names)):
        if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out.append((si, -1, "body->pass"))
        for ni, node in enumerate(ast.walk(scope)):
            if isinstance(node, ast.Compare) and type(node.ops[0]) in _FLIP_CMP:
                out.append((si, ni, "compare"))
            elif isinstance(node, ast.BinOp) and type(node.op) in _FLIP_BIN:
                out.append((si, ni, "binop"))
            elif isinstance(node, ast.BoolOp) and type(node.op) in _FLIP_BOOL:
                out.append((si, ni, "boolop"))
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("min", "max"):
                out.append((si, ni, "minmax"))
            elif isinstance(node, ast.Constant) and type(node.value) in (int, float):
                out.append((si, ni, "constant"))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.For, ast.While, ast.If, ast.With)):
                for k, stmt in enumerate(node.body):
                    if _droppable(stmt) and len(node.body) > 1:
                        out.append((si, ni, f"drop:{k}"))
    return out


def mutate(source: str, names: tuple[str, ...], point: tuple[int, int, str]) -> tuple[str, int, str]:
    """``source`` with one mutation applied: (new source, line, description)."""
    tree = ast.parse(source)
    si, ni, kind = point
    scope = _scopes(tree, names)[si]
    if kind == "body->pass":
        assert isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef))
        line, what = scope.lineno, f"{scope.name}: body -> pass"
        scope.body = [ast.Pass()]
        return ast.unparse(tree), line, what
    node = list(ast.walk(scope))[ni]
    line = getattr(node, "lineno", scope.lineno)
    if kind == "compare":
        old = type(node.ops[0])
        node.ops[0] = _FLIP_CMP[old]()
        what = f"{old.__name__} -> {_FLIP_CMP[old].__name__}"
    elif kind == "binop":
        old = type(node.op)
        node.op = _FLIP_BIN[old]()
        what = f"{old.__name__} -> {_FLIP_BIN[old].__name__}"
    elif kind == "boolop":
        old = type(node.op)
        node.op = _FLIP_BOOL[old]()
        what = f"{old.__name__} -> {_FLIP_BOOL[old].__name__}"
    elif kind == "minmax":
        new = "max" if node.func.id == "min" else "min"
        what, node.func.id = f"{node.func.id} -> {new}", new
    elif kind == "constant":
        old_value = node.value
        node.value = type(old_value)(1 - old_value if old_value in (0, 1) else old_value + 1)
        what = f"constant {old_value!r} -> {node.value!r}"
    else:
        k = int(kind.split(":")[1])
        stmt = node.body[k]
        line = stmt.lineno
        what = f"drop `{ast.unparse(stmt).splitlines()[0][:60]}`"
        node.body[k] = ast.Pass()
    return ast.unparse(tree), line, what


def _copy_tree(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    for rel in files:
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def _run_tests(copy: Path, tests: tuple[str, ...], timeout_s: float) -> str:
    """``passed``, ``failed`` or ``timeout`` for the tests run in ``copy``."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--no-header", *tests]
    try:
        proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return "timeout"
    return "passed" if proc.returncode == 0 else "failed"


def run_target(name: str, target: Target, copy: Path, max_mutants: int | None, seed: int,
               timeout_s: float) -> dict:
    original = (ROOT / target.path).read_text()
    points = _points(ast.parse(original), target.functions)
    if max_mutants is not None and len(points) > max_mutants:
        points = sorted(random.Random(seed).sample(points, max_mutants))
    t0 = time.perf_counter()
    killed, survivors = 0, []
    try:
        for point in points:
            source, line, what = mutate(original, target.functions, point)
            (copy / target.path).write_text(source)
            if _run_tests(copy, target.tests, timeout_s) == "passed":
                survivors.append({"file": target.path, "line": line, "change": what})
            else:
                killed += 1
    finally:
        (copy / target.path).write_text(original)
    return {"target": name, "functions": list(target.functions), "tests": list(target.tests),
            "mutants": len(points), "killed": killed, "survived": len(survivors),
            "seconds": round(time.perf_counter() - t0, 1), "survivors": survivors}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", action="append", choices=sorted(TARGETS), help="default: every target")
    ap.add_argument("--max", type=int, default=None, help="at most this many mutants per target (sampled)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per test run (a hang counts as killed)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="plansim-mutants-") as tmp:
        copy = Path(tmp)
        _copy_tree(copy)
        where = subprocess.run([sys.executable, "-c", "import engine; print(engine.__file__)"], cwd=copy,
                               capture_output=True, text=True, check=True).stdout.strip()
        if not where.startswith(str(copy)):
            print(f"mutants: the copy's engine is not the one imported ({where})", file=sys.stderr)
            return 2
        results = []
        for name in args.target or sorted(TARGETS):
            target = TARGETS[name]
            if _run_tests(copy, target.tests, args.timeout) != "passed":
                results.append({"target": name, "error": "the unmutated tests fail"})
                continue
            results.append(run_target(name, target, copy, args.max, args.seed, args.timeout))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    print(json.dumps({"targets": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
