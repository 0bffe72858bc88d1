"""Edge cases of the caption-file and webdataset sources (audit s16 B2-B6, B10, B11), on tiny temp files."""
import csv
import hashlib
import json
import os
import resource

import ml_collections
import pytest

from lvm_jax.data import captions as C
from tests.test_captions import _write_shard


def _cfg(**kw):
    return ml_collections.ConfigDict(dict(dict(decode_errors="skip", holdout_fraction=0.1, holdout_seed=0), **kw))


def _images(tmp_path, n=5):
    (tmp_path / "img").mkdir(exist_ok=True)
    for i in range(n):
        (tmp_path / "img" / f"{i}.png").write_bytes(b"png%d" % i)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# ---------------------------------------------------------------- B2: one fd per shard, never closed
@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_webdataset_keeps_a_bounded_number_of_shard_files_open(tmp_path, monkeypatch):
    n = 60
    for i in range(n):
        _write_shard(tmp_path / f"{i:05d}.tar", [(f"k{i}", {"jpg": b"img%d" % i, "txt": b"caption %d" % i})])
    src = C.build_webdataset_source(_cfg(path=str(tmp_path / "*.tar"), eval_path=str(tmp_path / "*.tar")))
    monkeypatch.setattr(C, "MAX_OPEN_SHARDS", 8, raising=False)
    before = _open_fds()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Fewer free descriptors than shards: the old code ran out and silently read empty images.
    resource.setrlimit(resource.RLIMIT_NOFILE, (before + 20, hard))
    try:
        images = [src[i]["image"] for i in range(len(src))]
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    held = _open_fds() - before
    assert sorted(images) == sorted(b"img%d" % i for i in range(n))
    assert held <= 8
    if hasattr(src, "close"):
        src.close()
        assert _open_fds() <= before


# ---------------------------------------------------------------- B3: a glob part matching nothing
def test_a_shard_glob_part_that_matches_nothing_is_refused(tmp_path):
    (tmp_path / "laion").mkdir()
    _write_shard(tmp_path / "laion" / "00000.tar", [("k", {"jpg": b"i", "txt": b"c"})])
    pattern = f"{tmp_path}/laion/*.tar,{tmp_path}/cc21m/*.tar"
    with pytest.raises(ValueError, match=r"cc21m/\*\.tar' in data.path matches no shard files"):
        C.build_webdataset_source(_cfg(path=pattern, eval_path=pattern))


# ---------------------------------------------------------------- B5: a missing caption field
def test_missing_caption_field_is_a_malformed_row_not_an_empty_caption(tmp_path):
    _images(tmp_path)
    path = tmp_path / "c.jsonl"
    path.write_text('{"image": "img/0.png", "text": "wrong key"}\n{"image": "img/1.png", "caption": "ok"}\n')
    with pytest.raises(ValueError, match=r"c.jsonl:1: no caption in column 'caption'"):
        C.build_captions_source(_cfg(path=str(path), eval_path=str(path), decode_errors="raise"))
    src = C.build_captions_source(_cfg(path=str(path), eval_path=str(path)))
    assert src.captions == ["ok"] and src.skipped == {"malformed_row": 1}

    short = tmp_path / "c.csv"
    short.write_text("filepath,title\nimg/0.png,fine\nimg/1.png\n")
    with pytest.raises(ValueError, match=r"c.csv:3: no caption in column 'title'"):
        C.build_captions_source(_cfg(path=str(short), eval_path=str(short), decode_errors="raise"))
    src = C.build_captions_source(_cfg(path=str(short), eval_path=str(short)))
    assert src.captions == ["fine"] and src.skipped == {"malformed_row": 1}


def test_webdataset_json_without_caption_raises_under_raise(tmp_path):
    _write_shard(tmp_path / "s.tar", [("a", {"jpg": b"i", "json": b'{"text": "no caption key"}'}),
                                      ("b", {"jpg": b"i", "json": b'{"caption": "ok"}'})])
    with pytest.raises(ValueError, match="'a' in .*s.tar' has no text 'caption' field"):
        C.build_webdataset_source(_cfg(path=str(tmp_path / "s.tar"), decode_errors="raise"))
    src = C.build_webdataset_source(_cfg(path=str(tmp_path / "s.tar"), eval_path=str(tmp_path / "s.tar")))
    assert src.captions == ["ok"] and src.skipped == {"no_caption": 1}


