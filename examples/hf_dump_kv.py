#!/usr/bin/env python3
"""Dump the KV cache of a Hugging Face causal LM in kvq's KV-dump format, for kvq-eval.

Output (safetensors, the format of DESIGN.md): per layer L, post-RoPE ``layers.L.q`` [H_q, T, d],
``layers.L.k`` [H_kv, T, d] and ``layers.L.v`` [H_kv, T, d], dtype F32 (or F16/BF16 with
--dtype), plus ``__metadata__`` (model, tokens, source). Then:

    kvq-eval --kv dump.safetensors --method qjl:m=256 --method int4

How the vectors are captured: q and k right after rotary embedding, by wrapping the modelling
module's ``apply_rotary_pos_emb`` (Llama, Mistral, Qwen2, ... all call it once per layer, in layer
order); v from a forward hook on each layer's ``v_proj``. Only the first sequence of the batch is
dumped. With --check (default on) the script proves the dump is the cache the model attends to:
for every layer, causal softmax(q k^T * scale) v computed in float64 from the dumped tensors must
equal the input of that layer's ``o_proj`` (the attention output), and the dumped k must equal the
model's own KV cache where the installed transformers exposes it.

Models: ``--model NAME_OR_PATH`` (with its tokenizer and ``--text FILE``), or ``--random-llama``:
a randomly initialised small Llama config (no download; what CI's GPU machine can run), fed
seeded random token ids.

Needs torch and transformers; writes safetensors itself (no safetensors package needed).
"""
import argparse
import json
import math
import os
import sys


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="Hugging Face model name or local path")
    src.add_argument("--random-llama", action="store_true", help="randomly initialised small Llama")
    p.add_argument("--text", help="text file to run (with --model)")
    p.add_argument("--tokens", type=int, default=512, help="sequence length (default 512)")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--dtype", choices=["f32", "f16", "bf16"], default="f32", help="dump dtype (default f32)")
    p.add_argument("--device", default="cuda" if _cuda_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-check", dest="check", action="store_false", help="skip the float64 self-check")
    # The random model's shape (GQA on purpose, head_dim 64 as in SmolLM2).
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=1000)
    a = p.parse_args(argv)
    if a.tokens < 1:
        p.error(f"--tokens must be positive, got {a.tokens}")
    if a.model and not a.text:
        p.error("--model needs --text FILE")
    if a.random_llama and a.hidden % a.heads != 0:
        p.error(f"--hidden {a.hidden} is not a multiple of --heads {a.heads}")
    if a.random_llama and a.heads % a.kv_heads != 0:
        p.error(f"--heads {a.heads} is not a multiple of --kv-heads {a.kv_heads}")
    return a


def _cuda_available():
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


# ------------------------------------------------------------------------------ safetensors
def write_safetensors(path, tensors, metadata):
    """tensors: name -> contiguous CPU torch tensor (float32/float16/bfloat16). Atomic write."""
    import torch

    names = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        t = t.detach().contiguous().cpu()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)  # the data starts 8-byte aligned
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(len(h).to_bytes(8, "little"))
        f.write(h)
        for b in blobs:
            f.write(b)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ------------------------------------------------------------------------------ capture
def load_model(a):
    import torch
    import transformers

    torch.manual_seed(a.seed)
    if a.random_llama:
        cfg = transformers.LlamaConfig(
            vocab_size=a.vocab,
            hidden_size=a.hidden,
            intermediate_size=2 * a.hidden,
            num_hidden_layers=a.layers,
            num_attention_heads=a.heads,
            num_key_value_heads=a.kv_heads,
            max_position_embeddings=max(4096, a.tokens),
            rope_theta=10000.0,
        )
        model = transformers.LlamaForCausalLM(cfg)
        g = torch.Generator().manual_seed(a.seed + 1)
        ids = torch.randint(0, a.vocab, (1, a.tokens), generator=g)
        name = f"random-llama(layers={a.layers},hidden={a.hidden},heads={a.heads},kv_heads={a.kv_heads},seed={a.seed})"
    else:
        tok = transformers.AutoTokenizer.from_pretrained(a.model)
        model = transformers.AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=torch.float32)
        with open(a.text, encoding="utf-8") as f:
            text = f.read()
        ids = tok(text, return_tensors="pt").input_ids[:, : a.tokens]
        if ids.shape[1] == 0:
            raise SystemExit(f"error: {a.text} gives no tokens")
        name = a.model
    return model.to(a.device).eval(), ids.to(a.device), name


