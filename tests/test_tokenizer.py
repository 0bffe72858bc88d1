"""CLIP tokenizer: id-for-id parity with open_clip (live when importable, and a committed golden file)."""
import gzip
import html
import importlib.util
import json
import os
import random

import ftfy
import numpy as np
import pytest

from lvm_jax.data.tokenizer import SOT_TOKEN, ClipTokenizer, clean_text, default_vocab_path, train_bpe

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
VOCAB = os.path.join(FIXTURES, "bpe_simple_vocab_16e6.txt.gz")


def _load_caption_generator():
    path = os.path.join(os.path.dirname(__file__), "..", "scripts", "make_tokenizer_golden.py")
    spec = importlib.util.spec_from_file_location("make_tokenizer_golden", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tok():
    return ClipTokenizer.from_file(VOCAB)


@pytest.fixture(scope="module")
def golden():
    with gzip.open(os.path.join(FIXTURES, "tokenizer_golden.json.gz"), "rt", encoding="utf-8") as f:
        return json.load(f)


def _padded(ids, length=77):
    out = np.zeros(length, np.int32)
    out[:len(ids)] = ids
    return out


def test_vocab_layout(tok):
    assert tok.vocab_size == 49408
    assert (tok.sot_token_id, tok.eot_token_id) == (49406, 49407)
    assert default_vocab_path().endswith("bpe_simple_vocab_16e6.txt.gz")


def test_golden_ids_match_open_clip(tok, golden):
    rows = golden["rows"]
    assert len(rows) >= 1000
    out = tok([r["text"] for r in rows], context_length=golden["context_length"])
    assert out.dtype == np.int32 and out.shape == (len(rows), 77)
    mismatched = [r["text"] for r, o in zip(rows, out) if not np.array_equal(o, _padded(r["ids"]))]
    assert not mismatched, f"{len(mismatched)} captions differ, e.g. {mismatched[:3]!r}"


def test_live_parity_with_open_clip(tok):
    tokenizer_module = pytest.importorskip("open_clip.tokenizer")
    ref = tokenizer_module.SimpleTokenizer()
    texts = _load_caption_generator().captions(n=1000, seed=1234)
    for context_length in (77, 16):
        expected = ref(texts, context_length=context_length).numpy()
        np.testing.assert_array_equal(tok(texts, context_length=context_length), expected)


def test_hf_tokenizer_json_gives_same_ids(tok, golden, tmp_path):
    tokenizer_module = pytest.importorskip("open_clip.tokenizer")
    transformers = pytest.importorskip("transformers")
    ref = tokenizer_module.SimpleTokenizer()
    vocab = dict(ref.encoder)  # written with Hugging Face's names for the special tokens
    vocab["<|startoftext|>"] = vocab.pop("<start_of_text>")
    vocab["<|endoftext|>"] = vocab.pop("<end_of_text>")
    merges = sorted(ref.bpe_ranks, key=ref.bpe_ranks.get)
    try:
        hf = transformers.CLIPTokenizer(vocab=vocab, merges=merges)
    except TypeError:  # transformers < 5 only takes files
        pytest.skip("this transformers version cannot build a CLIPTokenizer from in-memory vocab")
    hf.save_pretrained(tmp_path)
    from_json = ClipTokenizer.from_file(tmp_path / "tokenizer.json")
    texts = [r["text"] for r in golden["rows"]]
    np.testing.assert_array_equal(from_json(texts), tok(texts))
    # And HF's own tokenizer agrees on plain text (it skips ftfy/HTML unescaping, so only plain text).
    plain = ["A photo of a dog.", "two cats, sitting on a red sofa!", "it's 2024"]
    for text, ours in zip(plain, tok(plain)):
        assert hf(text)["input_ids"] == [int(i) for i in ours if i]


def _reference_clean(text):
    # CLIP's cleaning written out without the ASCII fast path.
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).strip().lower()


def test_fast_path_cleaning_matches_ftfy():
    rng = random.Random(0)
    alphabet = [chr(c) for c in range(128)] + ["&amp;", "&lt;", "é", "\u00a0", "\u2028"]
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        assert clean_text(text) == _reference_clean(text), repr(text)