# ---------------------------------------------------------------- B4: TSV quoting, csv errors, line numbers
def test_unquoted_tsv_keeps_quotes_and_every_row(tmp_path):
    _images(tmp_path)
    captions = ["first", '"Best coffee in town', '"quoted" word', "fourth", "fifth"]
    path = tmp_path / "c.tsv"
    path.write_text("filepath\ttitle\n" + "".join(f"img/{i}.png\t{c}\n" for i, c in enumerate(captions)))
    src = C.build_captions_source(_cfg(path=str(path), eval_path=str(path)))
    assert src.captions == captions and not src.skipped


def test_csv_line_numbers_after_a_multiline_record_and_csv_errors(tmp_path, monkeypatch):
    _images(tmp_path)
    path = tmp_path / "c.csv"
    path.write_text('filepath,title\nimg/0.png,"two\nlines"\n,no image\n')
    with pytest.raises(ValueError, match=r"c.csv:4: no image path"):
        C.build_captions_source(_cfg(path=str(path), eval_path=str(path), decode_errors="raise"))
    path.write_text('filepath,title\nimg/0.png,ok\nimg/1.png,"an unclosed quote and a long tail\n'
                    + "img/2.png,x\n" * 50)
    limit = csv.field_size_limit()
    try:
        csv.field_size_limit(100)
        with pytest.raises(ValueError, match=r"c.csv:3: cannot be parsed as CSV .*unclosed quote"):
            C.build_captions_source(_cfg(path=str(path), eval_path=str(path)))
    finally:
        csv.field_size_limit(limit)


# ---------------------------------------------------------------- B6: index tmp name shared by equal PIDs
def test_index_cache_temp_name_is_unique_beyond_the_pid(tmp_path, monkeypatch):
    shard = tmp_path / "s.tar"
    _write_shard(shard, [("a", {"jpg": b"i", "txt": b"c"})])
    index_dir = tmp_path / "index"
    index_dir.mkdir()
    monkeypatch.setattr(os, "getpid", lambda: 4242)
    tag = C._index_tag(str(shard), "skip")
    # Another host with the same PID is writing this very name right now (stand-in: it exists as a folder).
    (index_dir / f"{tag}.json.4242.tmp").mkdir()
    samples, skipped = C._cached_index(str(shard), "skip", str(index_dir))
    assert [s[0] for s in samples] == ["a"] and not skipped
    assert json.loads((index_dir / f"{tag}.json").read_text())["samples"][0][0] == "a"
    assert sorted(os.listdir(index_dir)) == sorted([f"{tag}.json", f"{tag}.json.4242.tmp"])


# ---------------------------------------------------------------- B10: image paths are normalised
def test_spellings_of_one_image_path_are_one_image(tmp_path):
    _images(tmp_path, 10)
    rows = []
    for i in range(10):
        for spelling in (f"img/{i}.png", f"./img/{i}.png", f"img//{i}.png", str(tmp_path / "img" / f"{i}.png")):
            rows.append({"image": spelling, "caption": f"{spelling} caption"})
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _cfg(path=str(path), holdout_fraction=0.3)
    train, held = C.build_captions_source(cfg, "train"), C.build_captions_source(cfg, "eval")
    assert len(set(train.image_keys) | set(held.image_keys)) == 10
    assert not set(train.image_keys) & set(held.image_keys)
    assert len(held) == 4 * 3


# ---------------------------------------------------------------- B11: clear errors at build time
def test_json_array_caption_file_gets_a_clear_error(tmp_path):
    _images(tmp_path)
    rows = [{"image": f"img/{i}.png", "caption": f"c{i}"} for i in range(3)]
    for name, text in (("one_line.json", json.dumps(rows)), ("pretty.json", json.dumps(rows, indent=1)),
                       ("pretty_dict.json", json.dumps({"annotations": rows}, indent=1))):
        (tmp_path / name).write_text(text)
        for policy in ("skip", "raise"):
            with pytest.raises(ValueError, match="caption files are JSON Lines"):
                C.build_captions_source(_cfg(path=str(tmp_path / name), eval_path=str(tmp_path / name),
                                             decode_errors=policy))


def test_http_image_urls_are_refused_when_the_source_is_built(tmp_path):
    path = tmp_path / "cc.csv"
    path.write_text("url,caption\nhttps://example.com/a.jpg,a dog\nhttps://example.com/b.jpg,a cat\n")
    with pytest.raises(ValueError, match=r"cc.csv:2: image 'https://example.com/a.jpg' is a https:// URL.*download"):
        C.build_captions_source(_cfg(path=str(path), eval_path=str(path), image_column="url",
                                     caption_column="caption"))


