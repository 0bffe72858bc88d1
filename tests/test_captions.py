"""Caption-file and webdataset sources on tiny temp files, including every bad-input policy."""
import io
import json
import os
import pickle
import tarfile

import ml_collections
import numpy as np
import pytest
from PIL import Image

from lvm_jax.data import captions as C
from lvm_jax.data.tokenizer import ClipTokenizer
from lvm_jax.data.transforms import DecodeImage, DropFailed

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def _png(color, size=8) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), color, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _cfg(**kw):
    return ml_collections.ConfigDict(dict(dict(decode_errors="skip", holdout_fraction=0.1, holdout_seed=0), **kw))


@pytest.fixture
def image_dir(tmp_path):
    for i in range(4):
        (tmp_path / "img").mkdir(exist_ok=True)
        (tmp_path / "img" / f"{i}.png").write_bytes(_png(40 * i))
    return tmp_path


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_jsonl_source_and_bad_rows(image_dir):
    _write_jsonl(image_dir / "train.jsonl", [
        {"image": "img/0.png", "caption": "a black square"},
        {"image": "img/1.png", "caption": ["a dark square", "a small tile"]},  # two captions, one image
        {"image": "img/2.png", "caption": "   "},                             # empty caption
        "{not json",                                                           # malformed row
        {"caption": "no image field"},                                         # malformed row
        {"image": "img/missing.png", "caption": "its file is gone"},           # missing image
        {"image": str(image_dir / "img" / "3.png"), "caption": "absolute path"},
        "",
    ])
    cfg = _cfg(path=str(image_dir / "train.jsonl"), eval_path=str(image_dir / "train.jsonl"))
    source = C.build_captions_source(cfg, "train")
    assert len(source) == 5
    assert source.skipped == {"empty_caption": 1, "malformed_row": 2}
    assert source.captions == [
        "a black square", "a dark square", "a small tile", "its file is gone", "absolute path"]
    record = source[1]
    assert record["image"] == (image_dir / "img" / "1.png").read_bytes() and record["id"] == 1
    assert source.image_keys[1] == source.image_keys[2]  # grouped as one image for retrieval
    # Missing file: empty bytes, then DecodeImage(skip) + DropFailed count and drop it.
    missing = source[3]
    assert missing["image"] == b"" and source.missing_images == 1
    decoded = DecodeImage("skip").map(missing)
    assert not DropFailed().filter(decoded)
    assert DecodeImage("skip").map(source[0])["image"].shape == (8, 8, 3)

    strict = _cfg(path=str(image_dir / "train.jsonl"), decode_errors="raise")
    with pytest.raises(ValueError, match=r"train.jsonl:4: not valid JSON"):
        C.build_captions_source(strict, "train")


def test_byte_order_mark_is_not_part_of_the_first_row_or_column(image_dir):
    # Spreadsheet exports start with a UTF-8 byte-order mark; it glued itself to the first JSON row
    # (dropped as malformed) and to the first CSV column's name.
    rows = [{"image": "img/0.png", "caption": "a black square"}, {"image": "img/1.png", "caption": "dark"}]
    (image_dir / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in rows).encode())
    for name in ("bom.jsonl", "bom.csv"):
        if name.endswith(".csv"):
            (image_dir / name).write_bytes(b"\xef\xbb\xbffilepath,title\nimg/0.png,a black square\nimg/1.png,dark\n")
        source = C.build_captions_source(_cfg(path=str(image_dir / name), eval_path=str(image_dir / name)))
        assert source.captions == ["a black square", "dark"] and not source.skipped, name


def test_holdout_fraction_zero_is_refused_not_replaced_by_the_default(image_dir):
    _write_jsonl(image_dir / "c.jsonl", [{"image": f"img/{i}.png", "caption": "x"} for i in range(4)])
    with pytest.raises(ValueError, match=r"holdout_fraction=0.0 must be in \(0, 1\)"):
        C.build_captions_source(_cfg(path=str(image_dir / "c.jsonl"), holdout_fraction=0.0), "train")