def decoder_layers(model):
    for path in ("model.layers", "transformer.h", "gpt_neox.layers"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
            return list(obj)
        except AttributeError:
            continue
    raise SystemExit("error: cannot find the decoder layers of this model (expected model.layers)")


def capture(model, ids):
    import torch

    layers = decoder_layers(model)
    attn = [layer.self_attn for layer in layers]
    mod = sys.modules[type(attn[0]).__module__]
    if not hasattr(mod, "apply_rotary_pos_emb"):
        raise SystemExit(f"error: {mod.__name__} has no apply_rotary_pos_emb; this model is not supported")
    original = mod.apply_rotary_pos_emb
    qk, vs, attn_out = [], [None] * len(layers), [None] * len(layers)

    def rotary(q, k, *args, **kwargs):
        q2, k2 = original(q, k, *args, **kwargs)
        qk.append((q2[0].detach().float(), k2[0].detach().float()))  # [H, T, d]
        return q2, k2

    hooks = []
    for i, a in enumerate(attn):
        hd = a.head_dim

        def v_hook(_m, _inp, out, i=i, hd=hd):
            vs[i] = out[0].detach().float().reshape(out.shape[1], -1, hd).transpose(0, 1)  # [H_kv, T, d]

        def o_pre_hook(_m, inp, i=i):
            attn_out[i] = inp[0][0].detach().double()  # [T, H_q * d]

        hooks.append(a.v_proj.register_forward_hook(v_hook))
        hooks.append(a.o_proj.register_forward_pre_hook(o_pre_hook))
    mod.apply_rotary_pos_emb = rotary
    try:
        with torch.no_grad():
            out = model(ids, use_cache=True)
    finally:
        mod.apply_rotary_pos_emb = original
        for h in hooks:
            h.remove()
    if len(qk) != len(layers):
        raise SystemExit(f"error: rotary embedding ran {len(qk)} times for {len(layers)} layers")
    scales = [getattr(a, "scaling", 1.0 / math.sqrt(a.head_dim)) for a in attn]
    return qk, vs, attn_out, scales, getattr(out, "past_key_values", None)


def cache_keys(pkv, layer):
    """The model's own cached keys of a layer [H_kv, T, d], or None if this version hides them."""
    for get in (lambda: pkv.layers[layer].keys, lambda: pkv.key_cache[layer], lambda: pkv[layer][0]):
        try:
            return get()[0].float()
        except (AttributeError, IndexError, KeyError, TypeError):
            continue
    return None


def self_check(qk, vs, attn_out, scales, pkv):
    """float64 causal GQA attention from the dump vs the model's attention output, per layer."""
    import torch

    worst = 0.0
    for layer, ((q, k), v) in enumerate(zip(qk, vs)):
        q, k, v = q.double(), k.double(), v.double()
        hq, t, d = q.shape
        group = hq // k.shape[0]
        kk, vv = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
        s = (q @ kk.transpose(1, 2)) * scales[layer]
        s = s.masked_fill(torch.triu(torch.ones(t, t, dtype=torch.bool, device=s.device), 1), float("-inf"))
        o = (torch.softmax(s, -1) @ vv).transpose(0, 1).reshape(t, hq * d)
        ref = attn_out[layer]
        err = ((o - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
        worst = max(worst, err)
        # fp32 model arithmetic vs float64 here: relative 1e-4 is ~100x float32's attention error.
        if not err < 1e-4:
            raise SystemExit(f"error: layer {layer}: attention from the dump differs from the model's by {err:.3g}")
        ck = cache_keys(pkv, layer) if pkv is not None else None
        if ck is not None and not torch.equal(ck, k.float()):
            raise SystemExit(f"error: layer {layer}: dumped keys differ from the model's KV cache")
    return worst


def main(argv):
    a = parse_args(argv)
    import torch

    dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    model, ids, name = load_model(a)
    qk, vs, attn_out, scales, pkv = capture(model, ids)
    if a.check:
        worst = self_check(qk, vs, attn_out, scales, pkv)
        print(f"self-check: attention recomputed from the dump matches the model (max rel err {worst:.2e})")
    tensors = {}
    for layer, ((q, k), v) in enumerate(zip(qk, vs)):
        tensors[f"layers.{layer}.q"] = q.to(dtype)
        tensors[f"layers.{layer}.k"] = k.to(dtype)
        tensors[f"layers.{layer}.v"] = v.to(dtype)
    meta = {"model": name, "tokens": ids.shape[1], "source": "kvq examples/hf_dump_kv.py", "post_rope": "true"}
    write_safetensors(a.out, tensors, meta)
    q0, k0 = qk[0]
    print(
        f"wrote {a.out}: {len(qk)} layers, q [{q0.shape[0]}, {q0.shape[1]}, {q0.shape[2]}], "
        f"k/v [{k0.shape[0]}, {k0.shape[1]}, {k0.shape[2]}], {a.dtype}"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