# ---------------------------------------------------------------- s16 DIFF 8: index caches of another indexer
def test_index_caches_of_another_indexer_version_are_not_read(tmp_path, monkeypatch):
    shard = tmp_path / "s.tar"
    _write_shard(shard, [("a", {"jpg": b"i", "txt": b"the real caption"})])
    index_dir = tmp_path / "index"
    index_dir.mkdir()
    stale = {"samples": [["a", 0, 1, "what an old indexer got wrong"]], "skipped": {}}
    # A cache written before index files carried a version (its name hashed the shard and policy only) ...
    old_tag = hashlib.sha1(f"{C.files.fingerprint(str(shard))}|skip".encode()).hexdigest()
    (index_dir / f"{old_tag}.json").write_text(json.dumps(stale))
    cfg = _cfg(path=str(shard), eval_path=str(shard), index_dir=str(index_dir))
    assert C.build_webdataset_source(cfg).captions == ["the real caption"]
    # ... and one written by another version of the indexer are both rebuilt, not read.
    for cache in index_dir.iterdir():
        cache.unlink()
    monkeypatch.setattr(C, "INDEX_FORMAT", C.INDEX_FORMAT + 1)
    (index_dir / f"{C._index_tag(str(shard), 'skip')}.json").write_text(json.dumps(stale))
    monkeypatch.undo()
    assert C.build_webdataset_source(cfg).captions == ["the real caption"]
    assert len(list(index_dir.iterdir())) == 2  # the current version's index was written beside it


# ---------------------------------------------------------------- s16 DIFF 16: padded image paths
def test_image_paths_with_surrounding_whitespace_name_the_file(tmp_path):
    _images(tmp_path, 3)
    (tmp_path / "c.csv").write_text('filepath,title\n img/0.png,  a padded caption \nimg/1.png\t ,b\n'
                                    '"  img/2.png ",c\n')
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"image": f" img/{i}.png\n", "caption": " x "}) + "\n"
                                              for i in range(3)))
    for name in ("c.csv", "c.jsonl"):
        src = C.build_captions_source(_cfg(path=str(tmp_path / name), eval_path=str(tmp_path / name),
                                           decode_errors="raise"))
        assert src.image_paths == [str(tmp_path / "img" / f"{i}.png") for i in range(3)]
        assert [src[i]["image"] for i in range(3)] == [b"png%d" % i for i in range(3)]
    assert src.captions[0] == " x "  # the caption text is kept as written
    (tmp_path / "blank.csv").write_text("filepath,title\n   ,a caption\n")
    with pytest.raises(ValueError, match=r"blank.csv:2: no image path"):
        C.build_captions_source(_cfg(path=str(tmp_path / "blank.csv"), decode_errors="raise"))


# ---------------------------------------------------------------- s16 DIFF 10: too few images to hold out
def test_a_hold_out_from_one_image_names_the_cause(tmp_path):
    _images(tmp_path, 1)
    path = tmp_path / "one.jsonl"
    path.write_text("".join(json.dumps({"image": "img/0.png", "caption": f"caption {i}"}) + "\n" for i in range(3)))
    assert len(C.build_captions_source(_cfg(path=str(path)), "train")) == 3
    with pytest.raises(ValueError, match=r"one.jsonl' holds 1 distinct image\(s\), too few .* at least 2.*"
                                         r"eval split is empty; add images, or set data.eval_path"):
        C.build_captions_source(_cfg(path=str(path)), "eval")
    _write_shard(tmp_path / "one.tar", [("a", {"jpg": b"i", "txt": b"c"})])
    with pytest.raises(ValueError, match=r"one.tar' holds 1 distinct image\(s\), too few"):
        C.build_webdataset_source(_cfg(path=str(tmp_path / "one.tar")), "eval")


def test_a_failing_shard_under_raise_stops_the_scan_of_the_queued_shards(tmp_path, monkeypatch):
    shards = [str(tmp_path / f"{i:05d}.tar") for i in range(40)]
    scanned = []

    def index_shard(path, errors="skip"):
        scanned.append(path)
        if path == shards[0]:
            raise ValueError(f"{path}: a corrupt header")
        return [("k", 0, 1, "a caption")], {}

    monkeypatch.setattr(C, "index_shard", index_shard)
    with pytest.raises(ValueError, match="a corrupt header"):
        C.WebDatasetSource(shards, errors="raise", num_threads=1)
    # The error used to surface only after all 40 shards were scanned (thousands in a bucket).
    assert len(scanned) <= 2
