"""The Llama-3 tokenizer from a user's local files, without `tokenizers` / `tiktoken`.

Llama-3 is a byte-level BPE (GPT-4 style): text is split into pre-tokens by one regular
expression, every pre-token's UTF-8 bytes are merged pairwise by rank, and 256 special tokens
follow the 128,000 regular ones.  Two file formats carry the same model:

* ``tokenizer.json`` (Hugging Face): ``model.vocab`` (byte-level unicode strings -> id),
  ``model.merges`` (ordered pairs), ``added_tokens`` (the specials with their ids);
* ``tokenizer.model`` (tiktoken, Meta's original release): ``base64(token bytes) rank`` per line;
  the specials are not in the file - they follow the last rank, in Meta's fixed order.

Both load into one `ByteLevelBPE` (token bytes -> id, pair -> merge rank).  Python's `re` has no
``\\p{L}`` / ``\\p{N}``, so the pre-tokenizer pattern is rebuilt with explicit character classes
computed from `unicodedata` (letters = categories L*, numbers = N*, whitespace = the Unicode
White_Space property, which is what Oniguruma's / Rust's ``\\s`` mean - Python's ``\\s`` differs
on U+001C..U+001F).  The tests check token-for-token equality with HF `tokenizers`.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import re
import sys
import unicodedata
from collections import OrderedDict
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from megatron_omni.data.fingerprint import file_sha1

__all__ = ["ByteLevelBPE", "Llama3Tokenizer", "LLAMA3_SPLIT_PATTERN", "llama3_special_tokens", "pretokenize"]

# The Llama-3 pre-tokenizer (tokenizer.json `pre_tokenizer.pretokenizers[0].pattern.Regex`,
# = tiktoken's cl100k pattern with digits in runs of at most 3).
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Unicode White_Space property (PropList.txt); the meaning of \s in Oniguruma and Rust regex.
_WHITE_SPACE = (
    [(0x09, 0x0D), (0x20, 0x20), (0x85, 0x85), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A),
     (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000)]
)


def _class_body(ranges: Iterable[Tuple[int, int]]) -> str:
    """Ranges of code points as the inside of a `re` character class (escaped)."""
    parts = []
    for lo, hi in ranges:
        parts.append(f"\\U{lo:08x}" if lo == hi else f"\\U{lo:08x}-\\U{hi:08x}")
    return "".join(parts)


def _category_ranges(prefix: str) -> List[Tuple[int, int]]:
    """Maximal code point ranges whose general category starts with `prefix` ('L' or 'N')."""
    ranges: List[Tuple[int, int]] = []
    start = None
    for cp in range(sys.maxunicode + 2):
        hit = cp <= sys.maxunicode and unicodedata.category(chr(cp)).startswith(prefix)
        if hit and start is None:
            start = cp
        elif not hit and start is not None:
            ranges.append((start, cp - 1))
            start = None
    return ranges


@functools.lru_cache(maxsize=1)
def _split_regex() -> "re.Pattern[str]":
    """LLAMA3_SPLIT_PATTERN compiled for Python `re` (built once, ~0.5 s: scans all code points)."""
    letters = _class_body(_category_ranges("L"))
    numbers = _class_body(_category_ranges("N"))
    space = _class_body(_WHITE_SPACE)
    pattern = (
        LLAMA3_SPLIT_PATTERN.replace(r"[^\s\p{L}\p{N}]", f"[^{space}{letters}{numbers}]")
        .replace(r"[^\r\n\p{L}\p{N}]", f"[^\\r\\n{letters}{numbers}]")
        .replace(r"\p{L}", f"[{letters}]")
        .replace(r"\p{N}", f"[{numbers}]")
        .replace(r"(?!\S)", f"(?![^{space}])")
        .replace(r"\s", f"[{space}]")
    )
    return re.compile(pattern)


def pretokenize(text: str) -> List[str]:
    """Split `text` into Llama-3 pre-tokens (the pieces BPE merges never cross)."""
    return _split_regex().findall(text)


@functools.lru_cache(maxsize=1)
def _byte_to_unicode() -> Dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level tokenizer.json vocabs.

    Printable Latin-1 bytes map to themselves; the other 68 bytes map to U+0100.. in byte order.
    """
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _unicode_to_bytes(token: str, *, where: str) -> bytes:
    inverse = {c: b for b, c in _byte_to_unicode().items()}
    try:
        return bytes(inverse[c] for c in token)
    except KeyError as err:
        raise ValueError(f"{where}: vocab entry {token!r} has character {err.args[0]!r} outside the "
                         f"byte-level alphabet; this is not a byte-level BPE tokenizer.json") from None


