"""CLIP byte-level BPE tokenizer, id-for-id compatible with OpenAI CLIP / open_clip.

The BPE itself runs in the Rust `tokenizers` library (a BPE model with CLIP's
pre-tokenisation regex and the end-of-word suffix '</w>'); the text cleaning runs
in Python exactly as CLIP does it (ftfy, HTML unescape twice, whitespace
collapse, lower-case), because `tokenizers`' own normalisers lower-case and
split whitespace slightly differently from Python's `str.lower`/`str.split`.

Vocabulary layout (CLIP's): 256 byte symbols, the same 256 with '</w>', one
token per merge in rank order, then `<start_of_text>`, `<end_of_text>`. For the
standard file this gives 49408 tokens, SOT = 49406, EOT = 49407.

    tok = ClipTokenizer.from_file("bpe_simple_vocab_16e6.txt.gz")
    ids = tok(["a photo of a cat"])          # np.int32 [1, 77]
"""
from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import json
import os
import re
from collections.abc import Iterable, Sequence

import ftfy
import numpy as np
import regex
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from lvm_jax.data import files

DEFAULT_CONTEXT_LENGTH = 77
SOT_TOKEN = "<start_of_text>"
EOT_TOKEN = "<end_of_text>"
# Hugging Face spells CLIP's special tokens differently; same ids.
_HF_SOT_TOKEN = "<|startoftext|>"
_HF_EOT_TOKEN = "<|endoftext|>"
# OpenAI CLIP uses the first 49152 - 256 - 2 merges of bpe_simple_vocab_16e6.
STANDARD_NUM_MERGES = 49152 - 256 - 2

# CLIP's pre-tokenisation: contractions, letter runs, single digits, runs of
# everything else; whitespace is dropped. CLIP compiles it case-insensitively;
# on lower-cased text that only matters for 'ſ' (long s, case-folds to 's'),
# spelled out here because a case-insensitive Oniguruma regex is twice as slow.
_WORD_PATTERN = r"""'[sſ]|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# With the special tokens first, as CLIP does: a literal "<end_of_text>" in a
# caption becomes the EOT id when the scan reaches its '<'.
_SPECIAL_SPLIT = regex.compile(
    re.escape(SOT_TOKEN) + "|" + re.escape(EOT_TOKEN) + "|" + _WORD_PATTERN, regex.IGNORECASE
)
# Printable ASCII without '&' (plus tab/newline/form feed/CR): ftfy and HTML
# unescaping are the identity on it (up to whitespace, which is collapsed
# anyway), so the common case skips them. ftfy costs ~15 us per caption.
_NOTHING_TO_FIX = re.compile(r"[\t\n\x0c\r\x20-\x25\x27-\x7e]*")


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible byte -> printable unicode character table (256 entries).

    Printable Latin-1 bytes map to themselves; the other bytes, in byte order, to
    code points 256, 257, ... The dict's order (printable bytes first) is the order
    of the first 256 vocabulary entries.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + i) for i, b in enumerate(others)})
    return table


def default_vocab_path() -> str:
    """Path of CLIP's `bpe_simple_vocab_16e6.txt.gz`: the copy in this repo's tests/fixtures, else open_clip's."""
    here = os.path.dirname(os.path.abspath(__file__))
    candidates = [os.path.join(here, "..", "..", "tests", "fixtures", "bpe_simple_vocab_16e6.txt.gz")]
    # open_clip's package folder is looked up, not imported: importing it imports torch (seconds, a
    # crash where torch's CUDA libraries are broken) and sets TOKENIZERS_PARALLELISM for the process.
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        spec = None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidates.append(os.path.join(folder, "bpe_simple_vocab_16e6.txt.gz"))
    for path in candidates:
        if os.path.isfile(path):
            return os.path.normpath(path)
    raise ValueError("CLIP's bpe_simple_vocab_16e6.txt.gz was not found; pass its path explicitly "
                     "(it ships with OpenAI CLIP and open_clip_torch).")


def clean_text(text: str) -> str:
    """CLIP's 'lower' cleaning: ftfy, HTML unescape twice, collapse whitespace, lower-case."""
    if not _NOTHING_TO_FIX.fullmatch(text):
        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


def _base_vocab() -> list[str]:
    symbols = list(bytes_to_unicode().values())
    return symbols + [s + "</w>" for s in symbols]


