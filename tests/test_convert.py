"""Meta -> HF conversion: a tiny two-shard Meta checkpoint converted, its logits checked against an
independent implementation of Meta's forward pass (llama/model.py, written out here) on the unsharded
weights."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llamajobs.convert import ffn_dim, plan_files

MISTRAL_SPM = Path(__import__("mistral_common").__file__).parent / "data" / "tokenizer.model.v1"  # 32k LLaMA-style
ATOL = 1e-4  # fp32 logits of the converted model against the reference (observed max |diff| ~1e-6)

# Meta's model parallelism: which dim each weight was split along (fairscale Column/RowParallelLinear,
# ParallelEmbedding); None: replicated on every rank.
SPLIT = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "wo": 1, "w2": 1, "attention_norm": None,
         "ffn_norm": None, "tok_embeddings": 1, "output": 0, "norm": None}


# --- Meta's forward pass (llama/model.py), on a consolidated state dict ---

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def precompute_freqs_cis(dim: int, end: int, theta: float = 10000.0) -> torch.Tensor:
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
    t = torch.arange(end, dtype=torch.float32)
    freqs = torch.outer(t, freqs)
    return torch.polar(torch.ones_like(freqs), freqs)


def apply_rotary_emb(xq, xk, freqs_cis):
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    freqs_cis = freqs_cis.view(1, xq_.shape[1], 1, xq_.shape[-1])
    return torch.view_as_real(xq_ * freqs_cis).flatten(3), torch.view_as_real(xk_ * freqs_cis).flatten(3)


def meta_forward(sd: dict[str, torch.Tensor], params: dict, tokens: torch.Tensor) -> torch.Tensor:
    sd = {k: v.float() for k, v in sd.items()}
    dim, n_heads = params["dim"], params["n_heads"]
    n_kv = params.get("n_kv_heads") or n_heads
    head_dim, eps = dim // n_heads, params["norm_eps"]
    bsz, seqlen = tokens.shape
    freqs_cis = precompute_freqs_cis(head_dim, seqlen)
    mask = torch.full((seqlen, seqlen), float("-inf")).triu(1)
    h = sd["tok_embeddings.weight"][tokens]
    for i in range(params["n_layers"]):
        p = lambda name: sd[f"layers.{i}.{name}.weight"]  # noqa: E731
        x = rms_norm(h, p("attention_norm"), eps)
        xq = (x @ p("attention.wq").T).view(bsz, seqlen, n_heads, head_dim)
        xk = (x @ p("attention.wk").T).view(bsz, seqlen, n_kv, head_dim)
        xv = (x @ p("attention.wv").T).view(bsz, seqlen, n_kv, head_dim)
        xq, xk = apply_rotary_emb(xq, xk, freqs_cis)
        xk = xk.repeat_interleave(n_heads // n_kv, dim=2)  # repeat_kv
        xv = xv.repeat_interleave(n_heads // n_kv, dim=2)
        q, k, v = (t.transpose(1, 2) for t in (xq, xk, xv))
        scores = q @ k.transpose(2, 3) / math.sqrt(head_dim) + mask
        attn = (F.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(bsz, seqlen, -1)
        h = h + attn @ p("attention.wo").T
        x = rms_norm(h, p("ffn_norm"), eps)
        h = h + (F.silu(x @ p("feed_forward.w1").T) * (x @ p("feed_forward.w3").T)) @ p("feed_forward.w2").T
    return rms_norm(h, sd["norm.weight"], eps) @ sd["output.weight"].T


# --- a tiny Meta checkpoint ---

def random_consolidated(params: dict, vocab: int, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    dim, n_heads = params["dim"], params["n_heads"]
    kv_dim = (params.get("n_kv_heads") or n_heads) * (dim // n_heads)
    hidden = ffn_dim(dim, params["multiple_of"], params.get("ffn_dim_multiplier"))

    def rand(*shape, scale=0.08):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    sd = {"tok_embeddings.weight": rand(vocab, dim, scale=1.0), "norm.weight": 1 + rand(dim, scale=0.1),
          "output.weight": rand(vocab, dim)}
    for i in range(params["n_layers"]):
        sd.update({
            f"layers.{i}.attention.wq.weight": rand(dim, dim), f"layers.{i}.attention.wk.weight": rand(kv_dim, dim),
            f"layers.{i}.attention.wv.weight": rand(kv_dim, dim), f"layers.{i}.attention.wo.weight": rand(dim, dim),
            f"layers.{i}.feed_forward.w1.weight": rand(hidden, dim),
            f"layers.{i}.feed_forward.w2.weight": rand(dim, hidden),
            f"layers.{i}.feed_forward.w3.weight": rand(hidden, dim),
            f"layers.{i}.attention_norm.weight": 1 + rand(dim, scale=0.1),
            f"layers.{i}.ffn_norm.weight": 1 + rand(dim, scale=0.1),
        })
    return sd


def split_like_meta(sd: dict[str, torch.Tensor], n: int, head_dim: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for key, tensor in sd.items():
        parts = key.split(".")
        kind = parts[-2] if parts[0] == "layers" else parts[0]
        dim = SPLIT[kind]
        pieces = [tensor] * n if dim is None else tensor.chunk(n, dim=dim)
        for shard, piece in zip(shards, pieces):
            shard[key] = piece.clone()
    # LLaMA-1 checkpoints also carry the rotary frequencies, which HF recomputes.
    for shard in shards:
        shard["rope.freqs"] = torch.ones(head_dim // 2)
    return shards


def write_meta_dir(folder: Path, params: dict, dtype: torch.dtype, n_shards: int = 2) -> dict[str, torch.Tensor]:
    folder.mkdir(parents=True)
    vocab = 32000
    sd = random_consolidated(params, vocab, dtype)
    for rank, shard in enumerate(split_like_meta(sd, n_shards, params["dim"] // params["n_heads"])):
        torch.save(shard, folder / f"consolidated.{rank:02d}.pth")
    (folder / "params.json").write_text(json.dumps({**params, "vocab_size": -1}))
    shutil.copyfile(MISTRAL_SPM, folder.parent / "tokenizer.model")  # next to the size folder, as Meta ships it
    return sd


LLAMA1 = {"dim": 64, "n_layers": 2, "n_heads": 4, "multiple_of": 32, "norm_eps": 1e-6}
LLAMA2_GQA = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 32,
              "ffn_dim_multiplier": 1.3, "norm_eps": 1e-5}


@pytest.mark.parametrize("params, dtype", [(LLAMA1, torch.float16), (LLAMA2_GQA, torch.float32)],
                         ids=["llama1-fp16", "llama2-gqa-fp32"])
def test_converted_logits_match_meta_forward(cli, tmp_path, params, dtype):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    sd = write_meta_dir(tmp_path / "meta" / "tiny", params, dtype)
    out = tmp_path / "hf"
    code, stdout, stderr = cli("convert", "--input-dir", str(tmp_path / "meta" / "tiny"), "--out", str(out), "--json")
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert (summary["shards_in"], summary["vocab_size"], summary["dtype"]) == (2, 32000, str(dtype).split(".")[1])

    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_key_value_heads"] == params.get("n_kv_heads", params["n_heads"])
    assert config["intermediate_size"] == ffn_dim(64, 32, params.get("ffn_dim_multiplier"))
    assert config["max_position_embeddings"] == (2048 if params["norm_eps"] == 1e-6 else 4096)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    with torch.device("meta"):
        expected = LlamaForCausalLM(LlamaConfig.from_pretrained(out)).state_dict()
    assert set(index["weight_map"]) == set(expected)

    model = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer(["The patient presented with fever and a cough.", "Answer: C"], padding=False)["input_ids"]
    assert all(seq[0] == tokenizer.bos_token_id == 1 for seq in ids)  # LLaMA's one BOS
    # A real sentence and random ids from the whole vocabulary (every embedding row is reachable).
    random_ids = torch.randint(0, 32000, (16,), generator=torch.Generator().manual_seed(1))
    tokens = torch.stack([torch.tensor((ids[0] * 3)[:16]), random_ids])
    with torch.no_grad():
        hf = model(tokens).logits
    ref = meta_forward(sd, params, tokens)
    diff = (hf - ref).abs().max().item()
    assert torch.allclose(hf, ref, atol=ATOL, rtol=0), diff
    assert ref.std() > 0.1  # the comparison is not between two near-zero tensors


def test_output_is_sharded_by_layer_groups(tmp_path):
    from safetensors import safe_open

    from llamajobs.convert import convert

    write_meta_dir(tmp_path / "meta" / "tiny", LLAMA1, torch.float32)
    summary = convert(tmp_path / "meta" / "tiny", tmp_path / "hf", max_shard_bytes=300_000)
    files = sorted((tmp_path / "hf").glob("model-*.safetensors"))
    assert len(files) == summary["files_out"] >= 3
    weight_map = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())["weight_map"]
    for f in files:
        with safe_open(f, "pt") as st:
            assert all(weight_map[k] == f.name for k in st.keys())
    assert not list(tmp_path.glob("hf.tmp-*"))


def test_plan_files_groups_consecutive_units():
    assert plan_files([5, 3, 3, 3, 6], max_bytes=6) == [[0], [1, 2], [3], [4]]
    assert plan_files([10, 1], max_bytes=4) == [[0], [1]]


@pytest.mark.parametrize("setup, args, message", [
    ("no-params", [], "no params.json there"),
    ("no-shards", [], "no consolidated.*.pth shards"),
    ("gap", [], "a model-parallel shard is missing"),
    ("no-tokenizer", [], "no tokenizer.model there or in its parent"),
    ("ok", ["--size", "7b"], "--size 7b: the checkpoint is not that size: dim 64 (catalog 4096)"),
    ("ok", ["--size", "8b"], "--size '8b' is not known"),
    ("out-exists", [], "exists and is not an empty directory"),
    ("ok", ["--max-seq-len", "-1"], "--max-seq-len -1 must be a positive number of tokens"),
    ("ok", ["--max-seq-len", "0"], "--max-seq-len 0 must be a positive number of tokens"),
    ("params-bytes", [], "params.json: not UTF-8 text"),
    ("params-list", [], "params.json: holds a list, not an object"),
    ("params-dim-string", [], "params.json: dim is '64'; expected a positive whole number"),
    ("params-eps-nan", [], "params.json: norm_eps is nan; expected a positive number"),
])
def test_bad_input_dirs(cli, tmp_path, setup, args, message):
    meta = tmp_path / "meta" / "tiny"
    write_meta_dir(meta, LLAMA1, torch.float32)
    out = tmp_path / "hf"
    if setup == "no-params":
        (meta / "params.json").unlink()
    elif setup == "no-shards":
        for f in meta.glob("*.pth"):
            f.unlink()
    elif setup == "gap":
        (meta / "consolidated.01.pth").rename(meta / "consolidated.02.pth")
    elif setup == "no-tokenizer":
        (meta.parent / "tokenizer.model").unlink()
    elif setup == "params-bytes":
        (meta / "params.json").write_bytes(b'{"dim": 64, "n_layers": 2, "n_heads": 4, "x": "\xff\xfe"}')
    elif setup == "params-list":
        (meta / "params.json").write_text("[1, 2]")
    elif setup == "params-dim-string":
        (meta / "params.json").write_text(json.dumps({**LLAMA1, "dim": "64"}))
    elif setup == "params-eps-nan":
        (meta / "params.json").write_text(json.dumps({**LLAMA1, "norm_eps": float("nan")}))
    elif setup == "out-exists":
        out.mkdir()
        (out / "x").write_text("x")
    code, stdout, stderr = cli("convert", "--input-dir", str(meta), "--out", str(out), *args)
    assert code == 2, stderr
    assert message in stderr and len(stderr.strip().splitlines()) == 1
    if setup != "out-exists":
        assert not out.exists()


# --- Llama 3 / 3.1: GQA, rope_theta 500000, use_scaled_rope, the tiktoken tokenizer.model ---


def apply_scaling(freqs: torch.Tensor, scale_factor: float = 8, low_freq_factor: float = 1,
                  high_freq_factor: float = 4, old_context_len: int = 8192) -> torch.Tensor:
    """llama-models' apply_scaling (Llama 3.1's rope), as Meta wrote it."""
    low_freq_wavelen, high_freq_wavelen = old_context_len / low_freq_factor, old_context_len / high_freq_factor
    new_freqs = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            new_freqs.append(freq)
        elif wavelen > low_freq_wavelen:
            new_freqs.append(freq / scale_factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            new_freqs.append((1 - smooth) * freq / scale_factor + smooth * freq)
    return torch.tensor(new_freqs, dtype=freqs.dtype)


def scaled_freqs_cis(dim: int, end: int, theta: float, scaled: bool) -> torch.Tensor:
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
    if scaled:
        freqs = apply_scaling(freqs)
    freqs = torch.outer(torch.arange(end, dtype=torch.float32), freqs)
    return torch.polar(torch.ones_like(freqs), freqs)


def tiny_tiktoken(path: Path, merges: int = 64) -> dict[bytes, int]:
    """A tiktoken-format BPE file (base64 token, rank per line) learned here from the sample corpus:
    the 256 bytes, then `merges` merges of the most frequent adjacent pair, as tiktoken's ranks are."""
    import base64
    import re
    from collections import Counter

    from llamajobs.data import read_texts

    words = Counter(w.encode() for text in read_texts() for w in re.findall(r" ?\w+| ?[^\w\s]+|\s+", text))
    pieces = {w: [bytes([b]) for b in w] for w in words}
    ranks = {bytes([b]): b for b in range(256)}
    for _ in range(merges):
        pairs: Counter = Counter()
        for word, count in words.items():
            for a, b in zip(pieces[word], pieces[word][1:]):
                pairs[a, b] += count
        (a, b), _ = pairs.most_common(1)[0]
        ranks[a + b] = len(ranks)
        for word, seq in pieces.items():
            merged, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == (a, b):
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(seq[i])
                    i += 1
            pieces[word] = merged
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    return ranks


