"""docs/API.md against the code: every class and function it names exists, in the module it names, with the
signature it writes; and the module layout it describes holds (no sibling imports main, no import cycles,
`import main` needs only NumPy).

How the page is read. A `## name.py` heading opens the section of src/name.py. In it:
- a heading that is one code span, like ### `Dense(in_features, units, *, rng=None)`, names a class or function
  that src/name.py defines (not merely imports). With parentheses, its parameters must be the code's: the same
  names, kinds (positional, *args, keyword-only, **kwargs) and defaults, written as the source writes them (`...`
  for a dataclass field's default_factory; type annotations and a `-> result` are ignored). Under a class
  heading, `method(...)` spans are that class's methods;
- every other code span that is a call, `name(...)`, `Class.name(...)` or `module.name(...)`, is checked the same
  way (spans on a variable, like `np.maximum(x, 0)` or `model.forward(x)`, are left alone).
The table of the `## Modules` section lists each module of src/ with the names it holds, and each of those names
must be defined there.
"""

from __future__ import annotations

import ast
import builtins
import importlib
import inspect
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
DOC_PATH = ROOT / "docs" / "API.md"
DOC = DOC_PATH.read_text(encoding="utf-8")
MODULES = sorted(path.stem for path in SRC.glob("*.py"))
# What `import main` must not need: each is imported only by the function that uses it.
HEAVY = ("threadpoolctl", "matplotlib", "PIL", "sklearn", "yaml", "dotenv")

SPAN = re.compile(r"`([^`\n]+)`")
# name, Class.name or module.name; then optionally (parameters) and optionally -> result
CALL = re.compile(r"(?:(?P<qualifier>[A-Za-z_]\w*)\.)?(?P<name>[A-Za-z_]\w*)(?:\((?P<args>.*)\))?(?:\s*->.*)?")


# ------------------------------------------------------------------------------------------------
# Reading the page
# ------------------------------------------------------------------------------------------------


@dataclass
class Mention:
    """One class or function the page names: where (module section, class heading above it), how, and line."""

    module: str | None
    owner: str | None  # the class whose heading the mention sits under, if any
    qualifier: str | None
    name: str
    args: str | None  # the text between the parentheses, None without parentheses
    heading: bool
    line: int

    def __str__(self) -> str:
        where = f"## {self.module}.py" if self.module else "outside any ## module.py section"
        shown = f"{self.qualifier + '.' if self.qualifier else ''}{self.name}"
        shown += f"({self.args})" if self.args is not None else ""
        return f"docs/API.md line {self.line} ({where}): `{shown}`"


