"""API contract: every call from the module into Slicer exists in the released Slicer and takes our arguments.

Why: the module runs inside the released 3D Slicer (5.10 to 5.12) while the tests run on slicer-core, a PyPI
snapshot whose API differs (``AddArchetypeVolume`` takes a fifth argument there, none in a release) and which
lacks the Qt-bound modules entirely (dialogs, ``slicer.packaging``, ``SampleData``, ``PyTorchUtils``,
``parameterNodeWrapper``). A wrong keyword or argument count there only shows up in the application, in front of
a user. So the calls are found statically (``ast``) and each is checked against

- the released signatures kept in ``Testing/data/slicer_released_api.json`` (read from Slicer's sources; they
  win where they exist), and otherwise
- slicer-core as installed: ``inspect.signature`` for Python functions, the ``__doc__`` overloads of
  VTK-wrapped methods.

How calls are found: names bound by ``import`` to ``slicer``, ``vtk``, ``vtkmodules``, ``SampleData`` or
``PyTorchUtils`` give qualified callees (``slicer.util.loadUI``); receivers get a type from parameter and
field annotations, from assignments of constructors or annotated functions, from the return types in VTK
docstrings, and ``self``/``super()`` from the Slicer base classes. A capitalised method on a receiver of unknown
type is looked up in the data's method-name table. Slicer callables stored in a field of one of our classes
(``InstallActions(confirm=slicer.util.confirmOkCancelDisplay)``) are checked where that field is called.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data" / "slicer_released_api.json"
MODULE_DIR = ROOT / "SegMambaSlicer"
#: Top-level names whose attributes are Slicer's API (VTK included: MRML classes are VTK classes).
SLICER_ROOTS = frozenset({"slicer", "SampleData", "PyTorchUtils", "vtk", "vtkmodules"})
_VTK_SIGNATURE_START = re.compile(r"^(\w+)\(")


# ---------------------------------------------------------------- what the scanner finds


@dataclass(frozen=True)
class Ref:
    """What an expression stands for, as far as the scanner can tell.

    kind: "path" (a module, class or function reached by name: ``slicer.util.loadUI``), "method" (a member
    reached through an instance of ``name``'s class: ``self`` is bound), "instance" (an object of class
    ``name``), "field" (a callable field ``Class.field`` of one of our classes), "bymethod" (method ``name``
    of a receiver whose class is taken from the data's method-name table), "local" (our own code) or
    "foreign" (numpy, SimpleITK, Qt...: outside the contract).
    """

    kind: str
    name: str = ""


FOREIGN = Ref("foreign")
LOCAL = Ref("local")


@dataclass(frozen=True)
class CallSite:
    """One call into Slicer: where, what, and the shape of its arguments."""

    where: str
    callee: str
    bound: bool  # reached through an instance: ``self`` is not among the arguments
    positional: int
    keywords: tuple[str, ...]
    starred: bool = False  # ``*args``: more positional arguments may come at run time
    open_keywords: bool = False  # ``**mapping`` whose keys are not known statically
    via: str = ""  # how the callee was resolved when not by name


@dataclass
class _ClassInfo:
    """A class of the scanned file: its Slicer bases, own methods, ``self.x =`` attributes, annotated fields."""

    bases: list[str]
    methods: set[str]
    assigned: set[str]
    fields: dict[str, ast.expr]


@dataclass
class Scan:
    """Everything found in a set of files (see :func:`scan_sources`)."""

    sites: list[CallSite] = field(default_factory=list)
    imports: list[tuple[str, str]] = field(default_factory=list)  # (where, qualified name)
    bindings: dict[str, tuple[Ref, str]] = field(default_factory=dict)  # "Class.field" -> (callee, where)
    called_fields: set[str] = field(default_factory=set)  # the bound fields that some call goes through
    unresolved: list[str] = field(default_factory=list)  # problem lines


def _root(name: str) -> str:
    return name.split(".", 1)[0]


class _FileScanner:
    """Walks one module's AST, giving names and receivers types, and records the calls into Slicer."""

    def __init__(self, tree: ast.Module, rel_path: str, api: Api, scan: Scan) -> None:
        self.rel_path, self.api, self.scan = rel_path, api, scan
        self.imports: dict[str, str] = {}
        self.classes: dict[str, _ClassInfo] = {}
        self.functions: dict[str, ast.expr | None] = {}
        self._assigns: list[dict[str, list[ast.expr]]] = [{}]
        self._collect_imports(tree)
        for node in tree.body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                self.functions[node.name] = node.returns
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                self.classes[node.name] = self._class_info(node)

    # -- module-level facts

    def _collect_imports(self, tree: ast.Module) -> None:
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    self.imports[alias.asname or alias.name.split(".")[0]] = (
                        alias.name if alias.asname else alias.name.split(".")[0])
                    self._record_import(node, alias.name)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                for alias in node.names:
                    qualified = f"{node.module}.{alias.name}"
                    self.imports[alias.asname or alias.name] = qualified
                    self._record_import(node, qualified)

    def _record_import(self, node: ast.stmt, qualified: str) -> None:
        if _root(qualified) in SLICER_ROOTS:
            self.scan.imports.append((f"{self.rel_path}:{node.lineno}", qualified))

    def _class_info(self, node: ast.ClassDef) -> _ClassInfo:
        bases = [ref.name for ref in map(self.resolve, node.bases) if ref is not None and ref.kind == "path"
                 and _root(ref.name) in SLICER_ROOTS]
        for decorator in node.decorator_list:
            ref = self.resolve(decorator.func if isinstance(decorator, ast.Call) else decorator)
            if ref is not None and ref.name in self.api.decorated_classes:
                bases.append(self.api.decorated_classes[ref.name])
        methods = {n.name for n in node.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
        assigned = {t.attr for n in ast.walk(node) if isinstance(n, ast.Assign) for t in n.targets
                    if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"}
        fields = {n.target.id: n.annotation for n in node.body
                  if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
        return _ClassInfo(bases, methods, assigned, fields)

    # -- types of expressions

    def annotation(self, node: ast.expr | None) -> Ref | None:
        """The type an annotation names; ``X | None`` is X; ``Callable[...]`` is a callable field."""
        if node is None:
            return None
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
            sides = [self.annotation(side) for side in (node.left, node.right)
                     if not (isinstance(side, ast.Constant) and side.value is None)]
            return sides[0] if len(sides) == 1 else None
        if isinstance(node, ast.Subscript):
            return Ref("field") if ast.unparse(node.value).endswith("Callable") else None
        ref = self.resolve(node)
        if ref is None or ref.kind == "foreign":
            return ref
        return Ref("instance", ref.name) if ref.kind == "path" else None

    def resolve(self, node: ast.expr, env: Mapping[str, Ref | None] | None = None,
                cls: str | None = None) -> Ref | None:
        """What ``node`` stands for (see :class:`Ref`), or None when the scanner cannot tell."""
        env = env or {}
        if isinstance(node, ast.Name):
            if node.id in env:
                return env[node.id]
            if node.id in self.imports:
                qualified = self.imports[node.id]
                return Ref("path", qualified) if _root(qualified) in SLICER_ROOTS else FOREIGN
            if node.id in self.classes or node.id in self.functions:
                return Ref("path", f"local:{node.id}")
            return None
        if isinstance(node, ast.Attribute):
            base = self.resolve(node.value, env, cls)
            if base is None:
                return self._by_name(node.attr)
            if base.kind in ("foreign", "local"):
                return base
            if base.kind == "path":
                if base.name.startswith("local:"):
                    return LOCAL
                qualified = f"{base.name}.{node.attr}"
                instance = self.api.instances.get(qualified)
                return Ref("instance", instance) if instance else Ref("path", qualified)
            if base.kind == "instance":
                return self._member(base.name, node.attr)
            return None
        if isinstance(node, ast.Call):
            if isinstance(node.func, ast.Name) and node.func.id == "super" and cls:
                return Ref("instance", f"super:{cls}")
            return self._returned(self.resolve(node.func, env, cls))
        if isinstance(node, ast.IfExp | ast.BoolOp):
            operands = [node.body, node.orelse] if isinstance(node, ast.IfExp) else node.values
            refs = {self.resolve(operand, env, cls) for operand in operands
                    if not (isinstance(operand, ast.Constant) and operand.value is None)}
            return refs.pop() if len(refs) == 1 else None
        return None

    def _by_name(self, attr: str) -> Ref | None:
        return Ref("bymethod", attr) if attr in self.api.methods else None

    def _returned(self, func: Ref | None) -> Ref | None:
        """The type of calling ``func``: a class gives its instance, an annotated function its return type."""
        if func is None or func.kind in ("foreign", "local"):
            return func
        if func.kind == "path" and func.name.startswith("local:"):
            name = func.name.removeprefix("local:")
            if name in self.classes:
                return Ref("instance", func.name)
            return self.annotation(self.functions.get(name))
        if func.kind == "path" and self.api.is_class(func.name):
            return Ref("instance", func.name)
        if func.kind == "method":
            return self.api.vtk_return_type(func.name)
        if func.kind == "bymethod":
            returned = {self.api.vtk_return_type(f"{owner}.{func.name}") for owner in self.api.methods[func.name]}
            return returned.pop() if len(returned) == 1 else None
        return None

    def _member(self, type_name: str, attr: str) -> Ref | None:
        """``instance.attr``: a field or member of our class, else a member of its Slicer bases or class."""
        if not type_name.startswith(("local:", "super:")):
            # A VTK return type may be a base class (GetDisplayNode gives vtkMRMLDisplayNode): then the table
            if not self.api.knows(f"{type_name}.{attr}") and attr in self.api.methods:
                return Ref("bymethod", attr)
            return Ref("method", f"{type_name}.{attr}")
        info = self.classes.get(type_name.split(":", 1)[1])
        if info is None:
            return None
        if type_name.startswith("local:"):
            if attr in info.fields:
                return self.annotation(info.fields[attr]) if not self._is_callable(info.fields[attr]) \
                    else Ref("field", f"{type_name.removeprefix('local:')}.{attr}")
            if attr in info.methods:
                return LOCAL
            if attr in info.assigned:
                return None  # an attribute of unknown type: its methods go by name
        for base in info.bases:
            if self.api.knows(f"{base}.{attr}"):
                return Ref("method", f"{base}.{attr}")
        return Ref("method", f"{info.bases[0]}.{attr}") if info.bases else None

    def _is_callable(self, annotation: ast.expr) -> bool:
        ref = self.annotation(annotation)
        return ref is not None and ref.kind == "field"

    # -- walking scopes

    def walk(self, node: ast.AST, env: dict[str, Ref | None], cls: str | None, method: bool = False) -> None:
        """Visit ``node``; functions get their own environment (typed parameters and assignments).

        ``cls`` is the enclosing class (for ``super()``); ``method`` says that ``node`` is a function defined
        directly in that class, whose first parameter is the instance.
        """
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for decorator in node.decorator_list:
                self.walk(decorator, env, cls)
            inner = self._function_env(node, env, cls if method else None)
            self._assigns.append(self._assignments(node))
            for child in node.body:
                self.walk(child, inner, cls)
            self._assigns.pop()
            return
        if isinstance(node, ast.ClassDef):
            for decorator in node.decorator_list:
                self._record_decorator(decorator, env)
            for child in [*node.bases, *node.body]:
                self.walk(child, env, node.name, method=isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef))
            return
        if isinstance(node, ast.Lambda):
            inner = {**env, **{arg.arg: None for arg in node.args.args}}
            self.walk(node.body, inner, cls)
            return
        if isinstance(node, ast.Call):
            self._record_call(node, env, cls)
        for child in ast.iter_child_nodes(node):
            self.walk(child, env, cls)

    def _function_env(self, node: ast.FunctionDef | ast.AsyncFunctionDef, env: Mapping[str, Ref | None],
                      cls: str | None) -> dict[str, Ref | None]:
        """Types of the function's names: annotated parameters, ``self`` (methods of ``cls``), assignments."""
        inner: dict[str, Ref | None] = dict(env)
        args = [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]
        is_static = any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in node.decorator_list)
        for index, arg in enumerate(args):
            if index == 0 and cls and not is_static:
                inner[arg.arg] = Ref("instance", f"local:{cls}")
            else:
                inner[arg.arg] = self.annotation(arg.annotation)
        for name, values in self._assignments(node).items():
            types = {self.resolve(value, inner, cls) for value in values}
            inner[name] = types.pop() if len(types) == 1 else None
            if inner[name] is not None and inner[name].kind not in ("instance", "foreign"):
                inner[name] = None
        return inner

    @staticmethod
    def _assignments(node: ast.AST) -> dict[str, list[ast.expr]]:
        """``name = value`` statements of this function (not of nested ones), in source order."""
        found: dict[str, list[ast.expr]] = {}

        def visit(current: ast.AST) -> None:
            for child in ast.iter_child_nodes(current):
                if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda | ast.ClassDef):
                    continue
                if isinstance(child, ast.Assign) and len(child.targets) == 1 \
                        and isinstance(child.targets[0], ast.Name):
                    found.setdefault(child.targets[0].id, []).append(child.value)
                visit(child)

        visit(node)
        return found

    # -- recording calls

    def _where(self, node: ast.AST) -> str:
        return f"{self.rel_path}:{node.lineno}"

    def _record_decorator(self, decorator: ast.expr, env: Mapping[str, Ref | None]) -> None:
        """A bare ``@decorator`` is a call with the class as its one positional argument."""
        if isinstance(decorator, ast.Call):
            self.walk(decorator, dict(env), None)
            return
        ref = self.resolve(decorator, env)
        if ref is not None and ref.kind == "path" and _root(ref.name) in SLICER_ROOTS:
            self.scan.sites.append(CallSite(self._where(decorator), ref.name, False, 1, (), via="decorator"))

    def _keywords(self, node: ast.Call) -> tuple[tuple[str, ...], bool]:
        """Keyword names, with those of ``**name`` when ``name`` is built from dict literals in this function."""
        names: list[str] = []
        open_keywords = False
        for keyword in node.keywords:
            if keyword.arg is not None:
                names.append(keyword.arg)
                continue
            values = [keyword.value]
            if isinstance(keyword.value, ast.Name):
                values = self._assigns[-1].get(keyword.value.id, [])
            dicts = [d for value in values for d in ast.walk(value) if isinstance(d, ast.Dict)]
            keys = [key for d in dicts for key in d.keys]
            if not dicts or not all(isinstance(key, ast.Constant) and isinstance(key.value, str) for key in keys):
                open_keywords = True
            names += [key.value for key in keys if isinstance(key, ast.Constant) and isinstance(key.value, str)]
        return tuple(names), open_keywords

    def _record_call(self, node: ast.Call, env: Mapping[str, Ref | None], cls: str | None) -> None:
        func = self.resolve(node.func, env, cls)
        keywords, open_keywords = self._keywords(node)
        shape = {"positional": sum(not isinstance(a, ast.Starred) for a in node.args), "keywords": keywords,
                 "starred": any(isinstance(a, ast.Starred) for a in node.args), "open_keywords": open_keywords}
        where = self._where(node)
        if func is None:
            if isinstance(node.func, ast.Attribute) and node.func.attr[:1].isupper():
                self.scan.unresolved.append(
                    f"{where}: .{node.func.attr}(...): receiver type not inferred and '{node.func.attr}' is not "
                    f"in the 'methods' table of {DATA.name}")
            return
        if func.kind == "bymethod":
            for owner in self.api.methods[func.name]:
                self.scan.sites.append(CallSite(where, f"{owner}.{func.name}", True, **shape,
                                                via="class from the method-name table"))
            return
        if func.kind == "path" and func.name.startswith("local:"):
            self._record_local_class_call(node, func.name.removeprefix("local:"), env, cls, shape)
        elif func.kind == "path" and _root(func.name) in SLICER_ROOTS:
            self.scan.sites.append(CallSite(where, func.name, False, **shape))
        elif func.kind == "method" and _root(func.name) in SLICER_ROOTS:
            self.scan.sites.append(CallSite(where, func.name, True, **shape))
        elif func.kind == "field":
            self.scan.sites.append(CallSite(where, f"field:{func.name}", True, **shape))

    def _record_local_class_call(self, node: ast.Call, name: str, env: Mapping[str, Ref | None],
                                 cls: str | None, shape: dict[str, Any]) -> None:
        """Constructing one of our classes: a Slicer-made constructor, and Slicer callables passed as fields."""
        info = self.classes.get(name)
        if info is None:
            return
        for base in info.bases:
            if base in self.api.decorated_classes.values():
                self.scan.sites.append(CallSite(self._where(node), base, False, **shape, via=f"{name}(...)"))
        for keyword in node.keywords:
            value = self.resolve(keyword.value, env, cls) if keyword.arg else None
            if value is not None and value.kind in ("path", "method") and _root(value.name) in SLICER_ROOTS:
                self.scan.bindings[f"{name}.{keyword.arg}"] = (value, self._where(keyword.value))


def scan_sources(sources: Mapping[str, str], api: Api) -> Scan:
    """Find the calls into Slicer in ``sources`` (relative path -> text); field calls resolved to their callee."""
    scan = Scan()
    for rel_path, text in sources.items():
        tree = ast.parse(text, filename=rel_path)
        scanner = _FileScanner(tree, rel_path, api, scan)
        for node in tree.body:
            scanner.walk(node, {}, None)
    resolved: list[CallSite] = []
    for site in scan.sites:
        if not site.callee.startswith("field:"):
            resolved.append(site)
            continue
        name = site.callee.removeprefix("field:")
        binding = scan.bindings.get(name)
        if binding is not None:
            scan.called_fields.add(name)
            ref, where = binding
            resolved.append(CallSite(site.where, ref.name, ref.kind == "method", site.positional, site.keywords,
                                     site.starred, site.open_keywords,
                                     via=f"passed as {name} at {where}"))
    scan.sites = resolved
    return scan


def module_sources() -> dict[str, str]:
    """The module file and every library file that imports slicer (or lives in the slicer/ layer)."""
    paths = {MODULE_DIR / "SegMambaSlicer.py", *(MODULE_DIR / "SegMambaSlicerLib" / "slicer").glob("*.py")}
    for path in (MODULE_DIR / "SegMambaSlicerLib").rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        names |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and not node.level}
        if any(_root(name) in SLICER_ROOTS for name in names):
            paths.add(path)
    return {str(p.relative_to(ROOT)): p.read_text(encoding="utf-8") for p in sorted(paths)}


