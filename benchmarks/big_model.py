"""Profiling big checkpoints on this machine: wall time, peak memory and seconds per layer of
``risk profile DIR`` on random-init checkpoints with the shapes of real models; writes
results/big_model.json.

Shapes (random weights, N(0, 0.02²), norms at 1; generated here tensor by tensor, deleted after):
- ``7b``:   Llama architecture, d = 4096, 32 layers, MLP 11008, 32 heads, vocab 32000, bf16, sharded
  safetensors (≈ 13.5 GB on disk);
- ``1.1b``: Llama architecture, d = 2048, 22 layers, MLP 5632, 32 heads (4 KV), vocab 32000, bf16, sharded;
- ``gpt2``: GPT-2 124M (d = 768, 12 layers, vocab 50257), float32, one safetensors file, profiled both
  streamed and loaded whole.

Each checkpoint is written by a separate process, and each profile is a separate ``risk profile DIR
--json`` process whose peak RSS comes from ``wait4`` (this script's own process stays small: a forked
child starts with its parent's resident memory counted in its peak).
Targets (issue 12, this 2-core machine): 7B shape ≤ 4 GB peak RSS and ≤ 20 min; GPT-2 124M ≤ 1 GB.

    python benchmarks/big_model.py [--shapes gpt2,1.1b,7b] [--n-samples 2048] [--probe-seeds 1] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "big_model.json"

SHAPES = {
    "7b": dict(arch="llama", hidden_size=4096, num_hidden_layers=32, intermediate_size=11008,
               num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, dtype="bfloat16"),
    "1.1b": dict(arch="llama", hidden_size=2048, num_hidden_layers=22, intermediate_size=5632,
                 num_attention_heads=32, num_key_value_heads=4, vocab_size=32000, dtype="bfloat16"),
    "gpt2": dict(arch="gpt2", n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024, dtype="float32"),
}
SHARD_BYTES = 2 * 10**9


def llama_tensors(s: dict):
    """(name, shape, kind) of a Llama checkpoint in the order of the model, without building it."""
    d, f, L = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"]
    kv = d // s["num_attention_heads"] * s["num_key_value_heads"]
    yield "model.embed_tokens.weight", (s["vocab_size"], d), "w"
    for i in range(L):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (d,), "one"
        yield p + "self_attn.q_proj.weight", (d, d), "w"
        yield p + "self_attn.k_proj.weight", (kv, d), "w"
        yield p + "self_attn.v_proj.weight", (kv, d), "w"
        yield p + "self_attn.o_proj.weight", (d, d), "w"
        yield p + "post_attention_layernorm.weight", (d,), "one"
        yield p + "mlp.gate_proj.weight", (f, d), "w"
        yield p + "mlp.up_proj.weight", (f, d), "w"
        yield p + "mlp.down_proj.weight", (d, f), "w"
    yield "model.norm.weight", (d,), "one"
    yield "lm_head.weight", (s["vocab_size"], d), "w"


def make_llama(path: Path, s: dict, progress=print) -> int:
    """Write a random-init sharded Llama checkpoint tensor by tensor (never the whole model in memory)."""
    import torch
    import transformers
    from safetensors.torch import save_file

    cfg = transformers.LlamaConfig(**{k: v for k, v in s.items() if k not in ("arch", "dtype")},
                                   max_position_embeddings=4096, tie_word_embeddings=False, dtype=s["dtype"])
    cfg.save_pretrained(path)
    dtype = getattr(torch, s["dtype"])
    gen = torch.Generator().manual_seed(0)
    specs = list(llama_tensors(s))
    total = sum(math.prod(shape) for _, shape, _ in specs) * torch.empty((), dtype=dtype).element_size()
    n_shards = max(1, math.ceil(total / SHARD_BYTES))
    weight_map, shard, size, k = {}, {}, 0, 1

    def flush():
        nonlocal shard, size, k
        name = f"model-{k:05d}-of-{n_shards:05d}.safetensors"
        save_file(shard, str(path / name), metadata={"format": "pt"})
        weight_map.update({t: name for t in shard})
        progress(f"  wrote {name} ({size / 1e9:.2f} GB)")
        shard, size, k = {}, 0, k + 1

    for name, shape, kind in specs:
        t = torch.ones(shape, dtype=dtype) if kind == "one" else torch.empty(shape).normal_(0, 0.02, generator=gen).to(dtype)
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > SHARD_BYTES and k < n_shards:
            flush()
        shard[name] = t
        size += nbytes
    flush()
    if k - 1 != n_shards:  # the shard names promise n_shards files
        for name in set(weight_map.values()):
            new = name.replace(f"-of-{n_shards:05d}", f"-of-{k - 1:05d}")
            (path / name).rename(path / new)
        weight_map = {t: n.replace(f"-of-{n_shards:05d}", f"-of-{k - 1:05d}") for t, n in weight_map.items()}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}, indent=1))
    return total


def make_gpt2(path: Path, s: dict) -> int:
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(**{k: v for k, v in s.items() if k not in ("arch", "dtype")})
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(path)
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def checkpoint_bytes(s: dict) -> int:
    if s["arch"] == "llama":
        return sum(math.prod(shape) for _, shape, _ in llama_tensors(s)) * (2 if s["dtype"] != "float32" else 4)
    d, L, V = s["n_embd"], s["n_layer"], s["vocab_size"]
    return 4 * (V * d + s["n_positions"] * d + L * 12 * d * d)


def profile_once(path: Path, args, mode: str) -> dict:
    """One ``risk profile`` process: wall time, peak RSS (``wait4``), the cost estimate it printed first."""
    cmd = [sys.executable, "-m", "risk_model.cli", "profile", str(path), mode, "--json",
           "--n-samples", str(args.n_samples), "--probe-seeds", str(args.probe_seeds)]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=ROOT, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {stderr.strip()[-400:]}")
    prof = json.loads(stdout)
    n_layers = len(prof["layers"])
    lines = [ln for ln in stderr.strip().splitlines() if ln.startswith("streaming")]
    return dict(mode=mode, wall_s=round(wall, 1), peak_rss_gb=round(usage.ru_maxrss * 1024 / 1e9, 3), n_layers=n_layers,
                s_per_layer=round(wall / n_layers, 2), estimate=lines[0] if lines else None,
                m_near_mean=prof["aggregates"]["m_near_mean"], rho_max=prof["aggregates"]["rho_max"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="gpt2,1.1b,7b")
    ap.add_argument("--n-samples", type=int, default=2048)
    ap.add_argument("--probe-seeds", type=int, default=1)
    ap.add_argument("--workdir", default=None, help="where checkpoints are generated (default: a temp dir)")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--generate", nargs=2, metavar=("SHAPE", "DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.generate:
        name, path = args.generate
        s = SHAPES[name]
        log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
        print(make_llama(Path(path), s, progress=log) if s["arch"] == "llama" else make_gpt2(Path(path), s))
        return
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        raise SystemExit(f"unknown shape(s) {unknown}: choose from {', '.join(SHAPES)}")
    out_path = Path(args.out)
    results = json.loads(out_path.read_text()) if out_path.exists() else {}
    results.setdefault("shapes", {})
    base = Path(args.workdir or tempfile.gettempdir())
    for name in shapes:
        s = SHAPES[name]
        need = checkpoint_bytes(s)
        free = shutil.disk_usage(base).free
        if need * 1.05 > free:
            raise SystemExit(f"{name}: the checkpoint needs about {need / 1e9:.1f} GB on disk and {base} has "
                             f"{free / 1e9:.1f} GB free: give --workdir on a bigger disk")
        path = Path(tempfile.mkdtemp(prefix=f"big-{name}-", dir=base))
        try:
            print(f"{name}: generating {need / 1e9:.1f} GB in {path}", flush=True)
            t0 = time.perf_counter()
            res = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--generate", name, str(path)],
                                 cwd=ROOT, stdout=subprocess.PIPE, text=True)
            if res.returncode != 0:
                raise SystemExit(f"{name}: generating the checkpoint failed")
            size = int(res.stdout.strip().splitlines()[-1])
            gen_s = time.perf_counter() - t0
            modes = ["--low-memory", "--in-memory"] if name == "gpt2" else ["--low-memory"]
            runs = []
            for mode in modes:
                r = profile_once(path, args, mode)
                print(f"  {mode}: {r['wall_s']} s, peak RSS {r['peak_rss_gb']:.2f} GB, {r['s_per_layer']} s/layer",
                      flush=True)
                runs.append(r)
            results["shapes"][name] = dict(shape={k: v for k, v in s.items()}, checkpoint_gb=round(size / 1e9, 2),
                                           n_files=len(list(path.glob("*.safetensors"))),
                                           generate_s=round(gen_s, 1), runs=runs,
                                           when=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                           load_avg_1m=os.getloadavg()[0])
        finally:
            shutil.rmtree(path, ignore_errors=True)
    results["targets"] = {"7b": {"peak_rss_gb": 4.0, "wall_s": 1200}, "gpt2": {"peak_rss_gb": 1.0}}
    results["settings"] = dict(n_samples=args.n_samples, probe_seeds=args.probe_seeds,
                               machine=f"{os.cpu_count()} cores, {platform.machine()}, python {platform.python_version()}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=2))
    print(f"written {out_path}")


if __name__ == "__main__":
    sys.path = [p for p in sys.path if Path(p).resolve() != Path(__file__).resolve().parent]
    main()
