#!/usr/bin/env python3
"""Checks an ssdtrain export against PyTorch / Hugging Face transformers.

Usage: check_hf_export.py EXPORT_DIR [--reference FILE] [--tol 1e-3] [--no-logits]

EXPORT_DIR holds model.safetensors and config.json as written by `ssdtrain export`, in either
format (Hugging Face Mamba2ForCausalLM, or mamba_ssm MambaLMHeadModel: detected from
config.json). The script

  1. opens model.safetensors with the safetensors library and checks its tensor names and
     shapes against the state_dict of a Mamba2ForCausalLM built from config.json (for the
     mamba_ssm format, after renaming backbone.embedding -> backbone.embeddings and translating
     the config), and that lm_head.weight equals the embedding (tied);
  2. loads the model on the CPU in float32 (Hugging Face format: with from_pretrained, and
     checks that nothing was missing, unexpected or left at its initial value);
  3. runs the tokens of the reference file (default EXPORT_DIR/reference.json,
     {"tokens": [...], "logits": [[...], ...]}, written by `ssdtrain export --with-reference`;
     tokens may also be a batch [[...], ...] with logits [batch][seq][vocab]) and prints the
     max relative difference max|hf - ref| / max|ref| of the logits. Only the first
     len(row) vocabulary columns are compared, so the reference may omit padding columns.

For a BF16 export the reference logits must come from the bf16-rounded weights (what the
export holds); logits of the fp32 model differ from those by ~1e-2 relative (raise --tol).

For ngroups > 1 note that transformers' CPU path (MambaRMSNormGated in torch_forward) normalises
over the whole d_inner, while mamba_ssm's Mamba2 normalises per group (group_size =
d_inner / ngroups): the two give different logits unless ngroups == 1.

Exit status: 0 if every check passes and the difference is <= --tol, 1 otherwise, 2 on usage
errors (missing files).
"""
import argparse
import json
import os
import sys


def fail(msg):
    print(f"FAIL: {msg}")
    return 1


