"""Streaming capture of Hugging Face checkpoints (issue 12): the streamed profile equals the profile of
the same network held whole in memory, for the inputs real users have, and bad checkpoints fail
before any work with one line naming the file."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from featurize import profile  # noqa: E402
from featurize.stream import estimate_stream, stream_profile  # noqa: E402
from risk_model.checkpoint import open_checkpoint  # noqa: E402
from risk_model.errors import ModelLoadError  # noqa: E402
from risk_model.loading import load_model, open_streaming  # noqa: E402

N, SEEDS = 256, (0, 1)
NUMERIC = ["m_exp", "m_near", "m_mid", "m_con", "rho", "kappa_v", "kreiss", "eta_nl", "reliable_fraction",
           "update_ratio"]


def _llama(layers=3, tie=False):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                                   max_position_embeddings=128, tie_word_embeddings=tie)
    return transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def _save_bf16(model, path, **kw):
    """Save ``model`` in bfloat16 and round its own float32 weights the same way (buffers untouched):
    the float32 model is then exactly what the checkpoint holds."""
    import copy

    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(path, **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return model


def _gpt2():
    torch.manual_seed(1)
    cfg = transformers.GPT2Config(n_embd=48, n_layer=2, n_head=4, vocab_size=200, n_positions=64)
    return transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def _assert_same(truth, got, rtol=1e-6):
    assert len(truth) == len(got)
    for a, b in zip(truth, got):
        assert [r["name"] for r in a.rows] == [r["name"] for r in b.rows]
        for ra, rb in zip(a.rows, b.rows):
            for c in NUMERIC:
                np.testing.assert_allclose(rb[c], ra[c], rtol=rtol, atol=1e-9, err_msg=c)


def _in_memory(model):
    return [profile(model, n_samples=N, seed=s, rank=32) for s in SEEDS]


def _streamed(path, shared_pass=False):
    """One streamed pass per seed (the batch of ``featurize.profile``), or one pass for all seeds."""
    out = []
    for seeds in ([SEEDS] if shared_pass else [(s,) for s in SEEDS]):
        skeleton, ckpt, skip = open_streaming(path)
        out += stream_profile(skeleton, ckpt, n_samples=N, seeds=seeds, rank=32, skip=skip)
    return out, skeleton


def test_sharded_bf16_streams_like_the_model_in_memory(tmp_path):
    model = _save_bf16(_llama(), tmp_path, max_shard_size="60KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 3
    config = json.loads((tmp_path / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"  # the config says bf16
    truth = _in_memory(model)  # the original object, with the checkpoint's bf16 weights
    got, skeleton = _streamed(tmp_path)
    _assert_same(truth, got)
    # seeds sharing one pass: a larger batch changes float32 rounding of the activations only
    _assert_same(truth, _streamed(tmp_path, shared_pass=True)[0], rtol=2e-5)
    assert got[0].meta["streamed"] and got[0].meta["compute_dtype"] == "float32"
    # every block is back on the meta device afterwards: nothing of it is held
    assert all(p.device.type == "meta" for n, p in skeleton.named_parameters() if ".layers." in n)
    # the in-memory path of the loader builds float32 whatever the config's dtype, and agrees too
    loaded = load_model(tmp_path)
    assert next(loaded.parameters()).dtype == torch.float32
    _assert_same(truth, [profile(loaded, n_samples=N, seed=s, rank=32) for s in SEEDS])


def test_reader_returns_what_safetensors_stored(tmp_path):
    from safetensors.torch import load_file

    _save_bf16(_llama(layers=1), tmp_path, max_shard_size="60KB")
    ckpt = open_checkpoint(tmp_path)
    truth = {}
    for f in tmp_path.glob("*.safetensors"):
        truth.update(load_file(str(f)))
    assert sorted(ckpt.names()) == sorted(truth)
    for name, t in truth.items():
        got = ckpt.get(name)
        assert got.dtype == t.dtype and torch.equal(got, t), name
    assert ckpt.dtype == "bfloat16"


def test_tied_gpt2_streams_like_the_original(tmp_path):
    model = _gpt2()
    model.save_pretrained(tmp_path)  # tied: lm_head.weight is not saved
    assert "lm_head.weight" not in open_checkpoint(tmp_path).names()
    _assert_same(_in_memory(model), _streamed(tmp_path)[0])


def test_orig_mod_prefixes_are_removed(tmp_path):
    from safetensors.torch import save_file

    model = _llama()
    model.config.save_pretrained(tmp_path)
    sd = {f"_orig_mod.{k}": v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(tmp_path / "model.safetensors"))
    _assert_same(_in_memory(model), _streamed(tmp_path)[0])
    _assert_same(_in_memory(model), _in_memory(load_model(tmp_path)))


def test_lora_adapter_is_merged_like_peft(tmp_path):
    peft = pytest.importorskip("peft")
    base = _llama()
    base.save_pretrained(tmp_path / "base")
    torch.manual_seed(3)
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                                     init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "base")
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(cfg))
    merged = lora.merge_and_unload()  # peft's own merge: the truth
    truth = _in_memory(merged)
    base_only = _in_memory(_llama())
    assert not np.allclose(truth[0].rows[0]["update_ratio"], base_only[0].rows[0]["update_ratio"], rtol=1e-4)
    _assert_same(truth, _streamed(tmp_path / "adapter")[0], rtol=1e-5)
    _assert_same(truth, _in_memory(load_model(tmp_path / "adapter")), rtol=1e-5)


class _Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def _risk(*args):
    """`risk …` in this process (typer's runner: the same exit code and stdout/stderr a shell
    sees; no second torch import per call). ``test_cli_profile`` runs the CLI as a subprocess."""
    from typer.testing import CliRunner

    from risk_model.cli import app

    res = CliRunner().invoke(app, [str(a) for a in args])
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return _Result(res.exit_code, res.stdout, res.stderr)


@pytest.fixture
def sharded(tmp_path):
    d = tmp_path / "m"
    _save_bf16(_llama(layers=2), d, max_shard_size="60KB")
    return d


def _shards(d):
    return sorted(d.glob("model-*.safetensors"))


def test_cli_streams_and_in_memory_agree(sharded, tmp_path):
    a = _risk("profile", sharded, "--low-memory", "--json", "--probe-seeds", "2", "--n-samples", N)
    b = _risk("profile", sharded, "--in-memory", "--json", "--probe-seeds", "2", "--n-samples", N)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert "streaming 2 blocks" in a.stderr and "≈" in a.stderr
    ja, jb = json.loads(a.stdout), json.loads(b.stdout)
    assert ja["meta"]["streamed"] and "streamed" not in jb["meta"]
    for k, v in jb["aggregates"].items():
        if v is not None:
            np.testing.assert_allclose(ja["aggregates"][k], v, rtol=2e-5, err_msg=k)


@pytest.mark.parametrize("damage", ["missing shard", "truncated shard", "index names absent tensor"])
def test_bad_checkpoints_fail_with_one_line_naming_the_file(sharded, tmp_path, damage):
    shard = _shards(sharded)[1]
    index = sharded / "model.safetensors.index.json"
    if damage == "missing shard":
        shard.unlink()
        named = shard.name
    elif damage == "truncated shard":
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) - 100])
        named = shard.name
    else:
        idx = json.loads(index.read_text())
        idx["weight_map"]["model.layers.9.mlp.up_proj.weight"] = shard.name
        index.write_text(json.dumps(idx))
        named = "model.layers.9.mlp.up_proj.weight"
    plot = tmp_path / "out.png"
    for mode in ("--low-memory", "--in-memory"):
        res = _risk("profile", sharded, mode, "--plot", plot)
        assert res.returncode == 1, res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and named in lines[0] and "Traceback" not in res.stderr, res.stderr
        assert not plot.exists()


def test_adapter_without_local_base_is_one_line(tmp_path):
    d = tmp_path / "adapter"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "org/nowhere",
                                                       "r": 4, "lora_alpha": 8}))
    with pytest.raises(ModelLoadError, match="not a local model directory"):
        open_checkpoint(d)


def test_low_memory_refuses_non_hf_models():
    res = _risk("profile", "example", "--low-memory")
    assert res.returncode == 1 and "Hugging Face" in res.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_stream_matches_cpu(sharded):
    skeleton, ckpt, skip = open_streaming(sharded)
    cpu = stream_profile(skeleton, ckpt, n_samples=N, seeds=SEEDS, skip=skip)
    skeleton, ckpt, skip = open_streaming(sharded)
    gpu = stream_profile(skeleton, ckpt, n_samples=N, seeds=SEEDS, skip=skip, device="cuda")
    _assert_same(cpu, gpu, rtol=1e-3)


def test_cuda_without_gpu_is_one_line():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    res = _risk("profile", "example", "--device", "cuda")
    assert res.returncode == 1 and "no CUDA device" in res.stderr


def test_not_enough_memory_is_refused_before_starting(sharded, monkeypatch, tmp_path):
    """A machine with less memory than the estimate: one line with the estimate, before any work."""
    from typer.testing import CliRunner

    import featurize.capture
    from risk_model.cli import app

    monkeypatch.setattr(featurize.capture, "available_memory", lambda: 10**6)  # 1 MB left
    plot = tmp_path / "p.png"
    for mode, needle in (("--low-memory", "streaming needs about"), ("--in-memory", "available")):
        res = CliRunner().invoke(app, ["profile", str(sharded), mode, "--plot", str(plot)])
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert res.exit_code == 1 and len(lines) == 1 and needle in lines[0] and "GB" in lines[0], res.stderr
        assert not plot.exists()


def test_streaming_leaves_the_callers_rng_alone(sharded):
    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    skeleton, ckpt, skip = open_streaming(sharded)
    estimate_stream(skeleton, ckpt, n_samples=N, skip=skip)
    stream_profile(skeleton, ckpt, n_samples=N, seeds=SEEDS, skip=skip)
    assert torch.equal(torch.rand(3), want)
    assert all(q.device.type == "meta" for q in skeleton.parameters())  # nothing left loaded


def test_hub_style_checkpoint_without_the_base_model_prefix(tmp_path):
    """The Hub's GPT-2 stores ``h.0…`` for the model's ``transformer.h.0…``."""
    from safetensors.torch import save_file

    model = _gpt2()
    model.config.save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in model.transformer.state_dict().items()}, str(tmp_path / "model.safetensors"))
    assert "h.0.attn.c_attn.weight" in open_checkpoint(tmp_path).names()
    truth = _in_memory(model)
    _assert_same(truth, _streamed(tmp_path)[0])
    _assert_same(truth, _in_memory(load_model(tmp_path)))


def test_lora_with_rslora_and_modules_to_save_is_merged_like_peft(tmp_path):
    peft = pytest.importorskip("peft")
    base = _llama()
    base.save_pretrained(tmp_path / "base")
    torch.manual_seed(4)
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "up_proj"], init_lora_weights=False,
                          use_rslora=True, modules_to_save=["post_attention_layernorm"])
    lora = peft.get_peft_model(base, cfg)
    with torch.no_grad():  # train the saved norm copy so that modules_to_save matters
        for n, q in lora.named_parameters():
            if "modules_to_save" in n:
                q.mul_(1.5)
    lora.save_pretrained(tmp_path / "adapter")
    c = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    c["base_model_name_or_path"] = str(tmp_path / "base")
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(c))
    truth = _in_memory(lora.merge_and_unload())
    _assert_same(truth, _in_memory(load_model(tmp_path / "adapter")), rtol=1e-5)
    _assert_same(truth, _streamed(tmp_path / "adapter")[0], rtol=1e-5)


@pytest.mark.parametrize("damage", ["shape", "header entry"])
def test_inconsistent_tensors_fail_before_any_work(sharded, tmp_path, damage):
    from safetensors.torch import load_file, save_file

    shard = _shards(sharded)[0]
    tensors = load_file(str(shard))
    key = next(k for k, v in tensors.items() if v.ndim == 2)
    if damage == "shape":
        tensors[key] = tensors[key][:-1].contiguous()
        save_file(tensors, str(shard), metadata={"format": "pt"})
        index = sharded / "model.safetensors.index.json"
    else:  # a header whose byte range does not hold the shape it declares
        raw = shard.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
        header[key]["dtype"] = "F32"  # twice the bytes of the bf16 range it points to
        text = json.dumps(header, separators=(",", ":")).encode().ljust(n)
        assert len(text) == n
        shard.write_bytes(raw[:8] + text + raw[8 + n:])
    for mode in ("--low-memory", "--in-memory"):
        res = _risk("profile", sharded, mode)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 1 and len(lines) == 1 and shard.name in lines[0] and key in lines[0], res.stderr


def test_weights_shared_across_blocks_are_loaded_for_every_block():
    """ALBERT-style sharing: block 2 uses block 0's weight. A weight left on meta would give
    garbage silently (torch returns uninitialised memory), so every alias must be filled."""
    from torch import nn

    class Blk(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.fc = nn.Linear(d, d, bias=False)

        def forward(self, x):  # (B, T, d)
            return x + 0.1 * torch.tanh(self.fc(x))

    class Net(nn.Module):
        def __init__(self, d=16, L=3):
            super().__init__()
            self.emb = nn.Embedding(50, d)
            self.blocks = nn.ModuleList(Blk(d) for _ in range(L))
            self.blocks[2].fc.weight = self.blocks[0].fc.weight

        def forward(self, t):  # (B, T) token ids
            h = self.emb(t)
            for b in self.blocks:
                h = b(h)
            return h

    torch.manual_seed(0)
    real = Net()
    state = {n: p.detach().clone() for n, p in real.named_parameters()}  # the shared weight once

    class Source:  # a weight source over a plain dict of tensors
        def names(self):
            return list(state)

        def get(self, name):
            return state[name].clone()

        def nbytes(self, name):
            return state[name].numel() * 4

    with torch.device("meta"):
        skeleton = Net()
    got = stream_profile(skeleton, Source(), n_samples=64, seeds=(0,), rank=None)[0]
    want = profile(real, n_samples=64, seed=0, rank=None)
    _assert_same([want], [got])