def meta_forward_llama3(sd: dict[str, torch.Tensor], params: dict, tokens: torch.Tensor) -> torch.Tensor:
    """meta_forward with Llama 3's rope (theta, and with use_scaled_rope apply_scaling)."""
    import unittest.mock

    head_dim = params["dim"] // params["n_heads"]
    freqs = scaled_freqs_cis(head_dim, tokens.shape[1], params["rope_theta"], params.get("use_scaled_rope", False))
    with unittest.mock.patch(f"{__name__}.precompute_freqs_cis", lambda *args, **kwargs: freqs):
        return meta_forward(sd, params, tokens)


LLAMA3 = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 32, "ffn_dim_multiplier": 1.3,
          "norm_eps": 1e-5, "rope_theta": 500000.0}
LLAMA31 = {**LLAMA3, "use_scaled_rope": True}


@pytest.mark.parametrize("params", [LLAMA3, LLAMA31], ids=["llama3", "llama3.1-scaled-rope"])
def test_llama3_converted_logits_and_tokenizer_match_meta(cli, tmp_path, params):
    import tiktoken
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llamajobs.convert import LLAMA3_SPECIAL, TIKTOKEN_PATTERN
    from llamajobs.data.encoder import Encoder

    meta = tmp_path / "meta" / "8B"
    meta.mkdir(parents=True)
    ranks = tiny_tiktoken(meta / "tokenizer.model")
    vocab = len(ranks) + len(LLAMA3_SPECIAL)
    sd = random_consolidated(params, vocab, torch.bfloat16)
    # Llama 3's VocabParallelEmbedding splits the embedding by rows, not columns.
    shards = split_like_meta(sd, 2, params["dim"] // params["n_heads"])
    for shard, rows in zip(shards, sd["tok_embeddings.weight"].chunk(2, dim=0)):
        shard["tok_embeddings.weight"] = rows.clone()
        del shard["rope.freqs"]
    for rank, shard in enumerate(shards):
        torch.save(shard, meta / f"consolidated.{rank:02d}.pth")
    (meta / "params.json").write_text(json.dumps({**params, "vocab_size": vocab}))
    out = tmp_path / "hf"
    code, stdout, stderr = cli("convert", "--input-dir", str(meta), "--out", str(out), "--json")
    assert code == 0, stderr
    assert json.loads(stdout)["vocab_size"] == vocab
    config = json.loads((out / "config.json").read_text())
    rope = config.get("rope_parameters") or {}
    assert rope.get("rope_theta") == 500000.0 and (config["bos_token_id"], config["eos_token_id"]) == (
        len(ranks), len(ranks) + 1)
    if params.get("use_scaled_rope"):
        assert rope["rope_type"] == "llama3" and rope["factor"] == 8.0 and config["max_position_embeddings"] == 131072
    else:
        assert rope.get("rope_type", "default") == "default" and config["max_position_embeddings"] == 8192
    assert not (out / "tokenizer.model").exists()  # a tiktoken file there would be read as sentencepiece's

    # The tokenizer: the same ids as tiktoken itself with the same ranks and pattern, BOS in front.
    tokenizer = AutoTokenizer.from_pretrained(out)
    reference = tiktoken.Encoding("tiny", pat_str=TIKTOKEN_PATTERN, mergeable_ranks=ranks,
                                  special_tokens={t: len(ranks) + i for i, t in enumerate(LLAMA3_SPECIAL)})
    text = "The patient presented with fever, a cough and 1234 mg/dL glucose.\n\nAnswer: C"
    assert tokenizer(text)["input_ids"] == [len(ranks), *reference.encode(text)]
    assert Encoder(out).encode([text]) == [reference.encode(text)]  # data prepare's ids
    assert tokenizer.convert_tokens_to_ids("<|eot_id|>") == len(ranks) + 9

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    random_ids = torch.randint(0, vocab, (128,), generator=torch.Generator().manual_seed(1))
    tokens = torch.stack([torch.tensor((tokenizer(text)["input_ids"] * 8)[:128]), random_ids])
    with torch.no_grad():
        hf = model(tokens).logits
    ref = meta_forward_llama3(sd, params, tokens)
    assert torch.allclose(hf, ref, atol=ATOL, rtol=0), (hf - ref).abs().max().item()
    assert ref.std() > 0.1
    # An HF Llama 3 directory that also holds Meta's tiktoken tokenizer.model: tokenizer.json is used.
    beside = tmp_path / "with-tiktoken"
    shutil.copytree(out, beside)
    shutil.copyfile(meta / "tokenizer.model", beside / "tokenizer.model")
    from llamajobs.evaluate import TextEncoder

    assert Encoder(beside).encode([text]) == TextEncoder(beside).encode([text]) == [reference.encode(text)]
    if params.get("use_scaled_rope"):  # the scaling shows at these positions: the check can tell it is there
        unscaled = meta_forward_llama3(sd, {**params, "use_scaled_rope": False}, tokens)
        assert (unscaled - ref).abs().max() > 10 * ATOL