def llama3_special_tokens(num_reserved: int = 256) -> List[str]:
    """Meta's Llama-3 special tokens in id order (they follow the last BPE rank)."""
    named = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
             "<|reserved_special_token_1|>", "<|reserved_special_token_2|>",
             "<|reserved_special_token_3|>", "<|start_header_id|>", "<|end_header_id|>",
             "<|reserved_special_token_4|>", "<|eot_id|>"]
    return named + [f"<|reserved_special_token_{i}|>" for i in range(5, num_reserved - 5)]


class ByteLevelBPE:
    """Byte-level BPE: token bytes -> id, and the merge rank of each mergeable adjacent pair.

    ``merges`` None means tiktoken semantics: a pair may merge when its concatenation is a token,
    with the token's id as priority.  Words that are whole tokens are emitted directly
    (tiktoken; HF ``ignore_merges``, which Llama-3's tokenizer.json sets).
    """

    def __init__(self, vocab: Dict[bytes, int], merges: Optional[Dict[Tuple[bytes, bytes], int]] = None,
                 *, ignore_merges: bool = True) -> None:
        self.vocab = vocab
        self.merges = merges
        self.ignore_merges = ignore_merges
        self.id_to_bytes = {i: b for b, i in vocab.items()}
        missing = [bytes([b]) for b in range(256) if bytes([b]) not in vocab]
        if missing:
            raise ValueError(f"byte-level BPE vocab lacks {len(missing)} single-byte tokens (e.g. {missing[0]!r})")
        self._cache: Dict[str, Tuple[int, ...]] = {}

    def _rank(self, a: bytes, b: bytes) -> Optional[int]:
        if self.merges is not None:
            return self.merges.get((a, b))
        return self.vocab.get(a + b)

    def _merge(self, word: bytes) -> List[bytes]:
        parts = [word[i:i + 1] for i in range(len(word))]
        while len(parts) > 1:
            best, best_rank = None, None
            for i in range(len(parts) - 1):
                rank = self._rank(parts[i], parts[i + 1])
                if rank is not None and (best_rank is None or rank < best_rank):
                    best, best_rank = (parts[i], parts[i + 1]), rank
            if best is None:
                break
            # Merge every occurrence of the best pair, left to right: equivalent to one at a time,
            # because a merge never creates a pair that ranks before the one just merged.
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def encode_word(self, word: str) -> Tuple[int, ...]:
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        data = word.encode("utf-8")
        if self.ignore_merges and data in self.vocab:
            ids: Tuple[int, ...] = (self.vocab[data],)
        else:
            ids = tuple(self.vocab[p] for p in self._merge(data))
        if len(self._cache) < 200_000:
            self._cache[word] = ids
        return ids