def prose_lines() -> list[tuple[int, str]]:
    """(line number, line) of the page outside fenced code blocks."""
    lines, fenced = [], False
    for number, line in enumerate(DOC.splitlines(), start=1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append((number, line))
    return lines


def mentions() -> list[Mention]:
    """Every class or function heading, and every call-like code span, of the module sections."""
    found: list[Mention] = []
    module = owner = None
    for number, line in prose_lines():
        section = re.fullmatch(r"## (?:`)?(\w+)\.py(?:`)?\s*", line)
        if line.startswith("## "):
            module, owner = (section.group(1) if section else None), None
            continue
        heading = re.fullmatch(r"#{3,6} `([^`]+)`\s*", line)
        if heading:
            call = CALL.fullmatch(heading.group(1))
            assert call, f"docs/API.md line {number}: cannot read the heading {line!r}"
            mention = Mention(module, None, call["qualifier"], call["name"], call["args"], True, number)
            found.append(mention)
            owner = call["name"] if call["name"][:1].isupper() and not call["qualifier"] else None
            continue
        if line.startswith("#"):
            owner = None  # a plain heading ends the class above it
            continue
        for span in SPAN.findall(line):
            call = CALL.fullmatch(span.strip())
            if call and call["args"] is not None:
                found.append(Mention(module, owner, call["qualifier"], call["name"], call["args"], False, number))
    return found


def module_table() -> dict[str, list[str]]:
    """module -> the names its row of the `## Modules` table lists in its third column, "what it holds"."""
    section = re.search(r"^## Modules\n(.*?)(?=^## |\Z)", DOC, re.MULTILINE | re.DOTALL)
    assert section, "docs/API.md has no '## Modules' section"
    rows: dict[str, list[str]] = {}
    for line in section.group(1).splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")] if line.startswith("|") else []
        first = re.fullmatch(r"\[?`(\w+)\.py`\]?(?:\([^)]*\))?", cells[0]) if cells else None
        if first:
            rows[first.group(1)] = [span for span in SPAN.findall(cells[2]) if re.fullmatch(r"[A-Za-z_]\w*", span)]
    return rows


# ------------------------------------------------------------------------------------------------
# Reading the code
# ------------------------------------------------------------------------------------------------


def load(module: str) -> Any:
    assert module in MODULES, f"there is no src/{module}.py"
    return importlib.import_module(module)


def resolve(mention: Mention) -> tuple[Any, str, bool]:
    """(the object, where it must be defined, whether its first parameter `self` is to be dropped), or None's
    object for a span on a variable or a builtin, which the page may write freely."""
    qualifier, name = mention.qualifier, mention.name
    if qualifier in MODULES:
        module = load(qualifier)
        assert hasattr(module, name), f"{mention}: src/{qualifier}.py has no {name}"
        return getattr(module, name), qualifier, False
    if qualifier and not qualifier[:1].isupper():
        return None, "", False  # a call on a variable, like np.maximum(x, 0) or model.forward(x)
    assert mention.module, f"{mention}: name the module (module.{name}) or move it into its ## module.py section"
    module = load(mention.module)
    if qualifier:  # Class.method
        assert hasattr(module, qualifier), f"{mention}: src/{mention.module}.py has no class {qualifier}"
        cls = getattr(module, qualifier)
        assert hasattr(cls, name), f"{mention}: {qualifier} has no {name}"
        return getattr(cls, name), mention.module, True
    if mention.owner and hasattr(getattr(module, mention.owner, None), name):
        return getattr(getattr(module, mention.owner), name), mention.module, True
    if hasattr(module, name):
        return getattr(module, name), mention.module, False
    if not mention.heading and hasattr(builtins, name):
        return None, "", False  # max(x, 0), len(labels)
    raise AssertionError(f"{mention}: src/{mention.module}.py has no {name}"
                         + (f" (nor has {mention.owner})" if mention.owner else ""))


def source_defaults(function: Any) -> dict[str, ast.expr] | None:
    """The default of each parameter as written in the source (None when the source cannot be read, as for the
    __init__ a dataclass generates)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    except (OSError, TypeError, SyntaxError):
        return None
    definition = next((node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                       and node.name == function.__name__), None)
    if definition is None:
        return None
    arguments = definition.args
    positional = arguments.posonlyargs + arguments.args
    defaults = dict(zip([a.arg for a in positional][len(positional) - len(arguments.defaults):], arguments.defaults))
    defaults.update({a.arg: d for a, d in zip(arguments.kwonlyargs, arguments.kw_defaults) if d is not None})
    return defaults


KINDS = {inspect.Parameter.POSITIONAL_ONLY: "positional", inspect.Parameter.POSITIONAL_OR_KEYWORD: "positional",
         inspect.Parameter.VAR_POSITIONAL: "*args", inspect.Parameter.KEYWORD_ONLY: "keyword-only",
         inspect.Parameter.VAR_KEYWORD: "**kwargs"}


def documented_parameters(args: str, mention: Mention) -> list[tuple[str, str, ast.expr | None]]:
    """(name, kind, default expression) of each parameter the page writes, read as a Python parameter list."""
    try:
        tree = ast.parse(f"def documented({args}): pass")
    except SyntaxError as error:
        raise AssertionError(f"{mention}: the parameters are not a Python parameter list ({error.msg})") from None
    arguments = tree.body[0].args
    positional = arguments.posonlyargs + arguments.args
    padded = [None] * (len(positional) - len(arguments.defaults)) + list(arguments.defaults)
    params = [(a.arg, "positional", d) for a, d in zip(positional, padded)]
    if arguments.vararg:
        params.append((arguments.vararg.arg, "*args", None))
    params += [(a.arg, "keyword-only", d) for a, d in zip(arguments.kwonlyargs, arguments.kw_defaults)]
    if arguments.kwarg:
        params.append((arguments.kwarg.arg, "**kwargs", None))
    return params


def is_factory(default: Any) -> bool:
    """The stand-in that inspect shows for a dataclass field with a default_factory."""
    return repr(default) == "<factory>"


def same_default(written: ast.expr, actual: Any, in_source: ast.expr | None, module: str) -> bool:
    """The page's default is the code's: the same expression as the source writes it, or, without a source,
    an expression of the same value and type. A dataclass field's default_factory is written `...`."""
    if is_factory(actual):
        return isinstance(written, ast.Constant) and written.value is Ellipsis
    if in_source is not None:
        return ast.unparse(written) == ast.unparse(in_source)
    try:
        value = eval(compile(ast.Expression(written), "<docs/API.md>", "eval"), vars(load(module)))
    except Exception:
        return False
    return type(value) is type(actual) and value == actual


def plain_signature(parameters: list[inspect.Parameter], in_source: dict[str, ast.expr]) -> str:
    """The parameters as the page should write them: names, `*`, `**`, and defaults as the source writes them."""
    shown, star = [], False
    for p in parameters:
        if p.kind is inspect.Parameter.KEYWORD_ONLY and not star:
            shown.append("*")
        star = star or p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.VAR_POSITIONAL)
        prefix = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}.get(p.kind, "")
        if p.default is p.empty:
            default = ""
        elif is_factory(p.default):
            default = "=..."
        else:
            default = "=" + (ast.unparse(in_source[p.name]) if p.name in in_source else repr(p.default))
        shown.append(f"{prefix}{p.name}{default}")
    return f"({', '.join(shown)})"


