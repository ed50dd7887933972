"""Every TensorRT name the backend uses exists in TensorRT 10's Python API (no TensorRT needed).

TensorRT cannot be installed here, so ``edgead/engines/tensorrt_engine.py`` is checked against the
``tensorrt-stubs`` type stubs (``tensorrt/__init__.pyi`` + ``tensorrt_bindings/tensorrt.pyi``):

- every ``trt.<Name>`` (and ``trt.<Class>.<Member>``) exists in the stubs;
- every attribute the source reaches on other objects is either in ``TRT_METHODS`` (attribute ->
  owning stub class, checked to exist there) or in ``NOT_TRT`` (plain Python/numpy/our own);
  anything unclassified fails, so a misspelt call or a new TensorRT call can't slip past, and a
  ``TRT_METHODS`` entry the source no longer uses fails too, so the table can't go stale;
- none of the APIs removed in TensorRT 10 (bindings, ``execute_async_v2``...) nor INT8
  calibrators nor pycuda appear;
- no name removed in TensorRT 11 (NVIDIA's "TensorRT 10.x to 11.x Python API" migration page:
  the weak-typing ``BuilderFlag``s, calibration and quantisation flags, the algorithm selector,
  ``platform_has_fast_*``, ``device_memory_size``...) is used on the TensorRT 11 path: only
  ``_weak_precision_flags`` may name them, and it is called only under ``if not strong:``, where
  ``strong`` comes from ``typing_mode`` (which is True on 11).

The CUDA side is checked the same way against the installed cuda-python (``cuda.bindings.runtime``)
and torch, when those are importable.
"""

from __future__ import annotations

import ast
import os
import importlib
import importlib.util
import re
import site
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRT_SOURCE = ROOT / "edgead" / "engines" / "tensorrt_engine.py"
CUDA_SOURCE = ROOT / "edgead" / "engines" / "cuda_rt.py"
TORCH_SOURCE = ROOT / "edgead" / "training" / "reference.py"
ENGINE_SOURCES = (TRT_SOURCE, CUDA_SOURCE, TORCH_SOURCE)

# attribute used on a TensorRT object -> the stub class that must define it
TRT_METHODS: dict[str, str] = {
    # build
    "create_network": "Builder",
    "create_builder_config": "Builder",
    "create_optimization_profile": "Builder",
    "build_serialized_network": "Builder",
    "parse_from_file": "OnnxParser",
    "num_errors": "OnnxParser",
    "get_error": "OnnxParser",
    "num_inputs": "INetworkDefinition",
    "get_input": "INetworkDefinition",
    "num_layers": "INetworkDefinition",
    "get_layer": "INetworkDefinition",
    "type": "ILayer",
    "name": "ITensor",
    "shape": "ITensor",
    "set_shape": "IOptimizationProfile",
    "set_memory_pool_limit": "IBuilderConfig",
    "set_flag": "IBuilderConfig",
    "add_optimization_profile": "IBuilderConfig",
    "create_timing_cache": "IBuilderConfig",
    "set_timing_cache": "IBuilderConfig",
    "get_timing_cache": "IBuilderConfig",
    "serialize": "ITimingCache",
    # run
    "deserialize_cuda_engine": "Runtime",
    "num_io_tensors": "ICudaEngine",
    "get_tensor_name": "ICudaEngine",
    "get_tensor_mode": "ICudaEngine",
    "get_tensor_dtype": "ICudaEngine",
    "create_execution_context": "ICudaEngine",
    "get_tensor_shape": "ICudaEngine IExecutionContext",  # engine: declared shape; context: resolved
    "set_input_shape": "IExecutionContext",
    "set_tensor_address": "IExecutionContext",
    "execute_async_v3": "IExecutionContext",
}

# attributes on non-TensorRT objects (paths, numpy, dicts, our own classes)
NOT_TRT = {
    "append", "items", "get", "exists", "read_bytes", "write_bytes", "read_text", "replace",
    "with_name", "lower", "strip", "join", "hexdigest", "dtype", "ptr", "stream", "handle",
    "dev_in", "dev_out", "fill", "upload", "download", "wait", "timings", "bind", "launch", "close",
    "free", "inputs", "outputs", "compute_capability", "stem", "host_inputs",
    "warning", "encode", "_release", "setdefault", "update",
    "split", "plan_sha256", "backend_version", "device_name",  # version parsing; what a device certificate is keyed by (our attributes)
}

