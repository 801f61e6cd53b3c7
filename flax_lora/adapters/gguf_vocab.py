"""The tokenizer part of a GGUF file, as llama.cpp's ``convert_hf_to_gguf.py`` writes it.

Two kinds, chosen from the tokenizer files the way the converter chooses:

* ``gpt2`` (byte-level BPE: Llama 3, Qwen 2/2.5/3, SmolLM, OLMo 2, Phi-4-mini), from
  ``tokenizer.json``: ``tokenizer.ggml.tokens`` (every id below the model's vocab_size, holes as
  ``[PAD<i>]``), ``token_type`` (normal; added tokens control when special or special-looking,
  else user-defined), ``merges``, ``pre`` (the pre-tokenizer llama.cpp must use, see
  :func:`pre_tokenizer`), the special ids, ``add_bos_token`` and the chat template.
* ``llama`` (SentencePiece: Llama 2, Mistral, TinyLlama, Gemma), from ``tokenizer.model`` through
  the ``sentencepiece`` package (scores and byte tokens), else from a byte-fallback
  ``tokenizer.json`` through gguf's ``LlamaHfVocab`` (the converter's own fallback).

Special ids, ``add_*_token``, merges and the chat template come from gguf's ``SpecialVocab``, the
converter's reader of ``tokenizer.json`` / ``tokenizer_config.json`` / ``config.json``.
"""

from __future__ import annotations

import json
from hashlib import sha256
from pathlib import Path

from flax_lora.errors import UserError

# The converter's probe text: how a BPE tokenizer splits it identifies its pre-tokenizer.
CHKTXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ '
          '🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
          '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, '
          '\'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')

# sha256 of str(ids of CHKTXT) -> llama.cpp pre-tokenizer, for the tokenizers of the families
# exported here (values from convert_hf_to_gguf's get_vocab_base_pre).
KNOWN_PRE = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",  # Llama 3 finetunes
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen 1.5 / 2 / 2.5 / 3
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen 3 (embedding)
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "a8594e3edff7c29c003940395316294b2c623e09894deebbc65f33f1515df79e": "dbrx",  # OLMo 2 (cl100k)
    "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e": "gpt-4o",  # Phi-4-mini
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}
# A tokenizer of a known layout whose vocabulary is its own (a tokenizer trained from scratch):
# the Split regex in tokenizer.json -> the pre-tokenizer whose regex llama.cpp applies.
REGEX_PRE = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
}
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # gguf.TokenType


def tokenizer_folder(*candidates: Path) -> Path:
    """The first folder holding ``tokenizer.json`` or ``tokenizer.model`` (a run's own tokenizer
    before the base model's), else a UserError: llama.cpp needs the vocabulary in the file."""
    for folder in candidates:
        if (folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file():
            return folder
    raise UserError(f"no tokenizer.json or tokenizer.model in {', '.join(str(c) for c in candidates)}: "
                    "a GGUF file carries the tokenizer, so one is needed")


def add_vocab(writer, folder: Path, vocab_size: int, spm_first: bool = True) -> str:
    """Write the tokenizer of ``folder`` into ``writer``; returns ``tokenizer.ggml.model``.

    ``spm_first``: try SentencePiece (``tokenizer.model``) before byte-level BPE, as the converter
    does for Llama/Mistral/Qwen 2 (Qwen 3 and the rest have no ``tokenizer.model``).
    """
    import gguf

    if spm_first and (folder / "tokenizer.model").is_file():
        tokens, scores, types = _spm_tokens(folder, vocab_size)
        model, pre, merges = "llama", "default", False
    elif _byte_level_bpe(folder):
        tokens, types, pre = _bpe_tokens(folder, vocab_size)
        scores, model, merges = None, "gpt2", True
    elif _byte_fallback_bpe(folder):  # SentencePiece-style BPE in tokenizer.json alone
        vocab = gguf.LlamaHfVocab(folder)
        tokens, scores, types = (list(x) for x in zip(*vocab.all_tokens()))
        model, pre, merges = "llama", "default", False
    else:
        raise UserError(f"{folder}: tokenizer is neither byte-level BPE (tokenizer.json) nor SentencePiece "
                        "(tokenizer.model); llama.cpp's converter cannot carry it either")
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    if scores is not None:
        writer.add_token_scores(scores)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=merges, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)
    return model


def _tokenizer_json(folder: Path) -> dict | None:
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None


def _byte_level_bpe(folder: Path) -> bool:
    tj = _tokenizer_json(folder)
    return bool(tj) and tj["model"].get("type") == "BPE" and not tj["model"].get("byte_fallback", False) \
        and (tj.get("decoder") or {}).get("type") == "ByteLevel"