# ---------------------------------------------------------------- what Slicer accepts


@dataclass(frozen=True)
class Spec:
    """The accepted forms of one callee as seen by one call (``self`` already placed), and where they come from."""

    forms: tuple[inspect.Signature, ...]
    source: str
    must_pass: Mapping[str, str] = field(default_factory=dict)
    #: Names ``**kwargs`` really uses (the rest are dropped silently at run time); None: any name.
    var_keyword_names: tuple[str, ...] | None = None


_SELF = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)


def _signature_from_table(params: Iterable[Mapping[str, Any]], positional_only: bool = False) -> inspect.Signature:
    kinds = {"*": inspect.Parameter.VAR_POSITIONAL, "**": inspect.Parameter.VAR_KEYWORD}
    result = []
    for param in params:
        if "variadic" in param:
            result.append(inspect.Parameter(param["name"], kinds[param["variadic"]]))
            continue
        kind = (inspect.Parameter.POSITIONAL_ONLY if positional_only else
                inspect.Parameter.KEYWORD_ONLY if param.get("keyword_only") else
                inspect.Parameter.POSITIONAL_OR_KEYWORD)
        default = inspect.Parameter.empty if param["required"] else None
        result.append(inspect.Parameter(param["name"], kind, default=default))
    return inspect.Signature(result)


