"""SigLIP's SentencePiece tokenizer: id-for-id with transformers' SiglipTokenizer on a SentencePiece
model trained here (offline, tiny), and its use by the CLIP task."""
from __future__ import annotations

import pickle
import random

import ml_collections
import numpy as np
import pytest

spm = pytest.importorskip("sentencepiece")

from lvm_jax.data.sentencepiece_tokenizer import SentencePieceTokenizer, clean_text  # noqa: E402
from lvm_jax.errors import UserError  # noqa: E402

TEXTS = ["a photo of a dog", "A Photo of a DOG!", "  hello,   world  ", "", "naïve café déjà vu", "東京 タワー",
         "a " * 40, "dog.cat", "it's a 3-D picture", "x_y", "\u2581dog", "tab\tsep\nnew line", "ÜNÏCÖDÉ",
         "a photo of the big red car near the small white house with two green trees"]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """A unigram model with c4_en's special ids (pad 0, EOS 1, unk 2, no BOS), trained on a toy corpus."""
    folder = tmp_path_factory.mktemp("spm")
    rng = random.Random(0)
    words = ("a photo of the dog cat bird car red blue green big small on in with near tree house running "
             "sitting two three white black").split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(3000)]
    lines += ["naïve café déjà vu", "東京 タワー", "ünïcödé 3-d picture"]
    (folder / "corpus.txt").write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(input=str(folder / "corpus.txt"), model_prefix=str(folder / "spiece"),
                                   vocab_size=60, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   character_coverage=1.0, minloglevel=2)
    return folder / "spiece.model"


@pytest.mark.parametrize("context_length", [64, 16, 5, 1])
def test_ids_match_transformers_siglip_tokenizer(model_file, context_length):
    transformers = pytest.importorskip("transformers")
    reference = transformers.SiglipTokenizer(vocab_file=str(model_file))
    tok = SentencePieceTokenizer.from_file(model_file)
    want = np.asarray([reference(t, padding="max_length", truncation=True, max_length=context_length)["input_ids"]
                       for t in TEXTS], np.int32)
    got = tok(TEXTS, context_length)
    assert got.dtype == np.int32 and got.shape == (len(TEXTS), context_length)
    np.testing.assert_array_equal(got, want)
    assert (got[:, -1] == tok.eot_token_id).all()  # sticky EOS / EOS padding: pool='last' reads EOS


def test_cleaning_pickling_and_errors(model_file, tmp_path):
    tok = SentencePieceTokenizer.from_file(model_file)
    assert clean_text("  A, Photo\tof   a DOG!! ") == "a photo of a dog"
    assert tok.encode("A photo!") == tok.encode("a photo") and (tok.vocab_size, tok.eot_token_id) == (60, 1)
    raw = SentencePieceTokenizer.from_file(model_file, clean=False)
    assert raw.encode("A photo!") != tok.encode("A photo!")
    copy = pickle.loads(pickle.dumps(tok))  # grain worker processes get a pickled copy
    np.testing.assert_array_equal(copy(TEXTS, 16), tok(TEXTS, 16))
    np.testing.assert_array_equal(tok(TEXTS[:2], 32, pad_id=0)[:, -1], [0, 0])
    assert tok([], 8).shape == (0, 8)
    with pytest.raises(ValueError, match="does not exist"):
        SentencePieceTokenizer.from_file(tmp_path / "missing.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="is not a SentencePiece model"):
        SentencePieceTokenizer.from_file(tmp_path / "junk.model")
    with pytest.raises(ValueError, match="not a str"):
        tok([b"bytes"])


def test_clip_task_takes_a_model_file_and_pads_siglip_style(model_file):
    from lvm_jax import sharding
    from train.tasks.clip import ClipTask, build_tokenizer

    tok = build_tokenizer(ml_collections.ConfigDict({"path": str(model_file)}), None)
    assert isinstance(tok, SentencePieceTokenizer)

    from tests.configs.tiny_clip import get_config

    config = get_config()
    config.tokenizer.path = str(model_file)
    config.model.text.pool = "last"
    config.model.text.causal = False
    mesh = sharding.make_mesh({"data": -1})
    task = ClipTask(config, mesh)
    assert task.pad_id == tok.eot_token_id == 1  # the last position holds EOS for every caption
    step = int(config.tokenizer.pad_vocab_to)
    assert task.model.text["vocab_size"] == -(-60 // step) * step  # the 60 ids, padded to shard evenly
    config.model.text.pool = "eot"  # argmax(ids) would not find a SentencePiece EOS
    with pytest.raises(UserError, match="pool='eot' needs CLIP's BPE vocabulary"):
        ClipTask(config, mesh).pad_id
