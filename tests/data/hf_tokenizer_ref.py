#!/usr/bin/env python3
"""Reference ids from Hugging Face `tokenizers` for the C++ tokenizer tests.

    hf_tokenizer_ref.py OUTDIR              trains several byte-level BPE tokenizers on a corpus
                                            with non-ASCII text, emoji, long numbers and
                                            whitespace runs; writes OUTDIR/<name>/tokenizer.json
                                            and OUTDIR/<name>/cases.json
    hf_tokenizer_ref.py --cases TOKENIZER OUT.json TEXTFILE
                                            reference ids of TEXTFILE's lines (and the whole
                                            file) under an existing tokenizer.json

cases.json: {"roundtrip": bool, "cases": [{"text_hex", "ids", "decoded_hex"}]}; texts travel as
hex so no JSON string escaping can differ between the two sides.
Exit status 3 when the tokenizers package is not importable (the C++ test then skips).
"""
import json
import os
import random
import sys

try:
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers, Regex
    from tokenizers import AddedToken
except ImportError:
    print("the Python package 'tokenizers' is not importable", file=sys.stderr)
    sys.exit(3)

# Text the tokenizers are trained on and tested with: several scripts, emoji (with ZWJ
# sequences, skin tones, flags), digits, contractions, and unusual whitespace.
FRAGMENTS = [
    "The quick brown fox jumps over the lazy dog.", "I'm sure they'll say we've done it, isn't it?",
    "Größenwahn und Übermut: Straße, Bäume, Öl.", "Ça coûte 12,50 € — très cher, n'est-ce pas?",
    "Съешь же ещё этих мягких французских булок, да выпей чаю.", "Γειά σου Κόσμε· καλημέρα!",
    "我能吞下玻璃而不伤身体。", "日本語のテキスト、カタカナとひらがな。", "مرحبا بالعالم", "नमस्ते दुनिया",
    "한국어 문장입니다.", "emoji 😀😃 🎉🎉🎉 👩‍👩‍👧‍👦 👍🏽 🇩🇪🇯🇵 ❤️", "123456789012345678901234567890",
    "3.14159265358979 and 2,718,281,828", "x=42;y=-7.5e-3", "tabs\there\t\tand\t\t\tthere",
    "spaces      in    a   row", "\n\n\nnew lines\n \n", "crlf\r\nline\r\n", "nbsp\u00a0here",
    "ideographic\u3000space", "nel\u0085char", "zero\u200bwidth", "  leading and trailing  ",
    "camelCaseWords and snake_case_words", "URL https://example.com/a?b=c&d=e#f", "$$$ %%% ^^^ ***",
    "’curly’ “quotes” «guillemets»", "ﬁ ligature and Å vs Å", "a\u0301 combining", "ÀÉÎÕÜ àéîõü",
    "line\u2028sep", "mongolian\u180evowel", "fs\x1cgs\x1drs\x1e", "vt\x0bff\x0c", " \u0085\u0085 x",
]
SPECIAL = ["<|endoftext|>", "<pad>"]


def corpus(seed=1, n=400):
    rng = random.Random(seed)
    lines = list(FRAGMENTS)
    for _ in range(n):
        k = rng.randint(1, 4)
        lines.append((" " * rng.randint(0, 2)).join(rng.choice(FRAGMENTS) for _ in range(k)))
    return lines


def test_texts(seed=2, n=250):
    rng = random.Random(seed)
    texts = list(FRAGMENTS) + ["", " ", "  ", "\t", "a", " a", "<|endoftext|>",
                               "hello<|endoftext|>world", "x <|endoftext|> y", "<pad><pad>",
                               "a <mask> b", "a<mask>b", "word<mask>", "<mask>", "  <mask>  ",
                               "sep|sep", "||", "don't", "DON'T", "It'S", "9" * 40, " " * 17,
                               "\n" * 9, " \u0085 ", "\u0085\u0085x"]
    alphabet = "".join(FRAGMENTS) + "".join(SPECIAL) + "<mask>" + " \t\n"
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 6)):
            r = rng.random()
            if r < 0.5:
                parts.append(rng.choice(FRAGMENTS))
            elif r < 0.6:
                parts.append(rng.choice(SPECIAL + ["<mask>"]))
            elif r < 0.7:
                parts.append(rng.choice([" ", "\t", "\n", "\u00a0", "\u3000"]) * rng.randint(1, 8))
            elif r < 0.8:
                parts.append(str(rng.randint(0, 10 ** rng.randint(1, 25))))
            else:
                parts.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))))
        texts.append((" " * rng.randint(0, 1)).join(parts))
    return texts


def train(pre, vocab_size=700, lines=None):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(lines or corpus(), trainer)
    return tok


LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def variants():
    """(name, tokenizer, edit of the saved JSON or None, round trip expected)."""
    out = []
    out.append(("gpt2", train(pre_tokenizers.ByteLevel(add_prefix_space=False)), None, True))

    def legacy_merges(j):  # the older "a b" string form of the merges
        j["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m for m in j["model"]["merges"]]
    out.append(("gpt2_legacy_merges", train(pre_tokenizers.ByteLevel(add_prefix_space=False)),
                legacy_merges, True))
    out.append(("prefix_space", train(pre_tokenizers.ByteLevel(add_prefix_space=True)), None, False))
    out.append(("no_regex", train(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                                  vocab_size=500), None, True))
    # Added tokens: a special one that eats the spaces around it (RoBERTa's <mask>), a
    # non-special normalized one, and a single_word one.
    t = train(pre_tokenizers.ByteLevel(add_prefix_space=False))
    t.add_special_tokens([AddedToken("<mask>", lstrip=True, rstrip=True, normalized=False)])
    t.add_tokens([AddedToken("sep|", normalized=True), AddedToken("ald", single_word=True)])
    out.append(("added_tokens", t, None, False))
    seq = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3), behavior="isolated"),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    out.append(("llama3_split", train(seq), None, True))

    def ignore_merges(j):
        j["model"]["ignore_merges"] = True
    out.append(("llama3_ignore_merges", train(seq), ignore_merges, True))
    return out


def case(tok, text):
    ids = tok.encode(text, add_special_tokens=False).ids
    return {"text_hex": text.encode("utf-8").hex(), "ids": ids,
            "decoded_hex": tok.decode(ids).encode("utf-8").hex()}


def write_variant(outdir, name, tok, edit, roundtrip, texts):
    d = os.path.join(outdir, name)
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, "tokenizer.json")
    tok.save(path)
    if edit:
        with open(path, encoding="utf-8") as f:
            j = json.load(f)
        edit(j)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(j, f, ensure_ascii=False)
        tok = Tokenizer.from_file(path)  # the references come from the edited file
    with open(os.path.join(d, "cases.json"), "w") as f:
        json.dump({"roundtrip": roundtrip, "cases": [case(tok, t) for t in texts]}, f)


def main():
    if len(sys.argv) == 5 and sys.argv[1] == "--cases":
        tok = Tokenizer.from_file(sys.argv[2])
        with open(sys.argv[4], encoding="utf-8") as f:
            whole = f.read()
        texts = [l for l in whole.split("\n") if l] + [whole]
        with open(sys.argv[3], "w") as f:
            json.dump({"roundtrip": True, "cases": [case(tok, t) for t in texts]}, f)
        return
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    texts = test_texts()
    for name, tok, edit, roundtrip in variants():
        write_variant(sys.argv[1], name, tok, edit, roundtrip, texts)


if __name__ == "__main__":
    main()
