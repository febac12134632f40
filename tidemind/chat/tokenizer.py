"""A thin, fast wrapper around a Hugging Face *fast* tokenizer.

Encoding and decoding go straight to the Rust ``tokenizers`` backend (the Python layer of
transformers costs more than the tokenization itself on short strings); loading, the chat
template and the special-token bookkeeping come from transformers.

BOS policy (``encode(..., add_bos=True)``): the tokens the tokenizer's own post-processor puts in
front of a text (``<s>`` for Llama 2, ``<|begin_of_text|>`` for Llama 3, ``<bos>`` for Gemma,
nothing for Qwen / SmolLM2) are prepended, unless the text already starts with them, which is the
case for a chat prompt whose template writes the BOS text itself. Tokens the post-processor would
append (an EOS on some tokenizers) are never added: a prompt is continued, not closed.

``decode`` is the backend's decode. transformers' ``clean_up_tokenization_spaces`` (a WordPiece-era
post-edit, off by default in transformers 5 and ignored there for BPE models) is not applied, so
that streamed text and decoded text agree exactly.
"""
from __future__ import annotations

import functools
import os
from typing import Iterable, List, Optional, Sequence

# Files transformers builds a tokenizer from, in its order of preference: the fast tokenizer's own
# file; a SentencePiece or tiktoken model (converted, needs `sentencepiece` or `tiktoken`); a BPE
# vocabulary (with merges.txt).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def check_tokenizer_files(model_dir: str) -> None:
    """ValueError naming the files to add when `model_dir` holds none of TOKENIZER_FILES."""
    if os.path.isdir(model_dir) and not any(os.path.isfile(os.path.join(model_dir, f)) for f in TOKENIZER_FILES):
        raise ValueError(
            f"{model_dir!r} has no tokenizer: it needs tokenizer.json (or tokenizer.model, or vocab.json with "
            f"merges.txt), usually with tokenizer_config.json; copy them from the model's repository into it")


def _tokenizer_fix(model_dir: str) -> str:
    """What to do about tokenizer files that are there but could not be loaded."""
    if os.path.isfile(os.path.join(model_dir, "tokenizer.json")):
        return "restore the model's original tokenizer.json and tokenizer_config.json"
    if os.path.isfile(os.path.join(model_dir, "tokenizer.model")):
        return ("tokenizer.model needs `sentencepiece` (or `tiktoken`) installed; or save the model's tokenizer.json "
                "with transformers")
    return "vocab.json needs merges.txt and tokenizer_config.json next to it"


