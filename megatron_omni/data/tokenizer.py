"""Text tokenizers for the data pipeline, built on megatron-core's own tokenizer classes.

Both implementations subclass `megatron.core.tokenizers.text.MegatronTokenizerText`, so
they are the `MegatronTokenizerBase` that `GPTDatasetConfig.tokenizer` expects and that
megatron's inference/export code understands; this module only adds what megatron-core
lacks for our use:

* a content-based `unique_identifiers` (model file SHA-1 instead of its path) - GPTDataset
  hashes it into its index cache names, so a moved checkout still hits the cache;
* pickling by model path, so `preprocess` worker processes can rebuild the tokenizer;
* errors that name the file and the fix instead of a sentencepiece C++ message.

Special ids follow megatron: `eod` ends every document in the token stream (sentencepiece
`</s>`); `pad` and `bos` are -1 when the vocabulary has none (-1 never occurs in data).

The omni data pipeline (chat template) uses the smaller `ChatTokenizer` interface, which both
the sentencepiece tokenizer and `Llama3Tokenizer` (data/llama3_tokenizer.py) implement.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import List, Optional, Protocol, Sequence, runtime_checkable

from megatron.core.tokenizers.text.text_tokenizer import MegatronTokenizerText

from megatron_omni.config.schema import DataConfig
from megatron_omni.data.fingerprint import file_sha1
from megatron_omni.data.llama3_tokenizer import Llama3Tokenizer

__all__ = ["ChatTokenizer", "TextTokenizer", "SentencePieceTokenizer", "NullTokenizer", "Llama3Tokenizer",
           "build_tokenizer"]


@runtime_checkable
class TextTokenizer(Protocol):
    """What the data pipeline (and megatron-core's GPTDataset) needs from a tokenizer."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def eod(self) -> int: ...

    @property
    def pad(self) -> int: ...

    @property
    def bos(self) -> int: ...

    @property
    def unique_identifiers(self) -> "OrderedDict[str, object]": ...

    def tokenize(self, text: str) -> List[int]: ...

    def detokenize(self, ids: Sequence[int]) -> str: ...


@runtime_checkable
class ChatTokenizer(Protocol):
    """What the chat template needs: plain-text encoding plus the ids of its header tokens.

    `encode` never parses special tokens out of text.  `special_id(name)` is the tokenizer's own
    id for a chat special (``<|start_header_id|>`` ...), or None when its vocabulary has none -
    the template then uses the `OmniVocab` slot appended after the text vocabulary.
    """

    @property
    def vocab_size(self) -> int: ...

    @property
    def bos_id(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    def encode(self, text: str) -> List[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def special_id(self, name: str) -> Optional[int]: ...


class SentencePieceTokenizer(MegatronTokenizerText):
    """A sentencepiece `.model` file, read through megatron-core's sentencepiece library."""

    def __init__(self, model_path: str) -> None:
        if not os.path.isfile(model_path):
            raise FileNotFoundError(
                f"{model_path}: sentencepiece model not found; set data.tokenizer_model to a "
                f".model file, or train one with tools/train_tokenizer.py"
            )
        self.model_path = os.path.abspath(model_path)
        self.model_sha1 = file_sha1(model_path)
        try:
            super().__init__(self.model_path, {"library": "sentencepiece"})
        except (RuntimeError, OSError) as err:
            raise ValueError(
                f"{model_path}: not a valid sentencepiece model ({err}); "
                f"point data.tokenizer_model at a .model file written by sentencepiece"
            ) from None
        if self.eod < 0:
            raise ValueError(
                f"{model_path}: the model has no end-of-sentence piece (eos_id=-1), which "
                f"megatron needs as the end-of-document token; retrain it with "
                f"tools/train_tokenizer.py (it keeps </s>)"
            )

    @property
    def unique_identifiers(self) -> "OrderedDict[str, object]":
        """Identity for megatron's dataset cache: the model's bytes, not its location."""
        return OrderedDict(class_name=type(self).__name__, model_sha1=self.model_sha1)

    def __reduce__(self):
        """Pickle as the model path (a SentencePieceProcessor does not pickle portably)."""
        return (type(self), (self.model_path,))

    # ChatTokenizer interface.  sentencepiece never matches control pieces (<s>, </s>) inside
    # text, so `encode` parses no specials, like Llama3Tokenizer.encode.  It does prepend its
    # dummy-prefix "▁" to every call, so each chat-template segment (header "\n\n", turn text)
    # starts like a new word; consistent in training and inference, one extra piece per segment.
    def encode(self, text: str) -> List[int]:
        return self.tokenize(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.detokenize(list(ids))

    def special_id(self, name: str) -> Optional[int]:
        """Chat specials are not sentencepiece pieces: always None (the OmniVocab ids are used)."""
        return None


class NullTokenizer(MegatronTokenizerText):
    """Text is whitespace-separated token ids; for synthetic data and benchmarks.

    `vocab_size` is the total number of ids, the last one (`vocab_size - 1`) being EOD, so a
    model with `model.vocab_size = V` can use `NullTokenizer(V)` (megatron's own null
    library counts EOD on top; we pass it `V - 1` to keep one meaning of vocab_size).
    """

    def __init__(self, vocab_size: int) -> None:
        if int(vocab_size) < 2:
            raise ValueError(f"NullTokenizer vocab_size must be >= 2 (ids + EOD), got {vocab_size}")
        super().__init__(None, {"library": "null"}, vocab_size=int(vocab_size) - 1)

    @property
    def unique_identifiers(self) -> "OrderedDict[str, object]":
        return OrderedDict(class_name=type(self).__name__, vocab_size=self.vocab_size)

    @property
    def pad(self) -> int:
        return -1

    @property
    def bos(self) -> int:
        return -1

    def tokenize(self, text: str) -> List[int]:
        """Parse `"12 7 300"`; any run of whitespace separates ids."""
        try:
            ids = [int(tok) for tok in text.split()]
        except ValueError:
            bad = next(tok for tok in text.split() if not tok.lstrip("-").isdigit())
            raise ValueError(
                f"null tokenizer: {bad!r} is not an integer; with tokenizer_type 'null' the "
                f"text must be whitespace-separated token ids"
            ) from None
        out_of_range = [i for i in ids if not 0 <= i < self.vocab_size]
        if out_of_range:
            raise ValueError(
                f"null tokenizer: id {out_of_range[0]} outside [0, {self.vocab_size}); raise "
                f"the vocab size or fix the data"
            )
        return ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return " ".join(str(int(i)) for i in ids)

    def __reduce__(self):
        return (type(self), (self.vocab_size,))


def build_tokenizer(data_cfg: DataConfig, *, vocab_size: Optional[int] = None):
    """The tokenizer named by `data_cfg.tokenizer_type` (huggingface = Llama-3 tokenizer files).

    `vocab_size` is only used by the `null` tokenizer, which has no model file to take it
    from (pass `model.vocab_size`).
    """
    kind = data_cfg.tokenizer_type
    if kind == "sentencepiece":
        if not data_cfg.tokenizer_model:
            raise ValueError(
                "data.tokenizer_model is not set; tokenizer_type 'sentencepiece' needs a .model "
                "file (the bundled demo one is megatron_omni/assets/demo_text/tokenizer.model)"
            )
        return SentencePieceTokenizer(data_cfg.tokenizer_model)
    if kind == "null":
        if vocab_size is None:
            raise ValueError(
                "tokenizer_type 'null' needs a vocabulary size: call "
                "build_tokenizer(data_cfg, vocab_size=model.vocab_size)"
            )
        return NullTokenizer(vocab_size)
    if kind == "huggingface":
        if not data_cfg.tokenizer_model:
            raise ValueError(
                "data.tokenizer_model is not set; tokenizer_type 'huggingface' reads the Llama-3 "
                "tokenizer from a tokenizer.json, a tiktoken tokenizer.model or their folder"
            )
        return Llama3Tokenizer(data_cfg.tokenizer_model)
    raise ValueError(
        f"data.tokenizer_type {kind!r} is unknown; use 'sentencepiece', 'null' or 'huggingface'"
    )