# removed in TensorRT 10 (REFERENCES.md), plus the INT8 calibrator API (removed in TensorRT 11)
FORBIDDEN_ATTRS = {
    "num_bindings", "execute_async_v2", "execute_v2", "execute_async", "execute", "build_engine", "build_cuda_engine",
    "max_workspace_size", "set_binding_shape", "int8_calibrator", "set_calibration_profile",
}
FORBIDDEN_PATTERNS = (re.compile(r"binding", re.I), re.compile(r"^IInt8\w*Calibrator"))
FORBIDDEN_MODULES = ("pycuda", "cuda.cudart", "cudart")

# Removed in TensorRT 11 (NVIDIA, "Migrating Python Code from TensorRT 10.x to 11.x": removed APIs).
TRT11_REMOVED_FLAGS = {"FP16", "INT8", "FP8", "BF16", "INT4", "FP4", "OBEY_PRECISION_CONSTRAINTS",
                       "PREFER_PRECISION_CONSTRAINTS", "DIRECT_IO"}
TRT11_REMOVED_ATTRS = {"int8_calibrator", "set_calibration_profile", "get_calibration_profile", "set_quantization_flag",
                       "get_quantization_flag", "quantization_flags", "clear_quantization_flag", "device_memory_size",
                       "device_memory_size_for_profile", "platform_has_fast_fp16", "platform_has_fast_int8",
                       "algorithm_selector"}
TRT11_REMOVED_NAMES = re.compile(r"^(IInt8\w*Calibrator|IAlgorithm\w*|CalibrationAlgoType|QuantizationFlag)$")
WEAK_TYPING_ONLY = {"_weak_precision_flags"}  # the one function allowed to name removed flags


# ---------------------------------------------------------------- stubs
def _stub_dir() -> Path | None:
    """The site-packages folder holding tensorrt/__init__.pyi and tensorrt_bindings/tensorrt.pyi."""
    candidates: list[Path] = []
    for module in ("tensorrt_bindings", "tensorrt"):
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        for location in (spec.submodule_search_locations or []) if spec else []:
            candidates.append(Path(location).parent)
    candidates += [Path(p) for p in [*sys.path, *site.getsitepackages()] if p]
    for folder in candidates:
        if (folder / "tensorrt" / "__init__.pyi").is_file() and (folder / "tensorrt_bindings" / "tensorrt.pyi").is_file():
            return folder
    return None


def parse_lenient(text: str) -> ast.Module:
    """Parse a stub; the generated stubs hold a few ``def``s with a non-default argument after a
    default one (a SyntaxError), so such a signature is replaced by ``(self, *args, **kwargs)``."""
    lines = text.splitlines()
    for _ in range(200):
        try:
            return ast.parse("\n".join(lines))
        except SyntaxError as exc:
            index = (exc.lineno or 1) - 1
            match = re.match(r"(\s*)def (\w+)\(", lines[index])
            if not match:
                raise
            lines[index] = f"{match.group(1)}def {match.group(2)}(self, *args, **kwargs):"
    raise AssertionError("stub could not be repaired")


def _members(cls: ast.ClassDef) -> set[str]:
    names: set[str] = set()
    for node in cls.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return names


class Stubs:
    def __init__(self, folder: Path) -> None:
        init = parse_lenient((folder / "tensorrt" / "__init__.pyi").read_text())
        bindings = parse_lenient((folder / "tensorrt_bindings" / "tensorrt.pyi").read_text())
        self.top: set[str] = set()
        for node in init.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                self.top |= {(a.asname or a.name).split(".")[0] for a in node.names}
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                self.top.add(node.target.id)
            elif isinstance(node, ast.Assign):
                self.top |= {t.id for t in node.targets if isinstance(t, ast.Name)}
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                self.top.add(node.name)
        self.classes = {n.name: n for n in bindings.body if isinstance(n, ast.ClassDef)}
        self.version = next((n.value.value for n in init.body if isinstance(n, ast.AnnAssign)
                             and getattr(n.target, "id", "") == "__version__" and isinstance(n.value, ast.Constant)), "?")

    def has(self, cls: str, member: str) -> bool:
        """``member`` defined on ``cls`` or one of its base classes."""
        seen, todo = set(), [cls]
        while todo:
            name = todo.pop()
            node = self.classes.get(name)
            if node is None or name in seen:
                continue
            seen.add(name)
            if member in _members(node):
                return True
            todo += [b.id for b in node.bases if isinstance(b, ast.Name)]
        return False