def check_signature(mention: Mention, obj: Any, module: str, drop_self: bool) -> list[str]:
    """What differs between the parameters the page writes and the code's (empty when they agree)."""
    function = obj.__init__ if inspect.isclass(obj) else obj
    try:
        actual = list(inspect.signature(obj).parameters.values())
    except (TypeError, ValueError):
        return [f"{mention}: Python cannot read the signature of {mention.name}; write it without parentheses"]
    if drop_self and actual and actual[0].name in ("self", "cls"):
        actual = actual[1:]
    written = documented_parameters(mention.args or "", mention)
    in_source = source_defaults(function) if inspect.isfunction(function) else None
    code = [(p.name, KINDS[p.kind]) for p in actual]
    if [(name, kind) for name, kind, _ in written] != code:
        return [f"{mention}: the code says {mention.name}{plain_signature(actual, in_source or {})}"]
    problems = []
    for (name, _, default), parameter in zip(written, actual):
        if (default is None) != (parameter.default is inspect.Parameter.empty):
            problems.append(f"{mention}: {name} " + ("has no default in the code" if default is not None
                                                     else f"has the default {parameter.default!r} in the code"))
        elif default is not None and not same_default(default, parameter.default,
                                                      (in_source or {}).get(name), module):
            code_default = ast.unparse(in_source[name]) if in_source and name in in_source else repr(parameter.default)
            problems.append(f"{mention}: {name}={ast.unparse(default)}, but the code says {name}={code_default}")
    return problems


def defined_in(obj: Any) -> str | None:
    """The module that defines a class or function (None for anything else: a constant, a property)."""
    return getattr(obj, "__module__", None) if inspect.isclass(obj) or inspect.isfunction(obj) else None


# ------------------------------------------------------------------------------------------------
# The tests
# ------------------------------------------------------------------------------------------------


def test_the_page_has_a_section_per_module_and_names_enough() -> None:
    sections = re.findall(r"^## `?(\w+)\.py`?\s*$", DOC, re.MULTILINE)
    assert len(sections) == len(set(sections)), "a module has two ## sections"
    unknown = [name for name in sections if name not in MODULES]
    assert not unknown, f"docs/API.md has sections for modules src/ does not have: {unknown}"
    assert {"main", "parallel", "modelfile", "datafiles"} <= set(sections)
    assert sum(mention.heading for mention in mentions()) >= 20, \
        "docs/API.md should head the classes and functions a user starts from"


def test_every_class_and_function_the_page_names_exists_with_that_signature() -> None:
    problems = []
    for mention in mentions():
        try:
            obj, module, drop_self = resolve(mention)
        except AssertionError as error:
            problems.append(str(error))
            continue
        if obj is None:
            continue
        owner = defined_in(obj)
        if owner is not None and owner != module:
            problems.append(f"{mention}: {mention.name} is defined in src/{owner}.py, not in src/{module}.py")
            continue
        if mention.args is not None and (inspect.isclass(obj) or callable(obj)):
            problems += check_signature(mention, obj, module, drop_self)
        elif mention.args is not None:
            problems.append(f"{mention}: {mention.name} is not callable")
    assert not problems, "docs/API.md does not match the code:\n" + "\n".join(problems)