def _with_self(signature: inspect.Signature) -> inspect.Signature:
    return signature.replace(parameters=[_SELF, *signature.parameters.values()])


def parse_vtk_doc(doc: str) -> list[tuple[inspect.Signature, bool, str]]:
    """Overloads in a VTK-wrapped method's docstring: (positional-only signature without self, static, return).

    The wrapper writes each form as ``Name(self, a:type, b:type=...) -> ret`` (wrapped over lines, ``self``
    absent for static methods), each followed by its ``C++:`` line.
    """
    forms = []
    lines = doc.splitlines()
    index = 0
    while index < len(lines):
        if not _VTK_SIGNATURE_START.match(lines[index]):
            index += 1
            continue
        text = lines[index]
        while index + 1 < len(lines) and not lines[index + 1].startswith("C++:"):
            index += 1
            text += " " + lines[index].strip()
        index += 1
        if index >= len(lines):
            break  # prose that merely starts like a call: a form is always followed by its C++ line
        depth, start, parts, end = 0, text.index("(") + 1, [], None
        for position in range(start - 1, len(text)):
            char = text[position]
            depth += 1 if char in "([" else -1 if char in ")]" else 0
            if char == "," and depth == 1:
                parts.append(text[start:position])
                start = position + 1
            if depth == 0:
                parts.append(text[start:position])
                end = position
                break
        names = [part.strip() for part in parts if part.strip()]
        static = not names or names[0] != "self"
        params = [inspect.Parameter(part.split(":")[0].split("=")[0].strip(), inspect.Parameter.POSITIONAL_ONLY,
                                    default=None if "=" in part else inspect.Parameter.empty)
                  for part in names[0 if static else 1:]]
        returned = text[end + 1:].strip().removeprefix("->").strip() if end is not None else ""
        forms.append((inspect.Signature(params), static, returned))
    return forms