class Llama3Tokenizer:
    """Llama-3 tokenizer (encode / decode / special ids) from tokenizer.json or tiktoken tokenizer.model.

    ``path`` is the file or a folder holding one of them (tokenizer.json preferred).  `encode`
    never turns text into special tokens (a user writing ``<|eot_id|>`` gets plain text tokens);
    chat specials come from `special_id`.
    """

    def __init__(self, path: str) -> None:
        file = self._find_file(path)
        self.model_path = os.path.abspath(file)
        self.model_sha1 = file_sha1(file)
        if file.endswith(".json"):
            self.bpe, self.special_tokens = self._load_tokenizer_json(file)
        else:
            self.bpe, self.special_tokens = self._load_tiktoken(file)
        self.id_to_special = {i: t for t, i in self.special_tokens.items()}
        self._vocab_size = 1 + max(max(self.bpe.id_to_bytes), max(self.id_to_special, default=-1))
        for name in ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"):
            if name not in self.special_tokens:
                raise ValueError(f"{file}: special token {name} not found; this is not a Llama-3 tokenizer")

    # -- loading --------------------------------------------------------------------------------

    @staticmethod
    def _find_file(path: str) -> str:
        if os.path.isdir(path):
            for name in ("tokenizer.json", "tokenizer.model", os.path.join("original", "tokenizer.model")):
                if os.path.isfile(os.path.join(path, name)):
                    return os.path.join(path, name)
            raise FileNotFoundError(f"{path}: no tokenizer.json or tokenizer.model in this folder; point "
                                    f"data.tokenizer_model at the Llama-3 checkpoint folder or one of those files")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: Llama-3 tokenizer file not found; set data.tokenizer_model to a "
                                    f"tokenizer.json or tiktoken tokenizer.model")
        return path

    @staticmethod
    def _load_tokenizer_json(file: str) -> Tuple[ByteLevelBPE, Dict[str, int]]:
        with open(file, encoding="utf-8") as f:
            spec = json.load(f)
        model = spec.get("model") or {}
        if model.get("type") != "BPE":
            raise ValueError(f"{file}: model.type is {model.get('type')!r}, expected 'BPE' (Llama-3 byte-level BPE)")
        pattern = _find_split_pattern(spec.get("pre_tokenizer"))
        if pattern != LLAMA3_SPLIT_PATTERN:
            raise ValueError(f"{file}: pre-tokenizer split pattern {pattern!r} is not Llama-3's; only the "
                             f"Llama-3 pattern is implemented")
        if spec.get("normalizer"):
            raise ValueError(f"{file}: has a normalizer ({spec['normalizer'].get('type')}); Llama-3 has none")
        vocab = {_unicode_to_bytes(tok, where=file): int(i) for tok, i in model["vocab"].items()}
        merges: Dict[Tuple[bytes, bytes], int] = {}
        for rank, merge in enumerate(model.get("merges", [])):
            a, b = merge.split(" ") if isinstance(merge, str) else merge
            merges[(_unicode_to_bytes(a, where=file), _unicode_to_bytes(b, where=file))] = rank
        specials = {t["content"]: int(t["id"]) for t in spec.get("added_tokens", [])}
        return ByteLevelBPE(vocab, merges, ignore_merges=bool(model.get("ignore_merges", False))), specials

    @staticmethod
    def _load_tiktoken(file: str) -> Tuple[ByteLevelBPE, Dict[str, int]]:
        vocab: Dict[bytes, int] = {}
        with open(file, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    token, rank = line.split()
                    vocab[base64.b64decode(token, validate=True)] = int(rank)
                except ValueError:
                    raise ValueError(f"{file}:{lineno}: expected 'base64-token rank' (tiktoken format); is this a "
                                     f"sentencepiece model? use tokenizer_type 'sentencepiece' for those") from None
        base = max(vocab.values()) + 1
        specials = {tok: base + i for i, tok in enumerate(llama3_special_tokens())}
        return ByteLevelBPE(vocab, None), specials

    # -- the unified tokenizer interface ---------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Text vocabulary size including the 256 specials (128,256 for Llama-3)."""
        return self._vocab_size

    def encode(self, text: str) -> List[int]:
        out: List[int] = []
        for word in pretokenize(text):
            out.extend(self.bpe.encode_word(word))
        return out

    def decode(self, ids: Sequence[int]) -> str:
        chunks = []
        for i in ids:
            i = int(i)
            if i in self.id_to_special:
                chunks.append(self.id_to_special[i].encode("utf-8"))
            elif i in self.bpe.id_to_bytes:
                chunks.append(self.bpe.id_to_bytes[i])
            else:
                raise ValueError(f"token id {i} is not in the Llama-3 vocabulary ({self.model_path})")
        return b"".join(chunks).decode("utf-8", errors="replace")

    def special_id(self, name: str) -> Optional[int]:
        """Native id of a special token (``<|eot_id|>`` ...), None if this vocabulary has none."""
        return self.special_tokens.get(name)

    @property
    def bos_id(self) -> int:
        return self.special_tokens["<|begin_of_text|>"]

    @property
    def eos_id(self) -> int:
        """End of document (``<|end_of_text|>``); chat turns end with ``<|eot_id|>``."""
        return self.special_tokens["<|end_of_text|>"]

    # -- megatron's text-tokenizer names (TextTokenizer protocol) ---------------------------------

    tokenize = encode
    detokenize = decode

    @property
    def eod(self) -> int:
        return self.eos_id

    @property
    def bos(self) -> int:
        return self.bos_id

    @property
    def pad(self) -> int:
        return -1

    @property
    def unique_identifiers(self) -> "OrderedDict[str, object]":
        return OrderedDict(class_name=type(self).__name__, model_sha1=self.model_sha1)

    def __reduce__(self):
        return (type(self), (self.model_path,))


def _find_split_pattern(pre_tokenizer: Optional[dict]) -> Optional[str]:
    """The Split regex of a tokenizer.json pre_tokenizer (Llama-3: Sequence[Split, ByteLevel])."""
    if not pre_tokenizer:
        return None
    if pre_tokenizer.get("type") == "Sequence":
        for sub in pre_tokenizer.get("pretokenizers", []):
            found = _find_split_pattern(sub)
            if found:
                return found
        return None
    if pre_tokenizer.get("type") == "Split":
        return (pre_tokenizer.get("pattern") or {}).get("Regex")
    return None
