#!/usr/bin/env python3
"""An independent reader and writer of Megatron-LM indexed datasets, for test_indexed.

It follows the layout of megatron/core/datasets/indexed_dataset.py (_IndexWriter/_IndexReader)
with numpy and struct; where megatron-core itself is importable (it needs torch), it also uses
its own IndexedDatasetBuilder / IndexedDataset.

    megatron_indexed_ref.py write PREFIX DTYPE SEED   random documents (some of several
                                                      sequences) -> PREFIX.bin/.idx, and their
                                                      tokens to PREFIX.json
    megatron_indexed_ref.py read PREFIX OUT.json      reads PREFIX.bin/.idx -> OUT.json
    megatron_indexed_ref.py has-megatron              exit 0 when megatron-core is importable

JSON: {"writer"|"reader": "numpy"|"megatron-core", "documents": [[[tokens of a sequence], ...]]}
Exit status 3 when numpy is not importable (the C++ test then skips).
"""
import json
import struct
import sys

try:
    import numpy as np
except ImportError:
    print("the Python package 'numpy' is not importable", file=sys.stderr)
    sys.exit(3)

HEADER = b"MMIDIDX\x00\x00"
CODES = {"uint8": 1, "int8": 2, "int16": 3, "int32": 4, "int64": 5, "float64": 6, "float32": 7,
         "uint16": 8}


def megatron():
    try:
        from megatron.core.datasets import indexed_dataset
        return indexed_dataset
    except Exception:  # ImportError, or torch missing underneath
        return None


def random_documents(dtype, seed):
    rng = np.random.default_rng(seed)
    hi = {"uint8": 255, "int8": 127, "int16": 32767, "uint16": 65535, "int32": 2**31 - 1,
          "int64": 2**40}[dtype]
    docs = []
    for d in range(int(rng.integers(3, 9))):
        nseq = 1 if d % 3 else int(rng.integers(1, 4))
        docs.append([rng.integers(0, hi, size=int(rng.integers(1, 40))).tolist() for _ in range(nseq)])
    return docs


def write_numpy(prefix, dtype, docs):
    dt = np.dtype(dtype)
    lengths, pointers, doc_index = [], [], [0]
    with open(prefix + ".bin", "wb") as f:
        for doc in docs:
            for seq in doc:
                pointers.append(f.tell())
                f.write(np.array(seq, dtype=dt).tobytes(order="C"))
                lengths.append(len(seq))
            doc_index.append(len(lengths))
    with open(prefix + ".idx", "wb") as f:
        f.write(HEADER)
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", CODES[dtype]))
        f.write(struct.pack("<Q", len(lengths)))
        f.write(struct.pack("<Q", len(doc_index)))
        f.write(np.array(lengths, dtype=np.int32).tobytes(order="C"))
        f.write(np.array(pointers, dtype=np.int64).tobytes(order="C"))
        f.write(np.array(doc_index, dtype=np.int64).tobytes(order="C"))


def write_megatron(mod, prefix, dtype, docs):
    import torch
    b = mod.IndexedDatasetBuilder(prefix + ".bin", dtype=getattr(np, dtype))
    for doc in docs:
        for seq in doc:
            b.add_item(torch.tensor(seq, dtype=torch.int64))
        b.end_document()
    b.finalize(prefix + ".idx")


def read_numpy(prefix):
    idx = open(prefix + ".idx", "rb").read()
    assert idx[:9] == HEADER, "bad header"
    assert struct.unpack("<Q", idx[9:17])[0] == 1, "bad version"
    code = idx[17]
    dt = np.dtype({v: k for k, v in CODES.items()}[code])
    S, D = struct.unpack("<QQ", idx[18:34])
    off = 34
    lengths = np.frombuffer(idx, np.int32, S, off); off += 4 * S
    pointers = np.frombuffer(idx, np.int64, S, off); off += 8 * S
    doc_index = np.frombuffer(idx, np.int64, D, off)
    binary = open(prefix + ".bin", "rb").read()
    seqs = [np.frombuffer(binary, dt, int(lengths[i]), int(pointers[i])).tolist() for i in range(S)]
    return [seqs[doc_index[d]:doc_index[d + 1]] for d in range(D - 1)], dt.name


def read_megatron(mod, prefix):
    ds = mod.IndexedDataset(prefix, mmap=True)
    seqs = [ds[i].tolist() for i in range(len(ds))]
    di = ds.document_indices
    return [seqs[di[d]:di[d + 1]] for d in range(len(di) - 1)]


def main():
    a = sys.argv[1:]
    mod = megatron()
    if a == ["has-megatron"]:
        sys.exit(0 if mod else 1)
    if len(a) == 4 and a[0] == "write":
        prefix, dtype, seed = a[1], a[2], int(a[3])
        docs = random_documents(dtype, seed)
        writer = "numpy"
        if mod:
            write_megatron(mod, prefix, dtype, docs)
            writer = "megatron-core"
        else:
            write_numpy(prefix, dtype, docs)
        json.dump({"writer": writer, "documents": docs}, open(prefix + ".json", "w"))
        return
    if len(a) == 3 and a[0] == "read":
        docs, dtype = read_numpy(a[1])
        out = {"reader": "numpy", "dtype": dtype, "documents": docs}
        if mod:
            assert read_megatron(mod, a[1]) == docs, "megatron-core reads other tokens than numpy"
            out["reader"] = "megatron-core"
        json.dump(out, open(a[2], "w"))
        return
    print(__doc__, file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