class Api:
    """The released table (wins) and slicer-core as installed, looked up by qualified name."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        self.released: Mapping[str, Mapping[str, Any]] = data["released"]
        self.instances: Mapping[str, str] = data["instances"]
        self.decorated_classes: Mapping[str, str] = data["decorated_classes"]
        self.methods: Mapping[str, list[str]] = data["methods"]
        self.unchecked: Mapping[str, str] = data["unchecked"]
        self.value_passed_unchecked: Mapping[str, str] = data["value_passed_unchecked"]

    @functools.cache  # noqa: B019 - one Api per test session; the cache is the point
    def installed(self, qualified: str) -> tuple[Any, Any] | None:
        """(owner, object) from slicer-core and VTK as installed, or None when absent."""
        parts = qualified.split(".")
        for split in range(len(parts), 0, -1):
            try:
                obj: Any = importlib.import_module(".".join(parts[:split]))
            except ImportError:
                continue
            owner = None
            for name in parts[split:]:
                if not hasattr(obj, name):
                    return None
                owner, obj = obj, getattr(obj, name)
            return owner, obj
        return None

    def unchecked_reason(self, qualified: str) -> str | None:
        """Why the name (or the class or module it belongs to) is not checked, when the data says so."""
        parts = qualified.split(".")
        for split in range(len(parts), 0, -1):
            reason = self.unchecked.get(".".join(parts[:split]))
            if reason:
                return reason
        return None

    def knows(self, qualified: str) -> bool:
        """Whether the name exists in either source (a released entry's parent counts)."""
        return (qualified in self.released or qualified in self.unchecked
                or any(key.startswith(qualified + ".") for key in self.released)
                or self.installed(qualified) is not None)

    def is_class(self, qualified: str) -> bool:
        """Whether calling the name constructs an object (then the call's value is an instance of it)."""
        entry = self.released.get(qualified)
        if entry is not None:
            return entry["kind"] == "class"
        found = self.installed(qualified)
        if found is not None:
            return inspect.isclass(found[1])
        last = qualified.rsplit(".", 1)[-1]
        return last[:1].isupper() or last.startswith(("vtk", "qMRML", "qSlicer"))

    def vtk_return_type(self, qualified: str) -> Ref | None:
        """The class a VTK method returns, when every overload returns the same slicer/vtk class."""
        found = self.installed(qualified)
        if found is None or not _is_vtk_method(found[1]):
            return None
        returned = {ret for _, _, ret in parse_vtk_doc(found[1].__doc__ or "")}
        if len(returned) != 1:
            return None
        name = returned.pop()
        for module in ("slicer", "vtk"):
            if self.installed(f"{module}.{name}") is not None:
                return Ref("instance", f"{module}.{name}")
        return None

    def released_spec(self, qualified: str, bound: bool) -> Spec | None:
        entry = self.released.get(qualified)
        if entry is None:
            return None
        source = f"released: {entry['source']}"
        if entry["kind"] == "vtk_method":
            forms = [_signature_from_table(params, positional_only=True) for params in entry["overloads"]]
            if not bound and not entry["static"]:
                forms = [_with_self(form) for form in forms]
            return Spec(tuple(forms), source)
        form = _signature_from_table(entry["params"])
        if entry["kind"] == "method" and not bound:
            form = _with_self(form)
        names = entry.get("var_keyword_names")
        return Spec((form,), source, entry.get("must_pass", {}), tuple(names) if names is not None else None)

    def installed_spec(self, qualified: str, bound: bool) -> Spec | None:
        found = self.installed(qualified)
        if found is None:
            return None
        owner, obj = found
        source = "slicer-core as installed"
        if _is_vtk_method(obj):
            forms = [(_with_self(form) if not bound and not static else form)
                     for form, static, _ in parse_vtk_doc(obj.__doc__ or "")]
            return Spec(tuple(forms), source + " (VTK docstring)") if forms else None
        if inspect.isclass(obj) and _is_vtk_class(obj):
            return Spec((inspect.Signature(),), source + " (VTK constructor)")
        try:
            signature = inspect.signature(obj)
        except (TypeError, ValueError):
            return None
        static = owner is not None and inspect.isclass(owner) and isinstance(
            inspect.getattr_static(owner, qualified.rsplit(".", 1)[-1]), staticmethod | classmethod)
        if inspect.isclass(owner) and inspect.isfunction(obj) and not static and bound:
            signature = signature.replace(parameters=list(signature.parameters.values())[1:])
        return Spec((signature,), source)


def _is_vtk_method(obj: object) -> bool:
    return type(obj).__name__ in ("method_descriptor", "builtin_function_or_method") and bool(
        obj.__doc__ and _VTK_SIGNATURE_START.match(obj.__doc__))


def _is_vtk_class(cls: type) -> bool:
    return any(base.__name__ == "vtkObjectBase" for base in inspect.getmro(cls))


# ---------------------------------------------------------------- checking


def _describe(site: CallSite) -> str:
    parts = [f"{site.positional}{' or more' if site.starred else ''} positional arguments"]
    if site.keywords:
        parts.append("keywords " + ", ".join(site.keywords))
    return ", ".join(parts)


def _bind_problem(form: inspect.Signature, site: CallSite) -> str | None:
    """Why ``form`` does not accept the call's arguments, or None when it does."""
    positional = [object()] * site.positional
    accepted = set(form.parameters)
    open_keywords = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in form.parameters.values())
    keywords = {name: object() for name in site.keywords}
    try:
        if site.starred or site.open_keywords:
            form.bind_partial(*positional, **keywords)
        else:
            form.bind(*positional, **keywords)
    except TypeError as error:
        unknown = [name for name in site.keywords if name not in accepted and not open_keywords]
        if unknown:
            return f"unknown keyword {', '.join(map(repr, unknown))}"
        most = sum(p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
                   for p in form.parameters.values())
        if "too many positional" in str(error):
            return f"{site.positional} positional arguments, at most {most} accepted"
        return str(error)
    return None


