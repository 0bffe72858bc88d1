"""Writes tests/fixtures/tokenizer_golden.json.gz: varied captions and open_clip's CLIP token ids.

Run (needs open_clip_torch, i.e. torch):
    .venv/bin/python scripts/make_tokenizer_golden.py
It also copies open_clip's bpe_simple_vocab_16e6.txt.gz (MIT, OpenAI CLIP) into tests/fixtures/.
The captions are generated from a fixed seed, so the file is reproducible.
"""
import gzip
import json
import os
import random
import shutil

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")

WORDS = ("a photo of the dog cat bird car tree house person people man woman child red blue green "
         "big small old new sitting standing running on in under near with and playing food plate "
         "table street city beach mountain sky water boat train bus bicycle horse sheep cow elephant "
         "zebra giraffe umbrella kite pizza sandwich banana apple orange laptop phone book clock vase "
         "isn't don't it's we're they've I'm you'll he'd").split()
UNICODE = ["café", "naïve", "Straße", "ΟΔΟΣ", "Ελληνικά", "İstanbul", "ı", "Русский", "日本語のテキスト",
           "中文字符", "한국어", "العربية", "עברית", "हिन्दी", "ไทย", "ﬁnance", "ＦＵＬＬ　ｗｉｄｔｈ", "Ⅻ",
           "①②③", "x²", "½", "µm", "Å", "e\u0301", "ǅ", "ſ", "'ſ", "K", "ﬅ", "\u200b", "\u00a0",
           "\u2028", "\u3000", "“curly”", "‘single’", "—", "…", "«guillemets»", "™", "©", "€100",
           "Ã©", "Ã¨", "â€™", "â€œmojibakeâ€\x9d", "\ufeffbom", "\x00nul", "\x1b[31mred\x1b[0m"]
EMOJI = ["😀", "🐶", "🚗", "👍🏽", "👨‍👩‍👧", "🇫🇷", "❤️", "🔥🔥🔥", ":)", "¯\\_(ツ)_/¯"]
HTML = ["&amp;", "&amp;amp;", "&lt;b&gt;", "&quot;", "&#39;", "&#x27;", "&nbsp;", "&eacute;", "&copy;",
        "&unknown;", "&", "AT&T", "<br/>", "<i>it</i>", "&#128512;"]
SPACE = [" ", "  ", "\t", "\n", "\r\n", " \x0b ", "\x0c"]
PUNCT = [".", ",", "!", "?", "...", "'", "\"", "-", "_", "(", ")", "#", "@", "$", "%", "+", "=", "/", "\\", "~"]
SPECIAL = ["<start_of_text>", "<end_of_text>", "<END_OF_TEXT>", "<<end_of_text>", "_<start_of_text>",
           "x<end_of_text>y"]


def caption(rng: random.Random) -> str:
    kind = rng.random()
    n = rng.choice([0, 1, 2, 3, 5, 8, 12, 20]) if kind < 0.9 else rng.randint(60, 200)  # some very long
    parts = []
    for _ in range(n):
        r = rng.random()
        if r < 0.55:
            w = rng.choice(WORDS)
            parts.append(w.upper() if rng.random() < 0.1 else w.capitalize() if rng.random() < 0.2 else w)
        elif r < 0.68:
            parts.append(rng.choice(UNICODE))
        elif r < 0.76:
            parts.append(rng.choice(EMOJI))
        elif r < 0.84:
            parts.append(rng.choice(HTML))
        elif r < 0.93:
            parts.append(rng.choice(PUNCT))
        elif r < 0.98:
            parts.append(str(rng.randint(0, 10 ** rng.randint(1, 7))))
        else:
            parts.append(rng.choice(SPECIAL))
    text = ""
    for p in parts:
        text += p + (rng.choice(SPACE) if rng.random() < 0.2 else "" if rng.random() < 0.1 else " ")
    return text


def captions(n: int = 1200, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    fixed = ["", " ", "\n\t ", "a", "A photo of a dog.", "x" * 1000, "word " * 100,
             "😀" * 100, "&amp;" * 50, "é" * 200]
    # Codepoints from many Unicode blocks (letters, numbers, symbols, combining marks).
    for start in range(0xA0, 0x30000, 0x400):
        fixed.append("".join(chr(c) for c in range(start, start + 24)
                             if not 0xD800 <= c <= 0xDFFF))
    return fixed + [caption(rng) for _ in range(n)]


def main() -> None:
    from open_clip.tokenizer import SimpleTokenizer, default_bpe

    os.makedirs(FIXTURES, exist_ok=True)
    shutil.copyfile(default_bpe(), os.path.join(FIXTURES, "bpe_simple_vocab_16e6.txt.gz"))
    tok = SimpleTokenizer()
    texts = captions()
    rows = []
    for text in texts:
        ids = tok([text], context_length=77)[0].tolist()
        while ids and ids[-1] == 0:
            ids.pop()
        rows.append({"text": text, "ids": ids})
    with gzip.open(os.path.join(FIXTURES, "tokenizer_golden.json.gz"), "wt", encoding="utf-8") as f:
        json.dump({"context_length": 77, "source": "open_clip.tokenizer.SimpleTokenizer", "rows": rows}, f)
    print(f"wrote {len(rows)} captions")


if __name__ == "__main__":
    main()