def text_list(texts: str | Iterable[str], context_length: int, minimum: int, specials: str) -> list[str]:
    """`texts` as a list (one str is one text), checked: every item a str and `context_length` at least
    `minimum`, the room the tokenizer's `specials` take."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    if context_length < minimum:
        raise ValueError(f"context_length={context_length} leaves no room for {specials}; use >= {minimum}.")
    for t in texts:
        if not isinstance(t, str):
            raise ValueError(f"Tokenizer got a {type(t).__name__}, not a str; pass a list of strings.")
    return texts


class ClipTokenizer:
    """CLIP BPE tokenizer: `tok(texts, context_length=77) -> np.int32 [N, context_length]`.

    Args:
      merges: BPE merges in rank order, as (left, right) symbol pairs.
    The vocabulary is derived from the merges in CLIP's layout (see module doc).
    """

    def __init__(self, merges: Sequence[tuple[str, str]]):
        self.merges = [tuple(m) for m in merges]
        vocab_list = _base_vocab() + ["".join(m) for m in self.merges] + [SOT_TOKEN, EOT_TOKEN]
        # CLIP builds dict(zip(vocab, range)): a repeated string keeps its last id.
        self.vocab = {token: i for i, token in enumerate(vocab_list)}
        self.vocab_size = len(vocab_list)
        self.sot_token_id = self.vocab[SOT_TOKEN]
        self.eot_token_id = self.vocab[EOT_TOKEN]
        self._id_to_token = vocab_list

        bpe = models.BPE(vocab=self.vocab, merges=self.merges, end_of_word_suffix="</w>", fuse_unk=False)
        tok = tokenizers.Tokenizer(bpe)
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(tokenizers.Regex(_WORD_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tok.decoder = decoders.BPEDecoder(suffix="</w>")
        self._tokenizer = tok

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_file(cls, path: str | os.PathLike, num_merges: int | None = None) -> "ClipTokenizer":
        """Loads CLIP's `bpe_simple_vocab_16e6.txt.gz` (or a plain merges .txt) or a HF `tokenizer.json`.

        Args:
          path: merges file (first line is a header, then one "left right" pair per line),
            gzipped or not, or a Hugging Face `tokenizer.json` with a BPE model.
          num_merges: merges to keep from a merges file; default: 48894 for a file with at
            least that many (what CLIP uses of the standard file), else all of them.
        """
        path = os.fspath(path)
        if not files.isfile(path):  # a local file or a gs:// object
            raise ValueError(f"Tokenizer file {path!r} does not exist; pass the path of "
                             "bpe_simple_vocab_16e6.txt.gz or a tokenizer.json.")
        data = files.read_bytes(path)
        if path.endswith(".json"):
            return cls._from_hf_json(path, json.loads(data))
        lines = (gzip.decompress(data) if path.endswith(".gz") else data).decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1:] if line.strip()]
        if any(len(m) != 2 for m in merges):
            raise ValueError(f"{path!r} is not a BPE merges file (expected 'left right' pairs per line).")
        if num_merges is None:
            num_merges = STANDARD_NUM_MERGES if len(merges) >= STANDARD_NUM_MERGES else len(merges)
        return cls(merges[:num_merges])

    @classmethod
    def _from_hf_json(cls, path: str, spec: dict) -> "ClipTokenizer":
        model = spec.get("model", {})
        if model.get("type") != "BPE" or "merges" not in model:
            raise ValueError(f"{path!r} has no BPE model; expected a CLIP tokenizer.json.")
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        tok = cls(merges)
        # Check the file's own ids agree with the CLIP layout we rebuild from its merges.
        file_vocab = model.get("vocab", {})
        for name, hf_name, ours in ((SOT_TOKEN, _HF_SOT_TOKEN, tok.sot_token_id),
                                    (EOT_TOKEN, _HF_EOT_TOKEN, tok.eot_token_id)):
            file_id = file_vocab.get(name, file_vocab.get(hf_name))
            if file_id is not None and file_id != ours:
                raise ValueError(f"{path!r} puts {name} at id {file_id}, not {ours}; it is not a "
                                 "CLIP-layout vocabulary (bytes, bytes+'</w>', merges, SOT, EOT).")
        mismatched = [t for t, i in file_vocab.items() if t in tok.vocab and tok.vocab[t] != i]
        if mismatched:
            raise ValueError(f"{path!r} assigns ids differently from CLIP's layout (e.g. {mismatched[0]!r}); "
                             "only CLIP-layout BPE vocabularies are supported.")
        return tok

    def save(self, path: str | os.PathLike) -> None:
        """Writes a `tokenizer.json` (loadable with `from_file`) or, for *.txt / *.txt.gz, a merges file."""
        path = os.fspath(path)
        if path.endswith(".json"):
            self._tokenizer.save(path)
            return
        # No trailing newline: open_clip reads every line after the header as a merge.
        text = "#version: lvm_jax\n" + "\n".join(f"{a} {b}" for a, b in self.merges)
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "wt", encoding="utf-8") as f:
            f.write(text)

    # --------------------------------------------------------------- encoding
    def encode(self, text: str) -> list[int]:
        """Token ids of one text, cleaned, without SOT/EOT."""
        return self._encode_cleaned([clean_text(text)])[0]

    def _encode_cleaned(self, cleaned: list[str]) -> list[list[int]]:
        encodings = self._tokenizer.encode_batch(cleaned, add_special_tokens=False)
        ids = [e.ids for e in encodings]
        for i, text in enumerate(cleaned):
            if SOT_TOKEN in text or EOT_TOKEN in text:  # rare: literal special-token text
                ids[i] = self._encode_with_specials(text)
        return ids

    def _encode_with_specials(self, text: str) -> list[int]:
        # The word regex covers every non-space character, so the text between two
        # special-token matches tokenizes independently of its neighbours.
        out, start = [], 0
        for m in _SPECIAL_SPLIT.finditer(text):
            if m.group() in (SOT_TOKEN, EOT_TOKEN):
                out += self._tokenizer.encode(text[start:m.start()], add_special_tokens=False).ids
                out.append(self.vocab[m.group()])
                start = m.end()
        out += self._tokenizer.encode(text[start:], add_special_tokens=False).ids
        return out

    def __call__(self, texts: str | Iterable[str], context_length: int = DEFAULT_CONTEXT_LENGTH,
                 pad_id: int = 0) -> np.ndarray:
        """Tokenizes texts to `np.int32 [N, context_length]`: SOT, ids, EOT, then `pad_id`.

        Texts longer than the context are truncated and their last position set to EOT,
        so EOT-pooling always finds the end of the kept text. Padding is 0 as in
        open_clip; a tower pooled at the last position wants `pad_id=eot_token_id`
        (big_vision's "sticky" EOS), so that position holds EOT for every caption.
        """
        texts = text_list(texts, context_length, 2, "SOT and EOT")
        all_ids = self._encode_cleaned([clean_text(t) for t in texts])
        out = np.full((len(texts), context_length), pad_id, np.int32)
        for row, ids in zip(out, all_ids):
            n = min(len(ids), context_length - 2)
            row[0] = self.sot_token_id
            row[1:n + 1] = ids[:n]
            row[n + 1] = self.eot_token_id
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids; SOT, EOT and the padding after EOT are dropped."""
        pieces = []
        for i in ids:
            i = int(i)
            if i == self.eot_token_id:
                break
            if i != self.sot_token_id:
                pieces.append(self._id_to_token[i])
        byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
        words = "".join(pieces).split("</w>")
        decoded = [bytearray(byte_decoder[c] for c in w).decode("utf-8", errors="replace") for w in words]
        return " ".join(decoded).strip()


def train_bpe(captions: Iterable[str], vocab_size: int) -> ClipTokenizer:
    """Trains a CLIP-layout BPE vocabulary on captions (for from-scratch runs with a small text tower).

    The vocabulary always holds all 512 byte symbols (so no text is ever out of
    vocabulary), up to `vocab_size - 514` merges (fewer if the corpus has fewer pairs seen
    twice), then SOT and EOT as the last two ids; `tok.vocab_size` is the actual size.

    Args:
      captions: training texts; cleaned the same way as at tokenization time.
      vocab_size: total vocabulary size, >= 514.
    """
    num_merges = vocab_size - len(_base_vocab()) - 2
    if num_merges < 0:
        raise ValueError(f"vocab_size={vocab_size} is smaller than the 512 byte symbols + SOT + EOT; use >= 514.")
    alphabet = list(bytes_to_unicode().values())
    bpe = models.BPE(end_of_word_suffix="</w>")
    tok = tokenizers.Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(_WORD_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    # The trainer counts its alphabet (incl. '</w>' variants it sees) in vocab_size;
    # ask for enough and keep the first num_merges merges, which are in rank order.
    # Equal-count merges are ranked by token id, and the trainer numbers each '</w>' symbol when it first
    # meets it while walking a randomly seeded hash map (huggingface/tokenizers#1794): the same captions
    # could give different merges in two calls. Naming all 256 '</w>' symbols up front, in a fixed order,
    # numbers them before training, so the merges (all we keep) depend on the captions alone.
    trainer = trainers.BpeTrainer(vocab_size=vocab_size + 2 * len(alphabet), initial_alphabet=alphabet,
                                  end_of_word_suffix="</w>", show_progress=False, min_frequency=2,
                                  special_tokens=[a + "</w>" for a in alphabet])
    tok.train_from_iterator((clean_text(c) for c in captions), trainer=trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    seen, kept = set(_base_vocab()), []
    for m in merges:  # a merge whose result already exists would shadow an id; skip it
        if len(kept) == num_merges:
            break
        if "".join(m) not in seen:
            seen.add("".join(m))
            kept.append(m)
    return ClipTokenizer(kept)