@pytest.fixture(scope="module")
def stubs() -> Stubs:
    folder = _stub_dir()
    if folder is None:
        message = "tensorrt-stubs are not installed (pip install tensorrt-stubs --no-deps)"
        if os.environ.get("CI"):  # CI installs them: a silent skip there would hide the whole check
            pytest.fail(message)
        pytest.skip(message)
    return Stubs(folder)


# ---------------------------------------------------------------- source analysis
def _chain(node: ast.AST) -> list[str] | None:
    """``trt.A.B`` -> ["A", "B"]; None when the chain is not rooted at the name ``trt``."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return parts[::-1] if isinstance(node, ast.Name) and node.id == "trt" else None


def _imported_names(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def analyse(source: str) -> tuple[set[tuple[str, ...]], set[str]]:
    """(``trt.`` chains, attributes used on any other object except modules and ``self``)."""
    tree = ast.parse(source)
    modules = _imported_names(tree)
    chains: set[tuple[str, ...]] = set()
    used: set[str] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        chain = _chain(node)
        if chain is not None:
            chains.add(tuple(chain[:2]))
        elif isinstance(node.value, ast.Name) and node.value.id in modules | {"self", "cls"}:
            continue  # module functions and own attributes
        elif node.attr.startswith("__") and node.attr.endswith("__"):
            continue
        else:
            used.add(node.attr)
    return chains, used


def forbidden_uses(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        names = []
        if isinstance(node, ast.Attribute):
            names.append(node.attr)
        elif isinstance(node, ast.Name):
            names.append(node.id)
        elif isinstance(node, ast.keyword) and node.arg:
            names.append(node.arg)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            modules += [f"{node.module}.{a.name}" for a in node.names] if isinstance(node, ast.ImportFrom) else []
            found += [m for m in modules if any(m == f or m.startswith(f + ".") or m.endswith("." + f) for f in FORBIDDEN_MODULES)]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if re.fullmatch(r"pycuda(\.\w+)*|cuda\.cudart", node.value):  # importlib.import_module("pycuda...")
                found.append(node.value)
        if isinstance(node, ast.Attribute) and node.attr in FORBIDDEN_ATTRS:
            found.append(node.attr)
        found += [n for n in names if any(p.search(n) for p in FORBIDDEN_PATTERNS)]
    return sorted(set(found))


def problems(source: str, stubs: Stubs) -> list[str]:
    """Everything wrong with ``source``'s use of TensorRT; empty when it is clean."""
    chains, used = analyse(source)
    out = []
    for chain in sorted(chains):
        if chain[0] not in stubs.top:
            out.append(f"trt.{chain[0]} is not in the TensorRT {stubs.version} stubs")
        elif len(chain) > 1 and chain[0] in stubs.classes and not stubs.has(chain[0], chain[1]):
            out.append(f"trt.{chain[0]}.{chain[1]} is not in the TensorRT {stubs.version} stubs")
    for attr in sorted(used):
        if attr in TRT_METHODS:
            for cls in TRT_METHODS[attr].split():
                if not stubs.has(cls, attr):
                    out.append(f"{cls}.{attr} is not in the TensorRT {stubs.version} stubs")
        elif attr not in NOT_TRT:
            out.append(f".{attr} is unclassified: add it to TRT_METHODS (with its stub class) or NOT_TRT")
    out += [f"forbidden: {name}" for name in forbidden_uses(source)]
    return out


def _removed_in_11(node: ast.AST) -> set[str]:
    found = set()
    for sub in ast.walk(node):
        chain = _chain(sub) if isinstance(sub, ast.Attribute) else None
        if chain and chain[0] == "BuilderFlag" and len(chain) > 1 and chain[1] in TRT11_REMOVED_FLAGS:
            found.add(f"BuilderFlag.{chain[1]}")
        if isinstance(sub, ast.Attribute) and (sub.attr in TRT11_REMOVED_ATTRS or TRT11_REMOVED_NAMES.match(sub.attr)):
            found.add(sub.attr)
        if isinstance(sub, ast.Name) and TRT11_REMOVED_NAMES.match(sub.id):
            found.add(sub.id)
    return found


