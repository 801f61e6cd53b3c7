"""Safety audit: no pickle loading, no remote code by default, no eval/exec.

A static (AST) scan of every project source file, checked against planted examples so it is
known to catch what it claims, plus behavioural checks: a model folder that offers only a
pickled ``pytorch_model.bin``, or remote code, is refused without running anything from it.
"""

from __future__ import annotations

import ast
import json
import pickle
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("advisor", "cli", "flax_lora", "benchmarks", "examples")

PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "joblib", "shelve", "marshal"}
PICKLE_CALLS = {"pickle.load", "pickle.loads", "pickle.Unpickler", "cloudpickle.load", "cloudpickle.loads",
                "dill.load", "dill.loads", "joblib.load", "pd.read_pickle", "pandas.read_pickle",
                "shelve.open", "marshal.load", "marshal.loads", "Unpickler"}


def _name(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    return ""


def _kw(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def _is_const(node, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def audit_source(text: str, where: str = "<src>") -> list[str]:
    """Unsafe patterns in one Python source, as 'where:line: what' strings."""
    problems = []
    for node in ast.walk(ast.parse(text)):
        line = f"{where}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            problems += [f"{line}: imports {a.name}" for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES:
            problems.append(f"{line}: imports from {node.module}")
        elif isinstance(node, ast.Call):
            name = _name(node.func)
            short = ".".join(name.split(".")[-2:])
            if name in PICKLE_CALLS or short in PICKLE_CALLS:
                problems.append(f"{line}: {name}() unpickles")
            if short == "torch.load" and not _is_const(_kw(node, "weights_only"), True):
                problems.append(f"{line}: torch.load without weights_only=True")
            if name.split(".")[-1] == "load" and name.split(".")[0] in ("np", "numpy") \
                    and _kw(node, "allow_pickle") is not None and not _is_const(_kw(node, "allow_pickle"), False):
                problems.append(f"{line}: numpy load with allow_pickle")
            if name in ("eval", "exec"):
                problems.append(f"{line}: {name}() of a string")
            if short in ("yaml.load", "yaml.load_all") and _kw(node, "Loader") is None:
                problems.append(f"{line}: yaml.load without a safe Loader")
            remote = _kw(node, "trust_remote_code")
            if remote is not None and not _is_const(remote, False) and not isinstance(remote, ast.Name):
                problems.append(f"{line}: trust_remote_code={ast.unparse(remote)}")
            if _is_const(_kw(node, "from_pt"), True):
                problems.append(f"{line}: from_pt=True (transformers unpickles pytorch_model.bin)")
            # click: an option --trust-remote-code must default to off.
            if name.endswith("option") and any(isinstance(a, ast.Constant) and "remote" in str(a.value)
                                               for a in node.args):
                default = _kw(node, "default")
                if default is not None and not _is_const(default, False):
                    problems.append(f"{line}: a remote-code option that defaults to on")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            positional = args.posonlyargs + args.args
            pairs = list(zip(positional[len(positional) - len(args.defaults):], args.defaults))
            pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
            for arg, default in pairs:
                if arg.arg == "trust_remote_code" and not _is_const(default, False):
                    problems.append(f"{line}: {node.name}(trust_remote_code=...) defaults to on")
    return problems


def project_sources() -> list[Path]:
    files = [p for pkg in PACKAGES if (ROOT / pkg).is_dir() for p in (ROOT / pkg).rglob("*.py")]
    return sorted(p for p in files if ".venv" not in p.parts)


def test_audit_catches_what_it_claims():
    planted = """
import pickle
from dill import loads
import torch, numpy as np, yaml
from transformers import AutoModel
torch.load("m.bin")
torch.load("m.bin", weights_only=False)
np.load("x.npy", allow_pickle=True)
AutoModel.from_pretrained("x", trust_remote_code=True)
FlaxAutoModel.from_pretrained("x", from_pt=True)
eval("1 + 1")
yaml.load(open("c.yaml"))
def load(path, trust_remote_code=True): ...
def load2(path, *, trust_remote_code=None): ...
"""
    found = audit_source(planted)
    for needle in ("imports pickle", "imports from dill", "torch.load without weights_only", "allow_pickle",
                   "trust_remote_code=True", "from_pt=True", "eval()", "yaml.load", "load(trust_remote_code",
                   "load2(trust_remote_code"):
        assert any(needle in p for p in found), (needle, found)
    assert sum("torch.load" in p for p in found) == 2
    safe = """
import torch, numpy as np, yaml
torch.load("m.pt", weights_only=True)
np.load("x.npy")
np.load("x.npy", allow_pickle=False)
AutoModel.from_pretrained("x", trust_remote_code=False)
AutoModel.from_pretrained("x", trust_remote_code=trust_remote_code)
yaml.load(f, Loader=yaml.SafeLoader)
def load(path, trust_remote_code=False): ...
"""
    assert audit_source(safe) == []


def test_project_sources_are_clean():
    files = project_sources()
    assert len(files) > 10 and any(p.name == "diagnose.py" for p in files)
    problems = [p for f in files for p in audit_source(f.read_text(encoding="utf-8"), str(f.relative_to(ROOT)))]
    assert problems == []


# ----------------------------------------------------------------------------- behaviour


class _Trap:
    """Unpickling this writes a marker file: proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pickle was loaded"))


def _gpt2_config() -> dict:
    return {"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 8, "vocab_size": 64, "n_positions": 32,
            "architectures": ["GPT2LMHeadModel"]}


def test_a_pickled_checkpoint_is_refused_not_loaded(tmp_path):
    from flax_lora.errors import UserError
    from flax_lora.models import load_model

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(_gpt2_config()))
    marker = tmp_path / "PWNED"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(marker)))
    with pytest.raises(UserError, match="safetensors"):
        load_model(str(folder))
    assert not marker.exists()


def test_remote_code_is_not_trusted(tmp_path):
    from flax_lora.errors import UserError
    from flax_lora.models import load_model

    folder = tmp_path / "model"
    folder.mkdir()
    marker = tmp_path / "PWNED"
    (folder / "config.json").write_text(json.dumps({
        "model_type": "evil", "architectures": ["EvilForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig",
                     "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}}))
    code = f"from pathlib import Path\nPath({str(marker)!r}).write_text('remote code ran')\n"
    (folder / "configuration_evil.py").write_text(code)
    (folder / "modeling_evil.py").write_text(code)
    with pytest.raises(UserError):
        load_model(str(folder))
    assert not marker.exists()
