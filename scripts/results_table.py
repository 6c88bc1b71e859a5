#!/usr/bin/env python3
"""Markdown tables for examples/RESULTS.md from the files of scripts/results_smollm2.sh.

    python3 scripts/results_table.py OUT_DIR

kl.jsonl (kvq-llama kl --json, one line per method) -> the model table; eval.json (kvq-eval --json
on the KV dump) -> the dump table. Missing or empty files are skipped."""
import json
import os
import sys


def model_table(path):
    rows = [json.loads(line) for line in open(path) if line.strip()]
    if not rows:
        return ""
    ref = rows[0]["ppl_fp32"]
    out = [
        "| method | K bits | V bits | bits/elem (all-in) | KV MB | ppl | ppl vs fp32 | mean KL | max KL | top-1 | tok/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            "| `{m}` | {kb:.2f} | {vb:.2f} | {eb:.2f} | {mb:.1f} | {p:.4f} | {d:+.1f}% | {kl:.2e} | {mx:.2e} | {t1:.1f}% | {tps:.1f} |".format(
                m=r["method"], kb=r["key_bits_per_element"], vb=r["value_bits_per_element"],
                eb=r["effective_bits_per_element"], mb=r["kv_mb"], p=r["ppl"], d=100 * (r["ppl"] / ref - 1),
                kl=r["mean_kl"], mx=r["max_kl"], t1=100 * r["top1_agreement"], tps=r["tokens_per_s"]))
    return "\n".join(out) + "\n\nfp32 reference (Fp32AttentionBackend) perplexity: {:.4f}; {} predictions, context {}.\n".format(
        ref, rows[0]["tokens"], rows[0]["context"])


def eval_table(path):
    d = json.load(open(path))
    out = [
        "| method | K bits | V bits | bits/elem | score rel. err | attn rel. err | seconds |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for m in d["methods"]:
        out.append("| `{}` | {:.3f} | {:.3f} | {:.3f} | {:.3e} | {:.3e} | {:.1f} |".format(
            m["name"], m["key_bits_per_element"], m["value_bits_per_element"], m["bits_per_element"],
            m["score_rel_err"], m["attn_rel_err"], m["seconds"]))
    w = d["workload"]
    return "\n".join(out) + "\n\nworkload: {}; metrics over decode steps [{}, {}) (WKV calibrated on [0, {})).\n".format(
        w["description"], w["metric_steps_from"], w["tokens"], w["calibration_tokens"])


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    d = sys.argv[1]
    for name, fn in (("kl.jsonl", model_table), ("eval.json", eval_table)):
        p = os.path.join(d, name)
        if os.path.exists(p) and os.path.getsize(p) > 0:  # a run still in progress has an empty file
            print("<!-- from {} -->".format(name))
            print(fn(p))


if __name__ == "__main__":
    main()
