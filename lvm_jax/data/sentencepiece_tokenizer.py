"""SigLIP's text tokenizer: a SentencePiece model (`.model`), as big_vision and Hugging Face use it.

Converted SigLIP text towers (big_vision `.npz`, Hugging Face `SiglipModel`) were trained on the ids
of a SentencePiece vocabulary (the 32k English `c4_en` model; `spiece.model` in a Hugging Face
folder), not CLIP's BPE: feed them ids from this tokenizer.

Encoding (what `transformers.SiglipTokenizer` does, checked id for id in tests/test_sentencepiece.py):
  1. clean: lower-case, drop ASCII punctuation, collapse whitespace (`clean=False` keeps the text);
  2. SentencePiece ids of the cleaned text (the model's own normaliser runs inside);
  3. keep the first `context_length - 1` ids and append EOS ("sticky" EOS: a truncated text still
     ends in EOS), then pad with EOS (big_vision's `pad_value=1`, HF's pad token `</s>`).
A text tower pooled at the last position (SigLIP's `pool='last'`) therefore always reads EOS.
Unlike HF, literal special-token text in a caption ("</s>") is text, as SentencePiece itself reads it.

Needs the `sentencepiece` package (`pip install 'lvm_jax[siglip]'`).
"""
from __future__ import annotations

import os
import re
import string
from collections.abc import Iterable
from typing import Any

import numpy as np

from lvm_jax.data import files
from lvm_jax.data.tokenizer import text_list
from lvm_jax.errors import UserError

DEFAULT_CONTEXT_LENGTH = 64  # SigLIP's text length
_PUNCTUATION = str.maketrans("", "", string.punctuation)
_SPACES = re.compile(r"\s+")


def _sentencepiece():
    try:
        import sentencepiece
    except ImportError:
        raise UserError("A SentencePiece tokenizer (.model) needs the sentencepiece package; install it with "
                        "pip install 'lvm_jax[siglip]' (or pip install sentencepiece).") from None
    return sentencepiece


def clean_text(text: str) -> str:
    """SigLIP's canonical text: lower-case, ASCII punctuation removed, whitespace collapsed and stripped."""
    return _SPACES.sub(" ", text.lower().translate(_PUNCTUATION)).strip()


class SentencePieceTokenizer:
    """`tok(texts, context_length=64) -> np.int32 [N, context_length]`: ids, EOS, EOS padding.

    Args:
      model_proto: the serialized SentencePiece model (the bytes of a `.model` file).
      clean: apply `clean_text` first (SigLIP's canonicalisation; False for models trained on raw text).
      name: where the model came from, for messages.
    """

    def __init__(self, model_proto: bytes, clean: bool = True, name: str = "SentencePiece model"):
        spm = _sentencepiece()
        self._proto, self.clean, self.name = bytes(model_proto), bool(clean), name
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(self._proto)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{name} is not a SentencePiece model ({e}); pass a .model file such as a "
                             "Hugging Face SigLIP folder's spiece.model.") from None
        self.vocab_size = int(self._sp.get_piece_size())
        self.eot_token_id = int(self._sp.eos_id())  # the CLIP task's name for the end-of-text id
        if not 0 <= self.eot_token_id < self.vocab_size:
            raise ValueError(f"{name} has no EOS piece; SigLIP's tokenizer ends every text with EOS.")

    @classmethod
    def from_file(cls, path: str | os.PathLike, clean: bool = True) -> "SentencePieceTokenizer":
        """Loads a `.model` file (a local path or a gs:// / s3:// URL)."""
        path = os.fspath(path)
        if not files.isfile(path):
            raise ValueError(f"Tokenizer file {path!r} does not exist; pass the path of a SentencePiece "
                             ".model file (spiece.model in a Hugging Face SigLIP folder).")
        return cls(files.read_bytes(path), clean=clean, name=path)

    # Pickled into grain worker processes: the processor itself is rebuilt from the model bytes.
    def __getstate__(self) -> dict[str, Any]:
        return {"proto": self._proto, "clean": self.clean, "name": self.name}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["proto"], state["clean"], state["name"])

    def encode(self, text: str) -> list[int]:
        """Ids of one text (cleaned unless `clean=False`), without EOS."""
        return list(self._sp.encode(clean_text(text) if self.clean else text))

    def __call__(self, texts: str | Iterable[str], context_length: int = DEFAULT_CONTEXT_LENGTH,
                 pad_id: int | None = None) -> np.ndarray:
        """Tokenizes texts to `np.int32 [N, context_length]`: the first `context_length - 1` ids,
        EOS, then `pad_id` (default EOS, as SigLIP pads)."""
        texts = text_list(texts, context_length, 1, "EOS")
        pad = self.eot_token_id if pad_id is None else int(pad_id)
        out = np.full((len(texts), context_length), pad, np.int32)
        if not texts:
            return out
        cleaned = [clean_text(t) for t in texts] if self.clean else texts
        for row, ids in zip(out, self._sp.encode(cleaned)):
            ids = ids[:context_length - 1]
            row[:len(ids)] = ids
            row[len(ids)] = self.eot_token_id
        return out