def _guarded(call: ast.Call, parents: dict[ast.AST, ast.AST]) -> bool:
    """``call`` sits in the body of ``if not X:`` where X = typing_mode(...) in the same function."""
    node: ast.AST = call
    while node in parents:
        parent = parents[node]
        if (isinstance(parent, ast.If) and node in parent.body and isinstance(parent.test, ast.UnaryOp)
                and isinstance(parent.test.op, ast.Not) and isinstance(parent.test.operand, ast.Name)):
            name, function = parent.test.operand.id, parent
            while function in parents and not isinstance(function, ast.FunctionDef):
                function = parents[function]
            return any(isinstance(a, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in a.targets)
                       and isinstance(a.value, ast.Call) and getattr(a.value.func, "id", "") == "typing_mode"
                       for a in ast.walk(function))
        node = parent
    return False


def trt11_problems(source: str) -> list[str]:
    """Every use of a name removed in TensorRT 11 that the 11 path could reach."""
    tree = ast.parse(source)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    out = []
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    for fn in functions:
        if fn.name not in WEAK_TYPING_ONLY:
            direct = _removed_in_11(fn) - set().union(*(_removed_in_11(f) for f in ast.walk(fn)
                                                         if f is not fn and isinstance(f, ast.FunctionDef)
                                                         and f.name in WEAK_TYPING_ONLY))
            out += [f"{fn.name} uses {name}, removed in TensorRT 11" for name in sorted(direct)]
    top = [n for n in tree.body if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    top += [base for n in ast.walk(tree) if isinstance(n, ast.ClassDef) for base in n.bases]
    out += [f"module level uses {name}, removed in TensorRT 11" for n in top for name in sorted(_removed_in_11(n))]
    for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
        if getattr(call.func, "id", None) in WEAK_TYPING_ONLY and not _guarded(call, parents):
            out.append(f"{call.func.id} called outside `if not strong:` (strong = typing_mode(...))")
    return sorted(set(out))


# ---------------------------------------------------------------- tests
def test_no_name_removed_in_tensorrt11_on_the_11_path():
    assert trt11_problems(TRT_SOURCE.read_text()) == []
    # and the weak-typing function does use them (else this test would check nothing)
    tree = ast.parse(TRT_SOURCE.read_text())
    weak = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "_weak_precision_flags")
    assert _removed_in_11(weak) == {"BuilderFlag.FP16", "BuilderFlag.INT8"}


@pytest.mark.parametrize("snippet, expected", [
    ("def build(trt, config):\n    config.set_flag(trt.BuilderFlag.FP16)", "build uses BuilderFlag.FP16"),
    ("def build(trt, config):\n    config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)",
     "build uses BuilderFlag.OBEY_PRECISION_CONSTRAINTS"),
    ("def build(config, c):\n    config.int8_calibrator = c", "build uses int8_calibrator"),
    ("def ok(builder):\n    return builder.platform_has_fast_fp16", "ok uses platform_has_fast_fp16"),
    ("def ok(engine):\n    return engine.device_memory_size", "ok uses device_memory_size"),
    ("class S(trt.IAlgorithmSelector):\n    pass", "module level uses IAlgorithmSelector"),
    ("def build(trt, config):\n    _weak_precision_flags(trt, config, 'fp16')", "_weak_precision_flags called outside"),
    ("def build(trt, config, strong):\n    if not strong:\n        _weak_precision_flags(trt, config, 'fp16')",
     "_weak_precision_flags called outside"),  # strong does not come from typing_mode
])
def test_the_tensorrt11_checker_catches_mistakes(snippet, expected):
    assert any(p.startswith(expected) for p in trt11_problems(snippet)), trt11_problems(snippet)


def test_the_tensorrt11_checker_accepts_the_guarded_call():
    good = ("def build(trt, config):\n    strong = typing_mode(trt)\n    if not strong:\n"
            "        _weak_precision_flags(trt, config, 'fp16')\n")
    assert trt11_problems(good) == []


def test_trt_names_exist_in_the_stubs(stubs):
    assert problems(TRT_SOURCE.read_text(), stubs) == []


def test_table_is_in_use_and_matches_the_stubs(stubs):
    _, used = analyse(TRT_SOURCE.read_text())
    assert sorted(set(TRT_METHODS) - used) == [], "TRT_METHODS lists calls the backend no longer makes"
    for attr, classes in TRT_METHODS.items():
        for cls in classes.split():
            assert cls in stubs.classes, f"{cls} is not a TensorRT class"
            assert stubs.has(cls, attr), f"{cls}.{attr}"
    assert not (set(TRT_METHODS) & NOT_TRT)