def check_site(site: CallSite, spec: Spec) -> str | None:
    """None when some form of ``spec`` accepts the call and every must-pass argument is passed."""
    problems = [_bind_problem(form, site) for form in spec.forms]
    if all(problems):
        if len(spec.forms) == 1:
            return problems[0]
        arities = sorted({len(form.parameters) for form in spec.forms})
        listed = ", ".join(map(str, arities[:-1])) + f" or {arities[-1]}" if len(arities) > 1 else str(arities[0])
        return f"{_describe(site)}: no form takes that (its forms take {listed} arguments)"
    form = spec.forms[problems.index(None)]
    bound = form.bind_partial(*[object()] * site.positional, **{name: object() for name in site.keywords})
    missing = [name for name in spec.must_pass if name not in bound.arguments]
    if missing:
        return "; ".join(f"must pass {name}: {spec.must_pass[name]}" for name in missing)
    if spec.var_keyword_names is not None:
        dropped = [name for name in site.keywords if name not in form.parameters
                   and name not in spec.var_keyword_names]
        if dropped:
            return (f"keyword {', '.join(map(repr, dropped))} goes to **kwargs, which ignores it "
                    f"(used there: {', '.join(spec.var_keyword_names)})")
    return None


def check_scan(scan: Scan, api: Api) -> list[str]:
    """One readable line per offending call; empty when every call fits the released API."""
    problems = list(scan.unresolved)
    for site in scan.sites:
        if api.unchecked_reason(site.callee):
            continue
        via = f" ({site.via})" if site.via else ""
        specs = [spec for spec in (api.released_spec(site.callee, site.bound),) if spec]
        entry = api.released.get(site.callee, {})
        if not specs or "wheel_differs" not in entry:
            specs += [spec for spec in (api.installed_spec(site.callee, site.bound),) if spec]
        if not specs:
            problems.append(f"{site.where}: {site.callee}{via}: not in the released-API table "
                            f"({DATA.name}) nor in slicer-core as installed")
            continue
        for spec in specs:
            problem = check_site(site, spec)
            if problem:
                problems.append(f"{site.where}: {site.callee}{via}: {problem} [{spec.source}]")
                break
    for where, qualified in scan.imports:
        if not api.knows(qualified):
            problems.append(f"{where}: import {qualified}: not in the released-API table nor in slicer-core")
    for name, (ref, where) in scan.bindings.items():
        if name not in scan.called_fields and name not in api.value_passed_unchecked:
            problems.append(f"{where}: {ref.name} passed as {name}, but no call through {name} was found; "
                            f"list it under 'value_passed_unchecked' in {DATA.name} with the reason")
    return sorted(set(problems), key=_line_order)