def hf_config_from_mamba_ssm(cfg):
    """The Mamba2Config kwargs equivalent to a mamba_ssm MambaConfig dict."""
    ssm = cfg.get("ssm_cfg", {})
    if ssm.get("layer", "Mamba1") != "Mamba2":
        raise SystemExit("config.json: ssm_cfg.layer is not Mamba2")
    d_model = cfg["d_model"]
    mult = cfg.get("pad_vocab_size_multiple", 8)
    vocab = (cfg["vocab_size"] + mult - 1) // mult * mult
    expand = ssm.get("expand", 2)
    headdim = ssm.get("headdim", 64)
    return dict(
        hidden_size=d_model,
        num_hidden_layers=cfg["n_layer"],
        vocab_size=vocab,
        state_size=ssm.get("d_state", 128),
        head_dim=headdim,
        num_heads=expand * d_model // headdim,
        expand=expand,
        n_groups=ssm.get("ngroups", 1),
        conv_kernel=ssm.get("d_conv", 4),
        chunk_size=ssm.get("chunk_size", 256),
        layer_norm_epsilon=1e-5,  # mamba_ssm's fixed norm epsilon
        use_bias=False,
        use_conv_bias=True,
        rms_norm=cfg.get("rms_norm", True),
        residual_in_fp32=cfg.get("residual_in_fp32", True),
        tie_word_embeddings=cfg.get("tie_embeddings", True),
        time_step_limit=(0.0, float("inf")),
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("export_dir")
    ap.add_argument("--reference", help="reference logits (default EXPORT_DIR/reference.json)")
    ap.add_argument("--tol", type=float, default=1e-3, help="max relative logits difference")
    ap.add_argument("--no-logits", action="store_true", help="only check names, shapes, loading")
    args = ap.parse_args()

    d = args.export_dir
    cfg_path = os.path.join(d, "config.json")
    st_path = os.path.join(d, "model.safetensors")
    ref_path = args.reference or os.path.join(d, "reference.json")
    for p in [cfg_path, st_path] + ([] if args.no_logits else [ref_path]):
        if not os.path.isfile(p):
            print(f"error: {p} does not exist", file=sys.stderr)
            return 2

    import torch
    import transformers
    from safetensors import safe_open
    from transformers import Mamba2Config, Mamba2ForCausalLM

    torch.manual_seed(0)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    with open(cfg_path) as f:
        cfg = json.load(f)
    fmt = "mamba_ssm" if "ssm_cfg" in cfg else "hf"
    print(f"{d}: {fmt} format")
    status = 0

    # ---- 1. names and shapes with the safetensors library ----
    with safe_open(st_path, framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != "pt":
        status |= fail(f"__metadata__.format is {meta.get('format')!r}, transformers needs 'pt'")
    dtypes = sorted({str(t.dtype) for t in tensors.values()})
    print(f"model.safetensors: {len(tensors)} tensors, dtypes {dtypes}, metadata {meta}")

    if fmt == "mamba_ssm":
        hf_kwargs = hf_config_from_mamba_ssm(cfg)
        renamed = {}
        for k, v in tensors.items():
            renamed["backbone.embeddings.weight" if k == "backbone.embedding.weight" else k] = v
        if "backbone.embeddings.weight" not in renamed:
            status |= fail("mamba_ssm export lacks backbone.embedding.weight")
        file_tensors = renamed
        config = Mamba2Config(**hf_kwargs)
    else:
        config = Mamba2Config.from_pretrained(d)
        file_tensors = tensors

    reference_model = Mamba2ForCausalLM(config).float()
    want = {k: tuple(v.shape) for k, v in reference_model.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in file_tensors.items()}
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    wrong = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    for k in missing:
        status |= fail(f"missing tensor {k} {want[k]}")
    for k in unexpected:
        status |= fail(f"unexpected tensor {k} {have[k]}")
    for k in wrong:
        status |= fail(f"tensor {k} has shape {have[k]}, Mamba2ForCausalLM expects {want[k]}")
    if not (missing or unexpected or wrong):
        print(f"names and shapes: OK ({len(want)} tensors)")
    emb = file_tensors.get("backbone.embeddings.weight")
    head = file_tensors.get("lm_head.weight")
    if emb is not None and head is not None:
        if emb.shape != head.shape or not torch.equal(emb, head):
            status |= fail("lm_head.weight differs from the embedding (the model is tied)")
    if status:
        return 1

    # ---- 2. load in float32 on the CPU ----
    if fmt == "hf":
        # transformers >= 4.56 calls it dtype; older versions only know torch_dtype.
        major_minor = tuple(int(x) for x in transformers.__version__.split(".")[:2])
        dtype_kw = "dtype" if major_minor >= (4, 56) else "torch_dtype"
        model, info = Mamba2ForCausalLM.from_pretrained(
            d, output_loading_info=True, **{dtype_kw: torch.float32})
        for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
            if info.get(key):
                status |= fail(f"from_pretrained {key}: {info[key]}")
    else:
        model = reference_model
        model.load_state_dict({k: v.float() for k, v in file_tensors.items()}, strict=True)
    model = model.float().eval()
    # Every parameter must hold exactly the file's values (nothing re-initialised).
    sd = model.state_dict()
    for k, v in file_tensors.items():
        if not torch.equal(sd[k].float(), v.float()):
            status |= fail(f"loaded {k} differs from the file")
    if status:
        return 1
    print("loading: OK")
    if args.no_logits:
        return 0

    # ---- 3. logits against the reference ----
    with open(ref_path) as f:
        ref = json.load(f)
    tokens = ref["tokens"]
    batched = len(tokens) > 0 and isinstance(tokens[0], list)
    ids = torch.tensor(tokens if batched else [tokens], dtype=torch.long)
    ref_logits = torch.tensor(ref["logits"], dtype=torch.float64)
    if not batched:
        ref_logits = ref_logits.unsqueeze(0)
    if ref_logits.shape[:2] != ids.shape:
        return fail(f"reference logits have shape {tuple(ref_logits.shape)} for tokens "
                    f"{tuple(ids.shape)}")
    if int(ids.max()) >= config.vocab_size or int(ids.min()) < 0:
        return fail(f"reference tokens outside [0, {config.vocab_size})")
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=False).logits.double()
    v = ref_logits.shape[-1]
    if v > out.shape[-1]:
        return fail(f"reference has {v} vocabulary columns, the model {out.shape[-1]}")
    out = out[..., :v]
    diff = (out - ref_logits).abs()
    scale = ref_logits.abs().max().clamp_min(1e-30)
    rel = (diff.max() / scale).item()
    print(f"logits {tuple(out.shape)}: max |hf - ref| = {diff.max().item():.3e}, "
          f"max |ref| = {scale.item():.3e}, max relative difference = {rel:.3e}, "
          f"tolerance {args.tol:g}")
    if not (rel <= args.tol):  # also catches NaN
        return fail(f"max relative difference {rel:.3e} > {args.tol:g}")
    print("OK")
    return status


if __name__ == "__main__":
    sys.exit(main())