def test_the_core_tensorrt10_calls_are_used():
    chains, used = analyse(TRT_SOURCE.read_text())
    for call in ("create_network", "parse_from_file", "num_errors", "get_error", "set_memory_pool_limit",
                 "create_timing_cache", "set_timing_cache", "get_timing_cache", "build_serialized_network",
                 "deserialize_cuda_engine", "num_io_tensors", "get_tensor_name", "get_tensor_mode",
                 "get_tensor_shape", "get_tensor_dtype", "set_input_shape", "set_tensor_address", "execute_async_v3"):
        assert call in used, call
    assert ("MemoryPoolType", "WORKSPACE") in chains and ("BuilderFlag", "FP16") in chains
    assert ("TensorIOMode", "INPUT") in chains and ("NetworkDefinitionCreationFlag", "STRONGLY_TYPED") in chains


@pytest.mark.parametrize("path", ENGINE_SOURCES, ids=lambda p: p.name)
def test_no_removed_api_calibrator_or_pycuda(path):
    assert forbidden_uses(path.read_text()) == []


@pytest.mark.parametrize(
    "snippet, expected",
    [
        ("context.execute_async_v2(bindings=[], stream_handle=0)", "forbidden: execute_async_v2"),
        ("context.execute_v2([])", "forbidden: execute_v2"),
        ("n = engine.num_bindings", "forbidden: num_bindings"),
        ("engine.get_binding_shape(0)", "forbidden: get_binding_shape"),
        ("builder.build_engine(network, config)", "forbidden: build_engine"),
        ("config.max_workspace_size = 1", "forbidden: max_workspace_size"),
        ("context.set_binding_shape(0, (1,))", "forbidden: set_binding_shape"),
        ("class C(trt.IInt8EntropyCalibrator2): pass", "forbidden: IInt8EntropyCalibrator2"),
        ("config.int8_calibrator = c", "forbidden: int8_calibrator"),
        ("import pycuda.driver as cuda", "forbidden: pycuda.driver"),
        ("from cuda import cudart", "forbidden: cuda.cudart"),
        ("m = importlib.import_module('pycuda.driver')", "forbidden: pycuda.driver"),
        ("context.execute(1, [])", "forbidden: execute"),
        ("engine.get_tensor_nmae(0)", ".get_tensor_nmae is unclassified"),
        ("x = trt.MemoryPoolType.WORKSPAC", "trt.MemoryPoolType.WORKSPAC is not in the TensorRT"),
        ("x = trt.OnnxParserr(n, l)", "trt.OnnxParserr is not in the TensorRT"),
    ],
)
def test_the_checker_catches_mistakes(stubs, snippet, expected):
    assert any(p.startswith(expected) for p in problems(snippet, stubs)), problems(snippet, stubs)


def test_stub_repair_keeps_members(stubs):
    assert stubs.has("INetworkDefinition", "add_scale_nd")  # one of the defs the repair rewrites
    assert stubs.has("Logger", "WARNING") and stubs.has("Logger", "log")  # inherited from ILogger


# ---------------------------------------------------------------- cuda-python and torch
def _rooted(source: str, roots: set[str]) -> set[tuple[str, ...]]:
    """Attribute chains rooted at a name in ``roots`` or at a ``_rt()`` call."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        parts: list[str] = []
        cur: ast.AST = node
        while isinstance(cur, ast.Attribute):
            parts.append(cur.attr)
            cur = cur.value
        rooted = (isinstance(cur, ast.Name) and cur.id in roots) or (
            isinstance(cur, ast.Call) and isinstance(cur.func, ast.Name) and cur.func.id == "_rt")
        if parts and rooted:
            found.add(tuple(parts[::-1]))
    return found


def _resolve(module: object, chain: tuple[str, ...]) -> bool:
    obj = module
    for part in chain:
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def test_cuda_runtime_names_exist_in_cuda_python():
    rt = pytest.importorskip("cuda.bindings.runtime", reason="cuda-python is not installed")
    chains = _rooted(CUDA_SOURCE.read_text(), {"rt"})
    assert ("cudaMemcpyAsync",) in chains and ("cudaMallocHost",) in chains
    missing = [".".join(c) for c in sorted(chains) if not _resolve(rt, c)]
    assert missing == []


def test_torch_names_exist():
    torch = pytest.importorskip("torch")
    chains = _rooted(TORCH_SOURCE.read_text(), {"torch"})
    assert ("cuda", "ExternalStream") in chains
    missing = [".".join(c) for c in sorted(chains) if not _resolve(torch, c)]
    assert missing == []