def _line_order(problem: str) -> tuple[str, int, str]:
    path, _, rest = problem.partition(":")
    line, _, _ = rest.partition(":")
    return (path, int(line) if line.isdigit() else 0, problem)


# ---------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def api() -> Api:
    pytest.importorskip("slicer", reason="slicer-core (the installed half of the contract) is not installed")
    return Api(json.loads(DATA.read_text(encoding="utf-8")))


@pytest.fixture(scope="module")
def scan(api: Api) -> Scan:
    return scan_sources(module_sources(), api)


def test_every_slicer_call_matches_the_released_api(scan: Scan, api: Api) -> None:
    problems = check_scan(scan, api)
    assert not problems, "calls that the released Slicer would reject:\n" + "\n".join(problems)


def test_scanner_reaches_every_kind_of_call(scan: Scan) -> None:
    """Guards the test above against passing because the scanner stopped finding calls."""
    found = {site.callee for site in scan.sites}
    expected = {
        "slicer.vtkSlicerVolumesLogic.AddArchetypeVolume",  # receiver typed by a function's return annotation
        "SampleData.SampleDataLogic.registerCustomSampleDataSource",
        "slicer.packaging.pip_ensure",
        "PyTorchUtils.PyTorchUtilsLogic.installTorch",  # through a constructed instance
        "slicer.util.confirmOkCancelDisplay",  # passed as InstallActions.confirm, called by the flow
        "slicer.util.errorDisplay",
        "slicer.parameterNodeWrapper.WithinRange",
        "slicer.parameterNodeWrapper.WrappedClass.connectGui",
        "slicer.ScriptedLoadableModule.ScriptedLoadableModuleWidget.resourcePath",  # self, via the base class
        "slicer.util.VTKObservationMixin.addObserver",
        "slicer.vtkMRMLScene.Clear",  # slicer.mrmlScene
        "slicer.vtkSegment.SetLabelValue",  # a local built by a constructor
    }
    assert expected <= found, sorted(expected - found)
    assert any(site.via.startswith("passed as InstallActions.") for site in scan.sites)


