"""The layout's rules, checked: no import circles, the advisor never imports the heavy stack, no
function past 100 lines, and the constants the advisor mirrors from the backend agree with it."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from tests.helpers import ROOT

PACKAGES = ("advisor", "flax_lora", "cli")


def _modules() -> dict[str, ast.Module]:
    mods = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            parts = f.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            mods[name] = ast.parse(f.read_text(), str(f))
    return mods


def _imports(name: str, tree: ast.Module, mods) -> set[str]:
    """The project modules ``name`` imports (anywhere in the file), as their closest module."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for n in names:
            while n and n not in mods:
                n = n.rpartition(".")[0]
            # a module reaching its own package's __init__ is not a circle
            if n and n != name and not name.startswith(n + "."):
                out.add(n)
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_circles():
    mods = _modules()
    graph = {m: _imports(m, t, mods) for m, t in mods.items()}
    assert _cycles(graph) == []
    assert not any(d.startswith(("flax_lora", "cli")) for m, deps in graph.items() if m.startswith("advisor")
                   for d in deps), "the advisor is the base layer: it imports neither the backend nor the CLI"


def test_no_function_longer_than_100_lines():
    long = [f"{m}:{node.name} ({node.end_lineno - node.lineno + 1} lines)" for m, tree in _modules().items()
            for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > 100]
    assert long == []


def test_lora_advise_never_imports_the_heavy_stack():
    code = ("import sys; from cli.main import main; sys.argv = ['lora', 'advise', '--samples', '100', '--vram', '8'];\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('jax', 'flax', 'transformers', 'torch', 'datasets', 'optax') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_constants_the_advisor_mirrors_agree_with_the_backend():
    from advisor import catalog, memory
    from flax_lora.models import decoder, hf, registry
    from flax_lora.training import losses

    assert set(memory.PORT_TYPES) == set(registry.PORT_TYPES) == set(memory.FUSED_LOSS_TYPES)
    assert set(registry.PORT_TYPES) == set(decoder.MODEL_TYPES) | {"gpt2"}
    assert memory.FUSED_CHUNK_BYTES == losses.TARGET_CHUNK_BYTES
    assert set(registry.REGISTRY) <= set(catalog.ARCHS), "every trainable family has advisor presets"
    assert set(hf.SUPPORTED) | set(registry.PORT_TYPES) == set(registry.REGISTRY)
    assert not set(hf.SUPPORTED) & set(registry.PORT_TYPES), "a ported family never takes the legacy path"


def test_no_transformers_model_class_outside_the_legacy_path():
    """The ports use transformers for configs and tokenizer conversion only: a model class (Flax,
    PyTorch) is imported by the legacy module alone (and the PyTorch benchmark baseline, which runs
    transformers' own LlamaForCausalLM on purpose), so the core install works with transformers 5."""
    import re

    pattern = re.compile(r"from transformers[\w.]* import [^\n]*(Flax|ForCausalLM|PreTrainedModel|AutoModel)")
    found = [str(p.relative_to(ROOT)) for pkg in ("flax_lora", "cli", "advisor") for p in (ROOT / pkg).rglob("*.py")
             if pattern.search(p.read_text())]
    assert sorted(found) == ["flax_lora/models/hf.py", "flax_lora/perf/torch_baseline.py"]


@pytest.mark.parametrize("head_dim", [32, 60, 64, 128, 256])
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_the_advisor_knows_when_the_port_uses_flash_attention(monkeypatch, head_dim, precision):
    import jax
    import jax.numpy as jnp

    from advisor import catalog, memory
    from flax_lora.models import decoder

    monkeypatch.delenv("LORA_ATTENTION", raising=False)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    shape = catalog.CATALOG["tinyllama-1.1b"].model_copy(update={"head_dim": head_dim})
    port = decoder._fused_attention({"bf16": jnp.bfloat16, "fp32": jnp.float32}[precision], head_dim)
    assert memory.fused_attention(shape, precision) == (port == "cudnn")