def _byte_fallback_bpe(folder: Path) -> bool:
    tj = _tokenizer_json(folder)
    return bool(tj) and tj["model"].get("type") == "BPE" and bool(tj["model"].get("byte_fallback", False))


def looks_special(token: str) -> bool:
    """Added tokens some models forget to mark special (the converter's list): ``<|...|>``,
    ``<｜...｜>``, ``<unused..>``, ``<pad>``, ``<mask>``, ``<2mass>``, ``[@BOS@]``."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>"))
            or (token.startswith("<unused") and token.endswith(">")))


def _bpe_tokens(folder: Path, vocab_size: int) -> tuple[list[str], list[int], str]:
    """(tokens, token types, pre-tokenizer) of a byte-level BPE ``tokenizer.json``."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    vocab = tok.get_vocab(with_added_tokens=True)
    if vocab and max(vocab.values()) >= vocab_size:
        raise UserError(f"{folder}: the tokenizer has id {max(vocab.values())}, the model's vocab_size is {vocab_size}")
    by_id = {i: t for t, i in vocab.items()}
    added = tok.get_added_tokens_decoder()  # id -> AddedToken
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        token = by_id[i]
        if i in added:
            if not added[i].normalized:  # llama.cpp expects added tokens pre-normalized
                token = tok.decode(tok.encode(token, add_special_tokens=False).ids, skip_special_tokens=False)
            if added[i].special or looks_special(token):
                types.append(CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(USER_DEFINED)
        else:
            types.append(NORMAL)
        tokens.append(token)
    return tokens, types, pre_tokenizer(tok, _tokenizer_json(folder))


def pre_tokenizer(tok, tokenizer_json: dict) -> str:
    """``tokenizer.ggml.pre``: the converter's way (the hash of how the tokenizer splits
    :data:`CHKTXT`) for the released tokenizers; for one with its own vocabulary, the layout of its
    pre-tokenizer (GPT-2's byte-level regex -> ``gpt-2``; Llama 3's or Qwen 2's Split regex)."""
    chkhsh = sha256(str(tok.encode(CHKTXT).ids).encode()).hexdigest()
    if chkhsh in KNOWN_PRE:
        return KNOWN_PRE[chkhsh]
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if (len(parts) == 2 and parts[0].get("type") == "Split" and parts[1].get("type") == "ByteLevel"
            and not parts[1].get("use_regex", True)):
        regex = (parts[0].get("pattern") or {}).get("Regex")
        if regex in REGEX_PRE:
            return REGEX_PRE[regex]
    raise UserError("the tokenizer's pre-tokenizer is not one llama.cpp knows (neither a released tokenizer of "
                    "Llama 3, Qwen 2/3, SmolLM, OLMo 2, Phi-4 nor GPT-2's, Llama 3's or Qwen 2's split rule); "
                    "llama.cpp's converter refuses it too")


def _spm_tokens(folder: Path, vocab_size: int) -> tuple[list[bytes], list[float], list[int]]:
    """(tokens, scores, types) of ``tokenizer.model``, padded to ``vocab_size``, with the added
    tokens of ``added_tokens.json`` and ``tokenizer_config.json`` laid over it."""
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError:
        raise UserError(f"{folder / 'tokenizer.model'} is a SentencePiece tokenizer: "
                        "`pip install sentencepiece` to export it to GGUF") from None
    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(folder / "tokenizer.model"))
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores, types = [-10000.0] * vocab_size, [UNUSED] * vocab_size
    for i in range(min(sp.vocab_size(), vocab_size)):
        kind = (UNKNOWN if sp.IsUnknown(i) else CONTROL if sp.IsControl(i) else UNUSED if sp.IsUnused(i)
                else BYTE if sp.IsByte(i) else NORMAL)
        tokens[i], scores[i], types[i] = sp.IdToPiece(i).encode("utf-8"), sp.GetScore(i), kind
    for token, i in _json(folder / "added_tokens.json").items():
        if i < vocab_size:
            tokens[i], scores[i], types[i] = token.encode("utf-8"), -1000.0, USER_DEFINED
    for i, data in _json(folder / "tokenizer_config.json").get("added_tokens_decoder", {}).items():
        i, token = int(i), data["content"]
        if i >= vocab_size:
            continue
        special = data.get("special") or looks_special(token)
        token = token if special else token.replace("\u2581", " ")
        tokens[i], scores[i], types[i] = token.encode("utf-8"), -1000.0, CONTROL if special else USER_DEFINED
    return tokens, scores, types


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