def test_truncation_keeps_eot_last(tok):
    ids = tok(["word " * 200, "short"], context_length=10)
    assert ids.shape == (2, 10)
    assert ids[0, 0] == tok.sot_token_id and ids[0, -1] == tok.eot_token_id
    assert np.all(ids[0, 1:-1] == tok.encode("word")[0])
    assert list(ids[1, :3]) == [tok.sot_token_id, *tok.encode("short"), tok.eot_token_id][:3]


def test_empty_and_single_string(tok):
    ids = tok("")
    assert ids.shape == (1, 77)
    assert list(ids[0, :3]) == [tok.sot_token_id, tok.eot_token_id, 0]
    assert tok(["  \n\t "])[0, 1] == tok.eot_token_id


def test_literal_special_token_text(tok):
    ids = tok([f"a {SOT_TOKEN} b"])[0]
    assert list(ids[:5]) == [tok.sot_token_id, tok.encode("a")[0], tok.sot_token_id, tok.encode("b")[0],
                             tok.eot_token_id]


def test_decode_roundtrip(tok):
    text = "A photo of a Café 😀 3 dogs &amp; 2 cats"
    assert tok.decode(tok([text])[0]) == "a photo of a café 😀 3 dogs & 2 cats"


def test_bad_input_errors(tok, tmp_path):
    with pytest.raises(ValueError, match="not a str"):
        tok(["ok", None])
    with pytest.raises(ValueError, match="does not exist"):
        ClipTokenizer.from_file(tmp_path / "missing.txt.gz")
    with pytest.raises(ValueError, match="context_length"):
        tok(["x"], context_length=1)


def test_train_bpe_small_vocab(tmp_path):
    corpus = _load_caption_generator().captions(n=300, seed=7)
    trained = train_bpe(corpus, vocab_size=700)
    assert trained.vocab_size <= 700
    assert (trained.sot_token_id, trained.eot_token_id) == (trained.vocab_size - 2, trained.vocab_size - 1)
    ids = trained(corpus)
    assert ids.max() < trained.vocab_size
    # Merges actually shorten the text compared with bytes only.
    assert (ids > 0).sum() < (ClipTokenizer([])(corpus) > 0).sum()
    # Both save formats reload to the same tokenizer.
    trained.save(tmp_path / "tokenizer.json")
    trained.save(tmp_path / "merges.txt.gz")
    for path in ("tokenizer.json", "merges.txt.gz"):
        np.testing.assert_array_equal(ClipTokenizer.from_file(tmp_path / path)(corpus), ids)
    # open_clip's tokenizer given our merges file produces the same ids (same vocabulary layout).
    tokenizer_module = pytest.importorskip("open_clip.tokenizer")
    ref = tokenizer_module.SimpleTokenizer(bpe_path=str(tmp_path / "merges.txt.gz"))
    np.testing.assert_array_equal(ref(corpus).numpy(), ids)


def test_train_bpe_rejects_tiny_vocab():
    with pytest.raises(ValueError, match="514"):
        train_bpe(["a b c"], vocab_size=100)


def test_pad_id_fills_after_eot_only(tok):
    plain, sticky = tok(["a cat", "a"], 12), tok(["a cat", "a"], 12, pad_id=tok.eot_token_id)
    for row_plain, row_sticky in zip(plain, sticky):
        n = int(np.argmax(row_plain == tok.eot_token_id))
        np.testing.assert_array_equal(row_plain[:n + 1], row_sticky[:n + 1])
        assert (row_plain[n + 1:] == 0).all() and (row_sticky[n:] == tok.eot_token_id).all()
    assert tok.decode(sticky[0]) == tok.decode(plain[0]) == "a cat"


def test_finding_the_vocab_imports_neither_open_clip_nor_torch(tmp_path):
    """configs/clip_b16.py calls default_vocab_path while loading: importing open_clip there took ~10 s
    (torch) and crashed the config load where torch is broken (an OSError, not an ImportError)."""
    import subprocess
    import sys

    fake = tmp_path / "open_clip"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise OSError('libcudnn.so: cannot open shared object file')\n")
    code = ("import sys; from lvm_jax.data.tokenizer import default_vocab_path; p = default_vocab_path(); "
            "assert 'open_clip' not in sys.modules and 'torch' not in sys.modules, sorted(sys.modules); "
            "from lvm_jax.config import load_config_file; c = load_config_file('configs/clip_b16.py'); "
            "assert c.tokenizer.path == p, c.tokenizer.path; print(p)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}:{root}"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("bpe_simple_vocab_16e6.txt.gz")
