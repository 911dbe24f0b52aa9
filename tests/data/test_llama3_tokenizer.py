"""Our byte-level BPE (Llama-3 format) against Hugging Face `tokenizers` on the same model.

A small BPE is trained with `tokenizers` using Llama-3's exact pre-tokenizer (Split on the Llama-3
regex + ByteLevel, ignore_merges) and Llama-3's 256 special tokens; it is saved both as
tokenizer.json and as a tiktoken-format file (base64 token bytes + rank, written with
transformers' byte map).  Both files must encode every test string exactly as `tokenizers` does.
"""

from __future__ import annotations

import base64
import json
import random

import pytest

from megatron_omni.config.schema import DataConfig
from megatron_omni.data.chat_template import ChatTemplate, Turn
from megatron_omni.data.llama3_tokenizer import LLAMA3_SPLIT_PATTERN, Llama3Tokenizer, llama3_special_tokens
from megatron_omni.data.tokenizer import ChatTokenizer, build_tokenizer
from megatron_omni.models.omni_vocab import OmniVocab

tokenizers = pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def hf_files(tmp_path_factory, demo_docs):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    hf = Tokenizer(models.BPE(ignore_merges=True))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1200, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    hf.train_from_iterator(demo_docs[:400] + _VARIED[:50], trainer)
    hf.add_special_tokens(llama3_special_tokens())
    folder = tmp_path_factory.mktemp("llama3_like")
    hf.save(str(folder / "tokenizer.json"))

    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    vocab = json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]
    with open(folder / "tokenizer.model", "w") as f:
        for token, rank in sorted(vocab.items(), key=lambda kv: kv[1]):
            f.write(base64.b64encode(bytes(to_byte[c] for c in token)).decode() + f" {rank}\n")
    return hf, folder


def _varied_strings(n: int = 300):
    """Deterministic mix: unicode scripts, digits runs, contractions, whitespace runs, code."""
    pool = (list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ") + list("0123456789") * 2
            + list(" " * 12) + ["\n", "\n\n", "\r\n", "\t", "  ", "   \n"] + list(".,;:!?'\"()[]{}<>=+-*/#_@$%^&|~`\\")
            + ["'s", "'T", "'re", "'VE", "'m", "'ll", "'D", "don't", "I'M"]
            + list("éàüßøçñ東京日本語中文한국어ελληνικάкириллицаعربيहिन्दी") + ["😀", "👍🏽", "🇫🇷", "e\u0301", "ﬁ"]
            + ["\u00a0", "\u2003", "\u3000", "\x85", "\x1c", "\u200b", "½", "²", "Ⅻ", "٣", "一二三"])
    rng = random.Random(7)
    out = []
    for _ in range(n):
        out.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 40))))
    return out


_VARIED = _varied_strings()
_FIXED = [
    "", " ", "   ", "\n", " \n \n", "Hello world", "  leading and trailing  ", "12345678901", "3.14159 vs 2,718",
    "don't won't I'll we've they're she'd He'S", "def f(x):\n\treturn {'a': x ** 2}  # comment\r\n",
    "for (int i = 0; i < n; ++i) { a[i] += b[i]; }", "naïve café résumé", "東京は日本の首都です。",
    "Ελληνικά και Русский", "emoji 😀👍🏽 flags 🇫🇷 zwj 👩‍👩‍👧", "tabs\t\tand\u00a0nbsp\u3000ideographic",
    "<|eot_id|> stays plain text <image>", "    indented\n        code\n", "a\n\n\nb\r\n\r\nc",
]


@pytest.mark.parametrize("fmt", ["tokenizer.json", "tokenizer.model"])
def test_encode_matches_hf_tokenizers(hf_files, demo_docs, fmt):
    hf, folder = hf_files
    ours = Llama3Tokenizer(str(folder / fmt))
    texts = _FIXED + _VARIED + [d[:300] for d in demo_docs[500:560]]
    plain = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    plain.encode_special_tokens = True  # ours never parses specials out of text ("<|eot_id|>" is text)
    mismatches = []
    for text in texts:
        ref = plain.encode(text, add_special_tokens=False).ids
        got = ours.encode(text)
        if got != ref:
            mismatches.append((text, ref, got))
        assert ours.decode(got) == text
    assert not mismatches, f"{len(mismatches)}/{len(texts)} differ, first: {mismatches[0]!r}"
    assert len(texts) >= 300


def test_specials_and_interface(hf_files):
    hf, folder = hf_files
    for fmt in ("tokenizer.json", "tokenizer.model"):
        tok = Llama3Tokenizer(str(folder / fmt))
        assert isinstance(tok, ChatTokenizer)
        assert tok.vocab_size == 1200 + 256
        for name in ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"):
            assert tok.special_id(name) == hf.token_to_id(name)
        assert tok.special_id("<image>") is None
        assert (tok.bos_id, tok.eos_id) == (1200, 1201)  # Llama-3: 128000, 128001 after 128000 ranks
        assert tok.decode([tok.special_id("<|eot_id|>")]) == "<|eot_id|>"
    # A folder resolves to tokenizer.json; build_tokenizer's 'huggingface' type is this class.
    assert Llama3Tokenizer(str(folder)).model_path.endswith("tokenizer.json")
    built = build_tokenizer(DataConfig(tokenizer_type="huggingface", tokenizer_model=str(folder)))
    assert isinstance(built, Llama3Tokenizer)


def test_chat_render_equals_hf_on_llama3_format_string(hf_files):
    """With native header ids, the rendered conversation is HF's encoding of the Llama-3 chat string."""
    hf, folder = hf_files
    tok = Llama3Tokenizer(str(folder / "tokenizer.json"))
    template = ChatTemplate(tok, OmniVocab(tok.vocab_size), system_prompt="Be brief.")
    turns = [Turn("user", "What's 12+30?"), Turn("assistant", "42."), Turn("user", " And\tdouble it? "),
             Turn("assistant", "84.")]
    text = "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>" + "".join(
        f"<|start_header_id|>{t.role}<|end_header_id|>\n\n{t.content.strip()}<|eot_id|>" for t in turns)
    assert template.render(turns).tokens == hf.encode(text, add_special_tokens=False).ids


def test_bad_files_name_the_file(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_text("not base64 at all!\n")
    with pytest.raises(ValueError, match=r"tokenizer.model:1: expected 'base64-token rank'"):
        Llama3Tokenizer(str(bad))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty: no tokenizer.json or tokenizer.model"):
        Llama3Tokenizer(str(empty))
    with pytest.raises(FileNotFoundError, match="nope.json: Llama-3 tokenizer file not found"):
        Llama3Tokenizer(str(tmp_path / "nope.json"))
    spm = tmp_path / "spm.json"
    spm.write_text(json.dumps({"model": {"type": "Unigram"}}))
    with pytest.raises(ValueError, match="spm.json: model.type is 'Unigram'"):
        Llama3Tokenizer(str(spm))


def test_whole_demo_corpus_matches_hf(hf_files, demo_docs):
    """All 2,326 demo documents (1.28 M characters, mostly held out from the BPE's training docs)."""
    _, folder = hf_files
    plain = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    plain.encode_special_tokens = True
    ours = Llama3Tokenizer(str(folder / "tokenizer.json"))
    ref = [e.ids for e in plain.encode_batch(demo_docs, add_special_tokens=False)]
    bad = [i for i, d in enumerate(demo_docs) if ours.encode(d) != ref[i]]
    assert not bad, f"{len(bad)} documents differ, first #{bad[0]}"