def test_released_table_agrees_with_slicer_core_where_both_have_the_name(api: Api) -> None:
    """A transcription check: entries slicer-core also has must match it, unless the entry says why not."""
    def shape(spec: Spec) -> list[list[str]]:
        """Names, kinds and required-ness (default values are not compared: the table does not keep them)."""
        return sorted([str(param.replace(annotation=inspect.Parameter.empty, default=(
            param.default if param.default is inspect.Parameter.empty else None)))
            for param in form.parameters.values()] for form in spec.forms)

    compared, mismatches = 0, []
    for name, entry in api.released.items():
        wheel = api.installed_spec(name, bound=True)
        if "wheel_differs" in entry or wheel is None:
            continue
        compared += 1
        table = api.released_spec(name, bound=True)
        if shape(table) != shape(wheel):
            mismatches.append(f"{name}: table {shape(table)} != slicer-core {shape(wheel)}")
    assert compared >= 15, "slicer-core should share most of slicer.util with the release"
    assert not mismatches, "\n".join(mismatches)


_BAD_CALLS = '''
import slicer
import SampleData

def bad(node):
    slicer.util.tryWithErrorDisplay("text", waitcursor=True)
    slicer.util.loadUI("a.ui", "extra")
    slicer.util.noSuchHelper()
    SampleData.SampleDataLogic.registerCustomSampleDataSource(category="c", sampleName="s", customDownloader=print)
    logic = slicer.vtkSlicerVolumesLogic()
    logic.AddArchetypeVolume("f.nrrd", "name", 4, None, None)
    segment = slicer.vtkSegment()
    segment.SetName("a", "b")
    slicer.util.errorDisplay("text", windowTitle="t", detailsText="typo")
    slicer.pydeps.pip_ensure(["scipy"], requester="r")
    slicer.packaging.pip_ensure(["scipy"], constraint="c.txt", skip_packages=["numpy"])

def good(node):
    slicer.util.errorDisplay("text", windowTitle="t", detailedText="details")
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="c", sampleName="s", uris=[], fileNames=[], customDownloader=print)
    slicer.vtkSlicerVolumesLogic().AddArchetypeVolume("f.nrrd", "name", 4)
    slicer.packaging.pip_ensure(["scipy"], constraints="c.txt", skip_packages=["numpy"], prompt_install=False,
                                requester="r")
'''


