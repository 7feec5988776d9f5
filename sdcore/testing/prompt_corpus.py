"""The tokenizer tests' prompt corpus: seeded, stdlib only, deterministic (tools/make_prompt_corpus.py
writes it and its reference ids; tests/test_tokenizer.py and tools/bench_tokenizer.py read it).

The corpus mixes what Stable Diffusion users type (subjects, styles, made-up artist names, quality
tags, camera terms, A1111 weighting and LoRA syntax) with what tends to break tokenizers: accents,
CJK, emoji with ZWJ and skin tones, curly quotes, HTML entities (also double-escaped), numbers,
runs of punctuation and odd whitespace, control characters, mojibake that ftfy repairs, special
token strings, the empty string and prompts far over 77 tokens. One JSON string per line.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

# The files live in the source tree's tests/data: the tests and tools that use them run from a checkout.
DATA = Path(__file__).resolve().parents[2] / "tests" / "data"
CORPUS = DATA / "prompts.jsonl"
GOLDEN = DATA / "prompts_golden.txt"
SEED = 20240601
NUM_PROMPTS = 6000

SUBJECTS = [
    "a cat", "an astronaut riding a horse", "portrait of a young woman", "an old fisherman", "a red fox",
    "a cyberpunk city", "a medieval castle", "a bowl of ramen", "a lighthouse in a storm", "a dragon",
    "a steampunk airship", "a cozy cabin in the woods", "a samurai", "a robot barista", "a waterfall",
    "a vintage car", "an owl wearing glasses", "a futuristic motorcycle", "a field of sunflowers",
    "a knight in shining armor", "a wizard's tower", "a koi pond", "a girl with a pearl earring",
    "a mountain landscape", "a corgi puppy", "an abandoned space station", "a neon-lit alley",
    "a still life with fruit", "a portrait of an elf", "a victorian mansion", "a desert oasis",
    "an underwater coral reef", "a hot air balloon", "a teddy bear", "a viking longship", "a tiger",
    "an ice cream cone", "a snowy village", "a treehouse", "a jellyfish", "a phoenix", "a library",
]
SETTINGS = [
    "at sunset", "in the rain", "on mars", "in a forest", "at night", "under the sea", "in tokyo",
    "on a beach", "in space", "in a snowstorm", "at golden hour", "in a misty valley", "indoors",
    "on the moon", "in a field", "by candlelight", "during a thunderstorm", "in the clouds",
]
STYLES = [
    "oil painting", "watercolor", "digital art", "concept art", "anime style", "studio ghibli style",
    "pixel art", "3d render", "octane render", "unreal engine 5", "photorealistic", "hyperrealistic",
    "art nouveau", "ukiyo-e", "impressionism", "cubism", "low poly", "vaporwave", "synthwave",
    "charcoal sketch", "ink drawing", "matte painting", "cel shading", "trending on artstation",
    "baroque", "pop art", "isometric", "claymation", "double exposure", "tilt-shift",
]
FIRST_NAMES = ["alex", "greta", "ivan", "mara", "theo", "yuki", "lena", "omar", "sofia", "kai", "noor", "pieter"]
LAST_NAMES = ["rutkowsky", "mucharova", "van der berg", "okonkwo", "delacroix", "takahara", "o'brien",
              "mcallister", "de la cruz", "lindqvist", "nakamura-smith", "beaumont"]
QUALITY = [
    "masterpiece", "best quality", "ultra detailed", "highly detailed", "8k", "4k", "uhd", "hdr",
    "sharp focus", "intricate", "award winning", "high resolution", "absurdres", "extremely detailed cg",
]
NEGATIVE = [
    "lowres", "bad anatomy", "bad hands", "text", "error", "missing fingers", "extra digit",
    "fewer digits", "cropped", "worst quality", "low quality", "jpeg artifacts", "signature",
    "watermark", "username", "blurry", "deformed", "disfigured", "mutated", "ugly", "duplicate",
]
CAMERA = [
    "35mm", "50mm lens", "85mm f/1.4", "f/1.8", "bokeh", "depth of field", "wide angle", "macro",
    "telephoto", "canon eos 5d", "nikon d850", "sony a7r iv", "kodak portra 400", "fujifilm",
    "iso 100", "1/250s", "long exposure", "dslr", "film grain", "cinematic lighting", "rim light",
    "volumetric lighting", "soft light", "backlit", "ray tracing", "global illumination",
]
COLORS = ["red", "teal", "golden", "pastel", "monochrome", "vibrant", "muted", "neon", "sepia", "emerald"]

ACCENTED = ["café", "naïve", "Ångström", "Zürich", "São Paulo", "crème brûlée", "piñata", "Dvořák",
            "Łódź", "façade", "smörgåsbord", "jalapeño", "Straße", "ÉCOLE", "Øresund", "Kraków", "fiancée"]
CJK = ["日本の風景", "桜の木", "东京塔", "中国山水画", "한국어 프롬프트", "猫", "富士山", "漢字と かな と カナ",
       "水墨画", "夜景", "ｆｕｌｌｗｉｄｔｈ", "ﾊﾝｶｸ"]
OTHER_SCRIPTS = ["Москва зимой", "Ελληνικά ΟΔΟΣ", "ΣΊΣΥΦΟΣ", "İstanbul", "ISTANBUL ılık", "שלום",
                 "مرحبا بالعالم", "ภาษาไทย", "हिन्दी चित्र", "Việt Nam", "ქართული", "Ꭰ Cherokee"]
EMOJI = ["🐱", "🔥", "✨", "🌸", "🚀", "❤️", "❤", "👍🏽", "👩‍🚀", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇯🇵", "🇺🇸", "🧙🏿‍♂️",
         "😀😃😄", "🤖", "🌕", "☕", "⭐", "🫠", "👋🏻", "🧑🏾‍🎨", "🐈‍⬛", "1️⃣", "©️", "™"]
QUOTES = ["“quoted”", "‘single’", "it’s", "don’t", "„german“", "«french»", "‹angle›", "「japanese」",
          "—em dash—", "en–dash", "ellipsis…", "ﬁne ligature", "ﬂower", "½ cup", "²³", "№5", "°C", "•bullet"]
ENTITIES = ["&amp;", "&quot;", "&#39;", "&lt;", "&gt;", "&amp;amp;", "&amp;quot;", "&amp;#39;", "&#x27;",
            "&nbsp;", "&copy;", "&eacute;", "&hellip;", "&mdash;", "&#8220;", "&#x1F600;", "&lt;3",
            "&copy2024", "&not", "&amp", "R&D", "rock&notes", "salt & pepper", "&&", "& ", "&unknown;",
            "&amp;lt;lora&amp;gt;", "&#0;", "&#128512;"]
WHITESPACE = [" ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u2003", "\u3000", " \t \n ", "\u2028", "\u200b",
              "\ufeff", "\x0b", "\x0c", "\x85", "\u202f", "\u1680"]
CONTROL = ["\x00", "\x07", "\x1b[31m", "\x1b[0m", "\x7f", "\x81", "\x9d", "\x1c", "\x1f", "\u200d", "\u200e",
           "\ufffd", "\u0301", "\u0345", "\u034f"]
PUNCT = ["!!!", "???", "...", "!?!?", "--", "----------", "~~~", "***", "###", "___", ":::", ";;", "''", '""',
         "``", "(((", ")))", "[[[", "]]]", "{{}}", "|||", "///", "\\\\", "@@", "$$$", "%%", "^^", "+-+-", "=>",
         "<>", ",,,,", ". . .", "-_-", ":)", ";-)", "¯\\_(ツ)_/¯", "!", ",", "'s", "'S", "'ll", "'D"]
MOJIBAKE_SOURCES = ["café", "naïve", "“quoted”", "it’s", "Zürich", "crème brûlée", "—", "日本", "€100",
                    "Ångström", "señor", "über", "…", "déjà vu"]
SPECIAL_STRINGS = ["<|endoftext|>", "<|startoftext|>", "<|ENDOFTEXT|>", "<|EndOfText|>", "!<|endoftext|>",
                   "<|endoftext|>!", "a<|startoftext|>b", "<|endoftext", "|endoftext|>", "<|end of text|>", "wow!"]
MIXED_CASE = ["HeLLo WoRLD", "PHOTOREALISTIC", "iPhone 15 Pro", "McDonald's", "IT'S", "I'M", "WE'LL", "DON'T",
              "YOU'VE", "THEY'RE", "HE'D", "O'Neil", "LaTeX", "GoPro", "NASA", "DnD", "Pokémon", "ÉLAN"]


def _artist(rng: random.Random) -> str:
    name = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
    return rng.choice(["by ", "art by ", "in the style of ", ""]) + (name.title() if rng.random() < 0.3 else name)


def _number(rng: random.Random) -> str:
    kind = rng.randrange(8)
    if kind == 0:
        return f"{rng.uniform(0, 2):.{rng.randint(1, 3)}f}"
    if kind == 1:
        return str(rng.randint(0, 10**rng.randint(1, 9)))
    if kind == 2:
        return f"{rng.choice([512, 768, 1024, 1920])}x{rng.choice([512, 768, 1080])}"
    if kind == 3:
        return f"{rng.randint(1, 999):,}{rng.choice(['', ',000', '.5'])}"
    if kind == 4:
        return f"-{rng.uniform(0, 10):.2e}"
    if kind == 5:
        return rng.choice(["8k", "4k", "1080p", "3.14159", "007", "v1.5", "sd2.1", "42", "1e-3", "2024-06-01"])
    if kind == 6:
        return "".join(rng.choice("0123456789") for _ in range(rng.randint(5, 30)))
    return f"{rng.choice(['½', '٣', '४', '³', 'Ⅻ', '①', '１２３'])}{rng.randint(0, 9)}"


def _weighted(rng: random.Random, word: str) -> str:
    kind = rng.randrange(9)
    if kind == 0:
        return f"({word}:{rng.choice(['1.2', '0.8', '1.5', '1', '.5', '1.25', '2'])})"
    if kind == 1:
        return f"[{word}]"
    if kind == 2:
        return "(" * rng.randint(2, 4) + word + ")" * rng.randint(2, 4)
    if kind == 3:
        name = rng.choice(["detail_tweaker", "epiNoiseoffset_v2", "my-LoRA.v3", "style_01"])
        return f"<lora:{name}:{rng.choice(['0.8', '1', '-0.5', '0.65'])}>"
    if kind == 4:
        return f"[{word}:{rng.choice(SUBJECTS)}:{rng.choice(['0.5', '10', '0.25'])}]"
    if kind == 5:
        return f"{{{word}}}"
    if kind == 6:
        return f"\\({word}\\)"
    if kind == 7:
        return f"<hypernet:{rng.choice(['anime', 'incase'])}:{rng.choice(['1', '0.3'])}>"
    return f"{word} {rng.choice(['AND', 'BREAK'])}"


def _mojibake(rng: random.Random) -> str:
    text = rng.choice(MOJIBAKE_SOURCES)
    encoding = rng.choice(["cp1252", "latin-1", "cp1252"])
    try:
        return text.encode("utf-8").decode(encoding)
    except UnicodeDecodeError:
        return text.encode("utf-8").decode("latin-1")


def _tags(rng: random.Random, n: int) -> list[str]:
    pools = [SUBJECTS, SETTINGS, STYLES, QUALITY, CAMERA, NEGATIVE, COLORS]
    tags = []
    for _ in range(n):
        pool = rng.choice(pools)
        if pool is COLORS:
            tags.append(f"{rng.choice(COLORS)} {rng.choice(['hair', 'eyes', 'sky', 'palette'])}")
        else:
            tags.append(rng.choice(pool))
        if rng.random() < 0.1:
            tags.append(_artist(rng))
    return tags


def _typical(rng: random.Random) -> str:
    parts = [f"{rng.choice(SUBJECTS)} {rng.choice(SETTINGS)}"] + _tags(rng, rng.randint(1, 10))
    if rng.random() < 0.5:
        parts.insert(rng.randint(1, len(parts)), _artist(rng))
    text = rng.choice([", ", ",", " , ", " "]).join(parts)
    return text.capitalize() if rng.random() < 0.3 else text


def _a1111(rng: random.Random) -> str:
    parts = _tags(rng, rng.randint(2, 12))
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(parts))
        parts[i] = _weighted(rng, parts[i])
    return ", ".join(parts)


def _junk(rng: random.Random) -> str:
    """Random code points from many blocks, to reach corners no list above covers."""
    ranges = [(0x20, 0x7E), (0xA0, 0x24F), (0x300, 0x36F), (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x6FF),
              (0x900, 0x97F), (0xE00, 0xE7F), (0x1E00, 0x1EFF), (0x2000, 0x206F), (0x2100, 0x27BF),
              (0x3000, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0xFB00, 0xFB4F), (0xFE00, 0xFE0F),
              (0xFF00, 0xFFEF), (0x1F300, 0x1FAFF), (0x1D400, 0x1D7FF), (0x20000, 0x2000F)]
    chars = []
    for _ in range(rng.randint(1, 40)):
        lo, hi = rng.choice(ranges)
        chars.append(chr(rng.randint(lo, hi)))
    return "".join(chars)


def _mix(rng: random.Random) -> str:
    """A typical prompt with oddities spliced in at random places."""
    pools = [ACCENTED, CJK, OTHER_SCRIPTS, EMOJI, QUOTES, ENTITIES, WHITESPACE, CONTROL, PUNCT, SPECIAL_STRINGS,
             MIXED_CASE]
    words = _typical(rng).split(" ")
    for _ in range(rng.randint(1, 6)):
        kind = rng.randrange(len(pools) + 2)
        if kind < len(pools):
            insert = rng.choice(pools[kind])
        else:
            insert = _number(rng) if kind == len(pools) else _mojibake(rng)
        i = rng.randint(0, len(words))
        words[i:i] = [insert] if rng.random() < 0.5 else [insert + rng.choice(words or [""])]
    return rng.choice([" ", "", "  "]).join(words)


def _long(rng: random.Random) -> str:
    """Far over the 77-token window: 40 to 150 tags, sometimes with weights and oddities."""
    parts = _tags(rng, rng.randint(40, 150))
    for _ in range(rng.randint(0, 8)):
        i = rng.randrange(len(parts))
        parts[i] = _weighted(rng, parts[i]) if rng.random() < 0.7 else _mix(rng)
    return ", ".join(parts)


def _whitespace_and_punct(rng: random.Random) -> str:
    pieces = []
    for _ in range(rng.randint(1, 12)):
        pool = rng.choice([WHITESPACE, PUNCT, WHITESPACE, ["a", "cat", "8k", "(", ")", ":1.2"]])
        pieces.append(rng.choice(pool) * rng.choice([1, 1, 2, 5, 20]))
    return "".join(pieces)


FIXED = [
    "", " ", "\t\n", "a", "A", "!", "!!", ",", "0", "1.5", "<|endoftext|>", "<|startoftext|>", "&amp;",
    "a photo of an astronaut riding a horse on mars",
    "A photo of an astronaut riding a horse on Mars.",
    "masterpiece, best quality, (ultra detailed:1.2), [blurry], ((sharp focus)), <lora:detail:0.8>",
    "Tom &amp; Jerry &quot;cartoon&quot; it&#39;s &amp;amp; double-escaped",
    "<lora:x:1> Tom &amp; Jerry",
    "Über café — “quotes” ‘single’ … ﬁne",
    "cafÃ© naÃ¯ve â€œquotedâ€\x9d",
    "日本の風景, 桜, 富士山 🗻 👩‍🚀 👍🏽 🇯🇵",
    "ΟΔΟΣ ΣΊΣΥΦΟΣ İstanbul STRASSE Straße",
    "tabs\tand\nnewlines\r\nand\u00a0nbsp\u3000ideographic",
    "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!",
    "wow! such prompt!! very token!!!",
    "IT'S A DOG'S LIFE, WE'LL SEE, I'M HERE, THEY'VE GONE, YOU'D KNOW",
    ", ".join(["a tag"] * 80),
    " ".join(str(i) for i in range(200)),
]


def make_corpus(seed: int = SEED, n: int = NUM_PROMPTS) -> list[str]:
    rng = random.Random(seed)
    makers = [(_typical, 30), (_a1111, 20), (_mix, 25), (_long, 7), (_whitespace_and_punct, 6), (_junk, 7),
              (_number, 2), (_mojibake, 3)]
    funcs = [f for f, w in makers for _ in range(w)]
    prompts = list(FIXED)
    while len(prompts) < n:
        prompts.append(rng.choice(funcs)(rng))
    # Lone surrogates cannot be UTF-8 encoded by any tokenizer; none of the generators makes them.
    assert all(p.encode("utf-8", errors="strict") is not None for p in prompts)
    return prompts


def write_corpus(path: Path = CORPUS) -> list[str]:
    prompts = make_corpus()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for p in prompts:
            # ensure_ascii keeps every line plain ASCII: no stray U+2028 or NEL can split a line.
            f.write(json.dumps(p) + "\n")
    return prompts


def read_corpus(path: Path = CORPUS) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f.read().split("\n") if line]


def ids_digest(ids) -> str:
    """12 hex digits of the SHA-1 of the ids written as decimal numbers joined by commas."""
    return hashlib.sha1(",".join(str(int(i)) for i in ids).encode()).hexdigest()[:12]