def test_missing_image_raises_under_raise_policy(image_dir):
    _write_jsonl(image_dir / "c.jsonl", [{"image": "img/nope.png", "caption": "x"}])
    source = C.build_captions_source(_cfg(path=str(image_dir / "c.jsonl"), eval_path=str(image_dir / "c.jsonl"),
                                          decode_errors="raise"), "train")
    with pytest.raises(ValueError, match="nope.png.*cannot be read"):
        source[0]


def test_csv_columns_and_separators(image_dir):
    (image_dir / "tab.csv").write_text("filepath\ttitle\nimg/0.png\ta tab, separated row\nimg/1.png\tsecond\n")
    src = C.build_captions_source(_cfg(path=str(image_dir / "tab.csv"), eval_path=str(image_dir / "tab.csv")))
    assert [src[i]["caption"] for i in range(2)] == ["a tab, separated row", "second"]
    (image_dir / "comma.csv").write_text('url,text,other\nimg/2.png,"quoted, comma",1\nimg/3.png,,2\n')
    cfg = _cfg(path=str(image_dir / "comma.csv"), eval_path=str(image_dir / "comma.csv"), image_column="url",
               caption_column="text")
    src = C.build_captions_source(cfg)
    assert len(src) == 1 and src[0]["caption"] == "quoted, comma" and src.skipped == {"empty_caption": 1}
    with pytest.raises(ValueError, match=r"no column\(s\) \['filepath', 'title'\]"):
        C.build_captions_source(_cfg(path=str(image_dir / "comma.csv")))
    with pytest.raises(ValueError, match="does not exist"):
        C.build_captions_source(_cfg(path=str(image_dir / "absent.jsonl")))


def test_holdout_keeps_captions_of_an_image_together(tmp_path):
    rows = [{"image": f"{i}.png", "caption": f"caption {j} of {i}"} for i in range(20) for j in range(3)]
    _write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = _cfg(path=str(tmp_path / "d.jsonl"), holdout_fraction=0.2)
    train, held = C.build_captions_source(cfg, "train"), C.build_captions_source(cfg, "eval")
    assert len(train) + len(held) == 60 and len(held) == 12
    assert not set(train.image_keys) & set(held.image_keys)
    assert sorted(train.captions + held.captions) == sorted(r["caption"] for r in rows)
    again = C.build_captions_source(cfg, "eval")
    assert again.captions == held.captions  # fixed seed


def _write_shard(path, samples):
    """samples: list of (key, {ext: bytes})."""
    with tarfile.open(path, "w") as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def shards(tmp_path):
    def sample(i):
        return f"{i:09d}", {"jpg": _png(10 * i), "txt": f"caption {i}".encode(),
                            "json": json.dumps({"caption": f"caption {i}", "url": "u"}).encode()}
    _write_shard(tmp_path / "00000.tar", [sample(0), sample(1),
                                          ("000000002", {"jpg": _png(1), "json": b'{"caption": "json only"}'}),
                                          ("000000003", {"jpg": _png(2)}),               # no caption
                                          ("000000004", {"txt": b"no image"}),           # no image
                                          ("000000005", {"png": _png(3), "txt": b""})])  # empty caption
    _write_shard(tmp_path / "00001.tar", [sample(i) for i in range(10, 14)])
    return tmp_path


def test_webdataset_source_reads_img2dataset_layout(shards, tmp_path):
    cfg = _cfg(path=str(shards / "{00000..00001}.tar"), eval_path=str(shards / "0000[01].tar"))
    src = C.build_webdataset_source(cfg, "train")
    assert len(src) == 3 + 4
    assert src.skipped == {"no_caption": 1, "no_image": 1, "empty_caption": 1}
    assert src.captions[:3] == ["caption 0", "caption 1", "json only"]
    assert src[1]["image"] == _png(10) and src[1]["caption"] == "caption 1" and src[1]["id"] == 1
    assert src[4]["image"] == _png(110)
    assert len(set(src.image_keys)) == len(src)
    # Survives pickling into grain workers and reads there.
    clone = pickle.loads(pickle.dumps(src))
    assert clone[6]["image"] == _png(130)
    assert len(C.build_webdataset_source(cfg, "eval")) == 7

    strict = _cfg(path=str(shards / "00000.tar"), eval_path=str(shards / "00000.tar"), decode_errors="raise")
    with pytest.raises(ValueError, match="has no caption"):
        C.build_webdataset_source(strict)


