#!/usr/bin/env bash
# Builds a real training corpus from text that ships in Debian packages (/usr/share/doc and
# /usr/share/common-licenses: READMEs, copyright files, NEWS, plain-text manuals), so it needs no
# download: gathers the text files (binary and non-UTF-8 ones skipped, duplicates removed, in a
# seeded random order so the held-out tail is a sample of packages), trains a byte-level BPE
# tokenizer.json on it with Hugging Face `tokenizers` (pip-installed when missing), and
# tokenizes it with `ssdtrain tokenize`. configs/corpus-small.yaml trains on the result.
#
#   scripts/prepare_corpus.sh            -> data/corpora/debian-doc/{text.jsonl,tokenizer.json,
#                                           debian-doc.bin,debian-doc.idx}
# Environment: CORPUS_DIR (output folder), CORPUS_MAX_MB (text to gather, default 24),
# CORPUS_VOCAB (tokenizer size, default 4096), SSD_BUILD_DIR (where ssdtrain is built).
# The text differs between machines with different packages installed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${CORPUS_DIR:-$root/data/corpora/debian-doc}"
max_mb="${CORPUS_MAX_MB:-24}"
vocab="${CORPUS_VOCAB:-4096}"
build="${SSD_BUILD_DIR:-$root/build}"
[[ "$build" = /* ]] || build="$root/$build"

if [ ! -x "$build/ssdtrain" ]; then
  echo "prepare_corpus: building ssdtrain into $build"
  SSD_BUILD_DIR="$build" "$root/scripts/build.sh"
fi
if ! python3 -c "import tokenizers" >/dev/null 2>&1; then
  echo "prepare_corpus: installing the Python package 'tokenizers'"
  python3 -m pip install -q tokenizers
fi
mkdir -p "$out"

echo "prepare_corpus: gathering up to $max_mb MB of text from /usr/share/doc and /usr/share/common-licenses"
python3 - "$out/text.jsonl" "$max_mb" <<'PY'
import hashlib, json, os, random, sys
out, max_bytes = sys.argv[1], int(float(sys.argv[2]) * 1e6)
skip_ext = {".gz", ".xz", ".bz2", ".zst", ".png", ".jpg", ".gif", ".svg", ".pdf", ".ico", ".woff",
            ".ttf", ".js", ".css", ".html", ".htm", ".json", ".xml"}
paths = []
for top in ("/usr/share/doc", "/usr/share/common-licenses"):
    for d, _, files in os.walk(top):
        for f in files:
            p = os.path.join(d, f)
            if os.path.islink(p) or os.path.splitext(f)[1].lower() in skip_ext:
                continue
            paths.append(p)
paths.sort()
random.Random(1234).shuffle(paths)  # a seeded order: the held-out tail samples all packages
seen, total, docs = set(), 0, 0
with open(out + ".tmp", "w", encoding="utf-8") as w:
    for p in paths:
        try:
            raw = open(p, "rb").read()
        except OSError:
            continue
        if len(raw) < 200 or b"\0" in raw:
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        h = hashlib.sha1(raw).digest()
        if h in seen:
            continue
        seen.add(h)
        w.write(json.dumps({"text": text, "source": p}, ensure_ascii=False) + "\n")
        total += len(raw)
        docs += 1
        if total >= max_bytes:
            break
os.replace(out + ".tmp", out)
print(f"prepare_corpus: {docs} documents, {total / 1e6:.1f} MB of text -> {out}")
PY

echo "prepare_corpus: training a $vocab-token byte-level BPE tokenizer"
python3 - "$out/text.jsonl" "$out/tokenizer.json" "$vocab" <<'PY'
import json, os, sys
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
src, dst, vocab = sys.argv[1], sys.argv[2], int(sys.argv[3])
def texts():
    with open(src, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"]
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                              show_progress=False)
tok.train_from_iterator(texts(), trainer)
tok.save(dst + ".tmp")
os.replace(dst + ".tmp", dst)
print(f"prepare_corpus: {tok.get_vocab_size()} tokens -> {dst}")
PY

"$build/ssdtrain" tokenize --tokenizer "$out/tokenizer.json" --input "$out/text.jsonl" \
  --out "$out/debian-doc"
echo "prepare_corpus: done; train with: $build/ssdtrain train --config configs/corpus-small.yaml"
