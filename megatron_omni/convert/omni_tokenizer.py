"""The exported folder's tokenizer: the run's text tokenizer + the omni special tokens at their OmniVocab ids.

Source, first found: an HF tokenizer folder (--tokenizer-dir, or <checkpoint>/hf_source of a converted
checkpoint), else the run config's sentencepiece model (data.tokenizer_model), which transformers
converts.  Every id past the text vocabulary is added in OmniVocab order: the specials of
models/omni_vocab.py, then the audio codes <|a_0|> ...  A special the tokenizer already owns
(Llama-3's <|begin_of_text|> ...) keeps its native id (the data side uses it); its OmniVocab slot gets a
reserved name <|omni_reserved_i|>, so every later id still lands where the model expects it.
Needs transformers (the dev extra); without a source the folder has no tokenizer and the report says so.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from typing import Dict, Optional

import yaml

from megatron_omni.convert.errors import ConversionError
from megatron_omni.convert.hf_folder import TOKENIZER_FILES, write_json
from megatron_omni.convert.omni_hf_config import special_token_names
from megatron_omni.models.omni_vocab import OmniVocab

log = logging.getLogger("megatron_omni.convert")
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _sentencepiece_model(config_path: Optional[str]) -> Optional[str]:
    if not config_path or not os.path.isfile(config_path):
        return None
    with open(config_path) as f:
        data = (yaml.safe_load(f) or {}).get("data") or {}
    path = data.get("tokenizer_model")
    if data.get("tokenizer_type") != "sentencepiece" or not path:
        return None
    for candidate in (path, os.path.join(os.path.dirname(config_path), path), os.path.join(_REPO, path)):
        if os.path.isfile(candidate):
            return candidate
    return None


def _sentencepiece_whitespace(tok) -> None:
    """sentencepiece's own rule: every encode() call prepends one "▁" and turns each space into "▁".
    transformers' converted LlamaTokenizer (Metaspace, prepend_scheme "first") skips the prefix when the text
    already starts with a space, so " and" / "  two" tokenize differently from the data pipeline (which encodes
    the text between media spans and special tokens as separate pieces); a Prepend + Replace normalizer is
    sentencepiece's rule exactly (tests/convert: HF encode == sentencepiece encode on such pieces)."""
    from tokenizers import normalizers

    backend = tok.backend_tokenizer
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    backend.pre_tokenizer = None


def _load_tokenizer_json_verbatim(out: str) -> None:
    """LlamaTokenizer rebuilds its normalizer / pre-tokenizer on load; the generic tokenizers backend loads
    tokenizer.json as written, keeping `_sentencepiece_whitespace`'s pipeline."""
    path = os.path.join(out, "tokenizer_config.json")
    with open(path) as f:
        config = json.load(f)
    config["tokenizer_class"] = "TokenizersBackend"
    write_json(path, config)


def write_omni_tokenizer(out: str, vocab: OmniVocab, source_dir: Optional[str],
                         config_path: Optional[str]) -> Dict[str, object]:
    """Save the omni tokenizer into `out`; returns what was done (for the conversion report)."""
    has_hf = source_dir and any(os.path.isfile(os.path.join(source_dir, f)) for f in TOKENIZER_FILES)
    spm = None if has_hf else _sentencepiece_model(config_path)
    if not has_hf and spm is None:
        log.warning("no tokenizer source (pass --tokenizer-dir): the folder has no tokenizer")
        return {"written": False, "reason": "no --tokenizer-dir, hf_source or sentencepiece data.tokenizer_model"}
    from transformers import AddedToken, AutoTokenizer, LlamaTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        if spm is not None:  # transformers converts a folder holding only tokenizer.model
            shutil.copy2(spm, os.path.join(tmp, "tokenizer.model"))
            tok = LlamaTokenizer.from_pretrained(tmp)
            _sentencepiece_whitespace(tok)
        else:
            tok = AutoTokenizer.from_pretrained(source_dir)
    source = spm or source_dir
    n = len(tok)
    if n > vocab.text_vocab_size:
        raise ConversionError(f"tokenizer {source}", {"shape mismatches": [
            f"{n} tokens > model.vocab_size={vocab.text_vocab_size}: the omni ids would collide"]})
    fill = [f"<|omni_text_unused_{i}|>" for i in range(n, vocab.text_vocab_size)]
    existing = tok.get_vocab()
    names = special_token_names(vocab)
    added = [name if name not in existing else f"<|omni_reserved_{i}|>" for i, name in enumerate(names)]
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in fill + added], special_tokens=True)
    ids = tok.convert_tokens_to_ids(added)
    wrong = [f"{t}: {i} != {vocab.text_vocab_size + k}" for k, (t, i) in enumerate(zip(added, ids))
             if i != vocab.text_vocab_size + k]
    if wrong or len(tok) != vocab.size:
        raise ConversionError(f"tokenizer {source}", {"shape mismatches": wrong[:5] + [
            f"{len(tok)} tokens after adding the omni ones, the model has {vocab.size}"]})
    tok.save_pretrained(out)
    if spm is not None:
        _load_tokenizer_json_verbatim(out)
    return {"written": True, "source": os.path.abspath(source), "text_tokens": n, "unused_text_slots": len(fill),
            "native_specials": [name for name in names if name in existing], "total": len(tok)}