def test_checker_flags_synthetic_bad_calls(api: Api) -> None:
    """The checker can fail: an unknown keyword, an extra positional, a missing must-pass, an unknown name."""
    problems = check_scan(scan_sources({"synthetic.py": _BAD_CALLS}, api), api)
    lines = {int(p.split(":")[1]): p for p in problems}
    assert "unknown keyword 'waitcursor'" in lines[6]
    assert "2 positional arguments, at most 1 accepted" in lines[7]
    assert "not in the released-API table" in lines[8]
    assert "must pass uris" in lines[9] and "must pass fileNames" in lines[9]
    assert "no form takes that (its forms take 2, 3 or 4 arguments)" in lines[11] and "SLICER.md" in lines[11]
    assert "slicer.vtkSegment.SetName" in lines[13]
    assert "keyword 'detailsText' goes to **kwargs, which ignores it" in lines[14]
    assert "slicer.pydeps.pip_ensure" in lines[15] and "not in the released-API table" in lines[15]  # no release
    assert "unknown keyword 'constraint'" in lines[16]
    assert sorted(lines) == [6, 7, 8, 9, 11, 13, 14, 15, 16], problems  # nothing in good()


def test_vtk_docstring_parser_reads_overloads_nested_types_and_statics() -> None:
    doc = ("SetColor(self, _arg1:float, _arg2:float, _arg3:float) -> None\nC++: virtual void SetColor(...)\n"
           "SetColor(self, _arg:(float, float, float)) -> None\nC++: virtual void SetColor(const double _arg[3])\n"
           "Tag() -> str\nC++: static const char *Tag()\n")
    forms = parse_vtk_doc(doc)
    assert [(len(f.parameters), static, ret) for f, static, ret in forms] == [
        (3, False, "None"), (1, False, "None"), (0, True, "str")]
    ((clear, static, _),) = parse_vtk_doc("Clear(self, removeSingletons:int=0) -> None\nC++: void Clear(int)\n")
    assert not static and clear.parameters["removeSingletons"].default is None