def test_the_module_table_lists_every_module_with_names_it_defines() -> None:
    table = module_table()
    missing = [f"{name}.py" for name in MODULES if name not in table]
    assert not missing, f"the ## Modules table of docs/API.md has no row for {missing}"
    problems = []
    for module_name, names in table.items():
        assert names, f"the row of {module_name}.py names nothing it holds"
        module = load(module_name)
        for name in names:
            if not hasattr(module, name):
                problems.append(f"{module_name}.py has no {name}")
            elif defined_in(getattr(module, name)) not in (None, module_name):
                problems.append(f"{name} is defined in {defined_in(getattr(module, name))}.py, not {module_name}.py")
    assert not problems, "the ## Modules table of docs/API.md is wrong:\n" + "\n".join(problems)


def test_the_usage_example_runs() -> None:
    """The first ```python block of the page, as a reader would paste it (with src/ on the path)."""
    block = re.search(r"```python\n(.*?)```", DOC, re.DOTALL)
    assert block, "docs/API.md should open with a ```python example"
    namespace: dict[str, Any] = {"__name__": "api_example"}
    exec(compile(block.group(1), str(DOC_PATH), "exec"), namespace)
    assert namespace["result"].status == "completed"


def imports_of(path: Path) -> set[str]:
    """The top-level names of every module that a source file imports, anywhere in it (functions included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def imports_by_place(path: Path) -> tuple[set[str], set[str]]:
    """(modules of src/ imported at the top of the file, those imported only inside its functions)."""
    top: set[str] = set()
    inside: set[str] = set()

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                (inside if in_function else top).update(alias.name.split(".")[0] for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                (inside if in_function else top).add(child.module.split(".")[0])
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return top & set(MODULES), inside & set(MODULES) - top


def test_the_import_graph_is_the_code_s() -> None:
    """The last two columns of the `## Modules` table: what each module of src/ imports at the top of the file, and
    only inside functions."""
    section = re.search(r"^## Modules\n(.*?)(?=^## |\Z)", DOC, re.MULTILINE | re.DOTALL)
    assert section, "docs/API.md has no '## Modules' section"
    written = {}
    for line in section.group(1).splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")] if line.startswith("|") else []
        first = re.fullmatch(r"\[?`(\w+)\.py`\]?(?:\([^)]*\))?", cells[0]) if cells else None
        if first:
            assert len(cells) == 5, f"the row of {first.group(1)}.py should have five columns"
            written[first.group(1)] = tuple(set(re.findall(r"`(\w+)`", cell)) for cell in cells[3:])
    assert sorted(written) == MODULES, "the ## Modules table of docs/API.md should have one row per module of src/"
    wrong = {name: f"the page says {written[name]}, the code has {imports_by_place(SRC / f'{name}.py')}"
             for name in MODULES if written[name] != imports_by_place(SRC / f"{name}.py")}
    assert not wrong, f"the import graph of docs/API.md is not the code's: {wrong}"


@pytest.mark.parametrize("module", [name for name in MODULES if name != "main"])
def test_no_sibling_module_imports_main(module: str) -> None:
    assert "main" not in imports_of(SRC / f"{module}.py"), \
        f"src/{module}.py imports main: a sibling module receives what it needs as arguments"


def test_the_modules_of_src_import_each_other_without_a_cycle() -> None:
    graph = {name: imports_of(SRC / f"{name}.py") & set(MODULES) - {name} for name in MODULES}
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"import cycle in src/: {' -> '.join((*path, name))}"
        if name in done:
            return
        for imported in sorted(graph[name]):
            visit(imported, (*path, name))
        done.add(name)

    for name in MODULES:
        visit(name, ())


def test_import_main_and_train_with_numpy_alone() -> None:
    """With threadpoolctl, matplotlib, Pillow, scikit-learn, PyYAML and python-dotenv made unimportable, `import
    main` works, and so does a training epoch of the layers on synthetic digits on one thread."""
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(SRC)!r})
        for name in {HEAVY!r}:
            sys.modules[name] = None  # import name -> ImportError
        import main
        from config_schema import validate_config
        cfg = validate_config({{"data": {{"dataset": "synthetic", "n_train": 64, "n_test": 32}}}})
        data = main.load_data(cfg["data"])
        rngs = main.make_rngs(0)
        model = main.build_model(cfg["model"], data.input_shape, data.num_classes, rngs["init"])
        result = main.train(model, main.Adam(), data, epochs=1, batch_size=32, rng=rngs["shuffle"])
        assert result.status == "completed", result
        loaded = sorted(name for name in {HEAVY!r} if sys.modules.get(name) is not None)
        assert not loaded, loaded
        print("ok")
    """)
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]
