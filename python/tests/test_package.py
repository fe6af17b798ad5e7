"""The package's surface: stubs match the native module, docstrings, version, log level."""
import ast
import inspect
import re
from pathlib import Path

import numpy as np
import pytest

import zo2
from zo2 import _zo2

from conftest import SOURCE


def stub_members():
    tree = ast.parse((Path(zo2.__file__).parent / "_zo2.pyi").read_text())
    classes, functions = {}, set()
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            classes[node.name] = {n.name for n in node.body if isinstance(n, (ast.FunctionDef, ast.AnnAssign))}
        elif isinstance(node, ast.FunctionDef):
            functions.add(node.name)
    return classes, functions


def test_stubs_match_the_module():
    classes, functions = stub_members()
    native_classes = {n for n, v in vars(_zo2).items() if inspect.isclass(v)}
    assert native_classes == set(classes)
    for name in native_classes:
        public = {m for m in dir(getattr(_zo2, name)) if not m.startswith("_")}
        public |= {m for m in ("__enter__", "__exit__") if m in vars(getattr(_zo2, name))}
        stubbed = {m for m in classes[name] if not m.startswith("_") or m in ("__enter__", "__exit__")}
        assert public == stubbed, name
    assert "__init__" in classes["Model"] and "__init__" in classes["Session"]
    native_functions = {n for n, v in vars(_zo2).items() if callable(v) and not inspect.isclass(v)}
    assert native_functions == functions


def test_session_stub_names_every_keyword(tiny):
    # The stub's keyword-only parameters of Session.__init__ are the module's: the names its
    # "unknown session parameter" error lists (a type checker would reject any it lacks).
    tree = ast.parse((Path(zo2.__file__).parent / "_zo2.pyi").read_text())
    session = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Session")
    init = next(n for n in session.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    stubbed = {a.arg for a in init.args.kwonlyargs}
    with pytest.raises(TypeError) as e:
        zo2.Session(tiny, bogus=1)
    listed = set(str(e.value).split("(the parameters: ")[1].rstrip(")").split(", "))
    assert stubbed == listed


def test_docstrings():
    for obj in (zo2.Session, zo2.Session.step, zo2.Session.step_choices, zo2.Session.eval, zo2.Session.save,
                zo2.Session.token_logprobs, zo2.Session.generate, zo2.Session.generate_text, zo2.Model.load, zo2.Tokenizer.encode, zo2.train, zo2.plan):
        assert obj.__doc__ and len(obj.__doc__) > 40, obj


def _doc_text(obj):
    """The docstring without the signature pybind11 puts first ("close(self: zo2._zo2.Model) -> None")."""
    doc = inspect.getdoc(obj) or ""
    lines = doc.splitlines()
    if lines and re.match(r"^[A-Za-z_][A-Za-z0-9_]*\(.*\)( -> .*)?$", lines[0]):
        lines = lines[1:]
    return "\n".join(lines).strip()


def test_every_public_name_has_a_docstring():
    # README: "every class and method has a docstring". Adversarial pass 70 found properties,
    # Tokenizer.from_files and __enter__/__exit__ with only pybind11's signature.
    missing = []
    for name in zo2.__all__:
        obj = getattr(zo2, name)
        if not (inspect.isclass(obj) or callable(obj)):
            continue  # __version__
        if len(_doc_text(obj)) < 10:
            missing.append(name)
        if not inspect.isclass(obj):
            continue
        members = {m for m in vars(obj) if not m.startswith("_")}
        members |= {m for m in ("__enter__", "__exit__") if m in vars(obj)}
        if obj.__module__ == "zo2._zo2" and "__init__" in vars(obj):
            members.add("__init__")
        for member in sorted(members):
            attr = inspect.getattr_static(obj, member)
            if isinstance(attr, (staticmethod, classmethod)):
                attr = attr.__func__
            if not (callable(attr) or isinstance(attr, property) or hasattr(attr, "__get__")):
                continue  # a dataclass field's default, a class attribute (status)
            if len(_doc_text(attr)) < 10:
                missing.append(f"{name}.{member}")
    assert missing == []


def test_version_and_log_level():
    assert zo2.__version__ == _zo2.version() and zo2.__version__.count(".") == 2
    zo2.set_log_level("warn")
    zo2.set_log_level("info")
    with pytest.raises(zo2.InvalidArgumentError, match="loud"):
        zo2.set_log_level("loud")


def test_exception_classes():
    for cls in (zo2.InvalidArgumentError, zo2.FileIOError, zo2.FormatError, zo2.UnsupportedError,
                zo2.OutOfMemoryError, zo2.DeviceError, zo2.InternalError, zo2.AbortedError):
        assert issubclass(cls, zo2.Error)
    assert [c.status for c in (zo2.InvalidArgumentError, zo2.FileIOError, zo2.FormatError, zo2.UnsupportedError,
                               zo2.OutOfMemoryError, zo2.DeviceError, zo2.InternalError)] == [-1, -2, -3, -4, -5, -6, -7]
    assert issubclass(zo2.InvalidArgumentError, ValueError) and issubclass(zo2.FileIOError, OSError)
    # A wrong type is a TypeError, and an InvalidArgumentError (status -1) as before.
    assert issubclass(zo2.InvalidTypeError, TypeError) and issubclass(zo2.InvalidTypeError, zo2.InvalidArgumentError)
    assert zo2.InvalidTypeError.status == -1


def test_wrong_types_raise_type_error(tiny):
    tok = zo2.Tokenizer.from_dir(SOURCE / "data" / "gpt2")
    with pytest.raises(TypeError, match="must be a path"):
        zo2.Model.load(42)
    with pytest.raises(TypeError, match="ids: an object is not an array of integers"):
        tok.decode(object())
    with pytest.raises(TypeError, match="ids has dtype object"):
        tok.decode(np.array([1, None], dtype=object))
    with pytest.raises(TypeError, match="dtype float"):
        tok.decode(np.array([1.0, 2.0]))
    with pytest.raises(zo2.InvalidArgumentError, match="path contains a NUL character"):
        zo2.Tokenizer.from_dir(str(SOURCE / "data" / "gpt2") + "\0x")


def test_id_to_token_out_of_range():
    tok = zo2.Tokenizer.from_dir(SOURCE / "data" / "gpt2")
    assert tok.id_to_token(0) != ""
    for bad in (tok.vocab_size, -1, 2**31 - 1):
        with pytest.raises(zo2.InvalidArgumentError, match=f"id {bad} is not in the vocabulary"):
            tok.id_to_token(bad)