class Tokenizer:
    """Wraps a transformers fast tokenizer (``PreTrainedTokenizerFast`` / ``TokenizersBackend``)."""

    def __init__(self, hf_tokenizer):
        backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ValueError(
                f"{type(hf_tokenizer).__name__} is a slow (pure Python) tokenizer; tidemind needs a fast "
                "one. Save the model's tokenizer with a recent transformers (it writes tokenizer.json) "
                "or install `tokenizers` and `sentencepiece` so transformers can convert it.")
        self.hf_tokenizer = hf_tokenizer
        self._backend = backend
        # decode(skip_special_tokens=True) drops exactly the added tokens flagged special in the
        # backend; the incremental detokenizer relies on this set being that same set.
        self.skipped_special_ids = frozenset(
            token_id for token_id, token in backend.get_added_tokens_decoder().items() if token.special)
        self._bos_prefix_ids = self._probe_prefix_ids()

    @classmethod
    def from_pretrained(cls, model_path: str, gguf_file: Optional[str] = None,
                        trust_remote_code: bool = False) -> "Tokenizer":
        """Load from a local model directory, or from a GGUF file (``model_path`` ending in .gguf,
        or a directory plus ``gguf_file``). Never touches the network."""
        from transformers import AutoTokenizer

        model_path = os.fspath(model_path)
        if not os.path.exists(model_path):
            raise FileNotFoundError(
                f"model path {model_path!r} does not exist; pass a local model directory (with "
                "tokenizer.json or tokenizer.model) or a .gguf file")
        if gguf_file is None and os.path.isfile(model_path) and model_path.endswith(".gguf"):
            model_path, gguf_file = os.path.split(os.path.abspath(model_path))
        if gguf_file is None:
            check_tokenizer_files(model_path)
        kwargs = {"local_files_only": True, "trust_remote_code": trust_remote_code}
        if gguf_file is not None:
            kwargs["gguf_file"] = gguf_file
        try:
            hf_tokenizer = AutoTokenizer.from_pretrained(model_path, **kwargs)
        except (OSError, ValueError) as error:
            source = os.path.join(model_path, gguf_file) if gguf_file else model_path
            reason = " ".join(str(error).split())  # transformers' messages span several lines
            fix = "the `gguf` package must be installed" if gguf_file else _tokenizer_fix(model_path)
            raise ValueError(f"could not load a tokenizer from {source!r}: {reason}; {fix}") from error
        return cls(hf_tokenizer)

    def _probe_prefix_ids(self) -> List[int]:
        # The post-processor's leading special tokens: encode a probe with and without special
        # tokens and keep what comes before the plain encoding.
        plain = self.hf_tokenizer("a", add_special_tokens=False)["input_ids"]
        full = self.hf_tokenizer("a", add_special_tokens=True)["input_ids"]
        for start in range(len(full) - len(plain) + 1):
            if full[start:start + len(plain)] == plain:
                return list(full[:start])
        return []

    # ---------------------------------------------------------------- properties
    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer knows, added tokens included (``len(hf_tokenizer)``)."""
        return len(self.hf_tokenizer)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def bos_token_id(self) -> Optional[int]:
        return self.hf_tokenizer.bos_token_id

    @property
    def bos_token(self) -> Optional[str]:
        return self.hf_tokenizer.bos_token

    @property
    def eos_token(self) -> Optional[str]:
        return self.hf_tokenizer.eos_token

    @property
    def eos_token_ids(self) -> List[int]:
        """The tokenizer's EOS id as a list; generation_config.json's ids are merged by the engine."""
        eos = self.hf_tokenizer.eos_token_id
        return [] if eos is None else [eos]

    @property
    def all_special_ids(self) -> List[int]:
        """transformers' special ids (bos/eos/unk/pad/additional) plus every added token flagged special."""
        return sorted(set(self.hf_tokenizer.all_special_ids) | self.skipped_special_ids)

    @property
    def chat_template(self) -> Optional[str]:
        template = getattr(self.hf_tokenizer, "chat_template", None)
        if isinstance(template, dict):  # several named templates: the default one is used
            template = template.get("default")
        return template or None

    @functools.cached_property
    def max_token_chars(self) -> int:
        """A bound on the characters of text one token stands for: the longest vocabulary entry.

        Byte-level BPE entries have one character per byte of the text's UTF-8, SentencePiece
        entries one per character (or more: "<0xE2>" stands for one byte), so a text of C
        characters takes at least C / max_token_chars tokens, unless the tokenizer drops text
        (a normalizer that collapses whitespace, unknown characters fused into one token)."""
        return max(map(len, self._backend.get_vocab(with_added_tokens=True)), default=1)

    @property
    def adds_bos(self) -> bool:
        """Whether ``encode(text, add_bos=True)`` puts tokens in front of the text."""
        return bool(self._bos_prefix_ids)

    # ---------------------------------------------------------------- encode / decode
    def encode(self, text: str, add_bos: bool = True) -> List[int]:
        ids = self._backend.encode(text, add_special_tokens=False).ids
        prefix = self._bos_prefix_ids
        if add_bos and prefix and ids[:len(prefix)] != prefix:
            ids = prefix + ids
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def decode_batch(self, sequences: Sequence[List[int]], skip_special_tokens: bool = True) -> List[str]:
        """decode() of many id lists (of Python ints) in one call into the tokenizers library."""
        return self._backend.decode_batch(list(sequences), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids):
        return self.hf_tokenizer.convert_ids_to_tokens(ids)

    def encode_bad_words(self, words: Sequence[str]) -> List[List[int]]:
        """Token sequences to ban for GenerationConfig.bad_words, without BOS.

        Each word is encoded as written and, unless it already starts with a space, also with a
        leading space: mid-sentence a BPE model writes " word", a different token sequence from
        "word", and banning only one of them would let the word through.
        """
        sequences: List[List[int]] = []
        for word in words:
            if not word:
                raise ValueError("bad_words must not contain empty strings")
            variants = [word] if word[0].isspace() else [word, " " + word]
            for variant in variants:
                ids = self.encode(variant, add_bos=False)
                if ids and ids not in sequences:
                    sequences.append(ids)
        return sequences

    def apply_chat_template(self, messages, **kwargs) -> str:
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template; pass --chat-template NAME or a JSON file")
        kwargs.setdefault("tokenize", False)
        return self.hf_tokenizer.apply_chat_template(messages, **kwargs)