def test_webdataset_truncated_and_compressed_shards(shards):
    data = (shards / "00001.tar").read_bytes()
    (shards / "cut.tar").write_bytes(data[:len(data) // 2])
    src = C.build_webdataset_source(_cfg(path=str(shards / "cut.tar"), eval_path=str(shards / "cut.tar")))
    assert 0 < len(src) < 4 and src.skipped["truncated_shard"] == 1
    for i in range(len(src)):
        assert src[i]["image"] == _png(10 * (10 + i))
    with pytest.raises(ValueError, match="cut.tar' is truncated"):
        C.build_webdataset_source(_cfg(path=str(shards / "cut.tar"), decode_errors="raise"))
    (shards / "x.tar.gz").write_bytes(b"")
    with pytest.raises(ValueError, match="compressed"):
        C.build_webdataset_source(_cfg(path=str(shards / "x.tar.gz")))
    with pytest.raises(ValueError, match="matches no shard"):
        C.build_webdataset_source(_cfg(path=str(shards / "nothing-*.tar")))


def test_webdataset_index_cache_and_holdout(shards, tmp_path, monkeypatch):
    index_dir = tmp_path / "index"
    cfg = _cfg(path=str(shards / "00001.tar"), index_dir=str(index_dir), holdout_fraction=0.25)
    train = C.build_webdataset_source(cfg, "train")
    assert len(os.listdir(index_dir)) == 1
    monkeypatch.setattr(C, "index_shard", lambda *a, **k: pytest.fail("index was rebuilt"))
    held = C.build_webdataset_source(cfg, "eval")
    assert (len(train), len(held)) == (3, 1)
    assert held[0]["image"] == _png(10 * int(held.keys[0][-2:]))
    assert not set(train.image_keys) & set(held.image_keys)


def test_long_caption_truncates_with_eot(image_dir):
    _write_jsonl(image_dir / "long.jsonl", [{"image": "img/0.png", "caption": "a very long caption " * 100}])
    src = C.build_captions_source(_cfg(path=str(image_dir / "long.jsonl"),
                                       eval_path=str(image_dir / "long.jsonl")))
    tok = ClipTokenizer.from_file(os.path.join(FIXTURES, "bpe_simple_vocab_16e6.txt.gz"))
    ids = tok([src[0]["caption"]], context_length=77)[0]
    assert ids[0] == tok.sot_token_id and ids[-1] == tok.eot_token_id and np.all(ids[1:-1] > 0)


def test_expand_shards_patterns(tmp_path):
    for i in range(3):
        (tmp_path / f"s{i}.tar").write_bytes(b"")
    assert C.expand_shards(str(tmp_path / "s{0..2}.tar")) == [str(tmp_path / f"s{i}.tar") for i in range(3)]
    assert C.expand_shards(str(tmp_path / "s*.tar")) == [str(tmp_path / f"s{i}.tar") for i in range(3)]
    assert len(C.expand_shards(f"{tmp_path}/s0.tar,{tmp_path}/s{{1..2}}.tar")) == 3


def test_grain_loader_over_webdataset(shards):
    from lvm_jax.data.pipeline import make_loader

    src = C.build_webdataset_source(_cfg(path=str(shards / "00001.tar"), eval_path=str(shards / "00001.tar")))
    loader = make_loader(src, [DecodeImage("skip"), DropFailed()], batch_size=2, shuffle=False, num_epochs=1)
    batches = list(loader)
    assert [b["image"].shape for b in batches] == [(2, 8, 8, 3)] * 2
    assert list(batches[0]["caption"]) == ["caption 10", "caption 11"]
