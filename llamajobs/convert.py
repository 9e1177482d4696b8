"""Meta's original LLaMA checkpoints (consolidated.*.pth + params.json + tokenizer.model) -> a Hugging
Face LLaMA directory (sharded safetensors + index, config.json, generation_config.json, tokenizer).
LLaMA-1 and 2 (a sentencepiece tokenizer.model) and Llama 3, 3.1, 3.2 (a tiktoken-format
tokenizer.model, converted to a fast tokenizer.json; use_scaled_rope becomes rope type llama3).

What differs between the two formats:

* Names: Meta's `layers.N.attention.wq` is HF's `model.layers.N.self_attn.q_proj`, and so on (NAMES).
* Model parallelism: 13B and larger come as several `consolidated.NN.pth`, one per model-parallel
  rank of fairscale's layers. Column-parallel weights (wq, wk, wv, w1, w3 and the output head) were
  split along dim 0 and are concatenated along it; row-parallel ones (wo, w2) along dim 1; LLaMA-1/2's
  ParallelEmbedding splits the embedding by columns (dim 1; LLaMA-3's VocabParallelEmbedding by rows:
  told apart by the shapes); the norms are replicated and taken from shard 0.
* Rotary embeddings: Meta rotates interleaved pairs (x0, x1), (x2, x3)... of each head (a complex
  view); HF rotates the two halves of each head (rotate_half). Permuting the output rows of wq and wk
  within each head turns one into the other (`permute`), with n_heads for wq and n_kv_heads for wk.

Memory: the shards are opened with mmap (nothing read until touched); the output is written one
group of layers at a time (at most `max_shard_bytes` per safetensors file), so converting 65B needs
host RAM for one group, not two copies of the model. The page cache holds what was read, and the
kernel drops it as needed.

The output is written into OUT.tmp-PID and renamed to OUT when complete.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from llamajobs import catalog
from llamajobs.errors import Failure, SpecError

MAX_SHARD_BYTES = 5 * 2**30  # per output safetensors file (HF's default for save_pretrained is 5 GB)

# Meta's per-layer names -> HF's, and how model parallelism split them (the dim they are concatenated along).
COLUMN, ROW, REPLICATED = 0, 1, None
LAYER_NAMES: dict[str, tuple[str, int | None]] = {
    "attention.wq.weight": ("self_attn.q_proj.weight", COLUMN),
    "attention.wk.weight": ("self_attn.k_proj.weight", COLUMN),
    "attention.wv.weight": ("self_attn.v_proj.weight", COLUMN),
    "attention.wo.weight": ("self_attn.o_proj.weight", ROW),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", COLUMN),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", ROW),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", COLUMN),
    "attention_norm.weight": ("input_layernorm.weight", REPLICATED),
    "ffn_norm.weight": ("post_attention_layernorm.weight", REPLICATED),
}
# Unused by HF (the rotary frequencies are recomputed): LLaMA-1 checkpoints carry rope.freqs.
IGNORED = {"rope.freqs"}


@dataclass(frozen=True, kw_only=True, slots=True)
class MetaCheckpoint:
    """What a Meta checkpoint directory holds, checked: the shape and the shard files."""

    shape: catalog.Shape
    shards: tuple[Path, ...]
    tokenizer: Path
    params: dict
    llama3: bool = False  # a tiktoken tokenizer.model (Llama 3.x)

    @property
    def rope_scaling(self) -> dict | None:
        if not self.params.get("use_scaled_rope"):
            return None
        return {**LLAMA3_ROPE, "factor": float(self.params.get("rope_scaling_factor", LLAMA3_ROPE["factor"]))}


# --- reading params.json and finding the files ---


def ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's FeedForward hidden size: 2/3 of 4*dim, times the multiplier, rounded up to multiple_of."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def find_shards(input_dir: Path) -> tuple[Path, ...]:
    shards = sorted(input_dir.glob("consolidated.*.pth"))
    if not shards:
        raise SpecError(f"--input-dir {input_dir}: no consolidated.*.pth shards there; expected Meta's "
                        f"checkpoint directory (consolidated.00.pth ..., params.json)")
    numbers = []
    for shard in shards:
        match = re.fullmatch(r"consolidated\.(\d+)\.pth", shard.name)
        if not match:
            raise SpecError(f"--input-dir {input_dir}: {shard.name} is not named consolidated.NN.pth")
        numbers.append(int(match.group(1)))
    if sorted(numbers) != list(range(len(numbers))):
        raise SpecError(f"--input-dir {input_dir}: shards {', '.join(s.name for s in shards)} are not numbered "
                        f"00 to {len(shards) - 1:02d}; a model-parallel shard is missing")
    return tuple(sorted(shards, key=lambda s: int(s.name.split(".")[1])))


def find_tokenizer(input_dir: Path, tokenizer: str | Path | None) -> Path:
    """--tokenizer, else tokenizer.model in the input dir or its parent (Meta's download puts it next
    to the 7B/, 13B/... folders)."""
    if tokenizer is not None:
        path = Path(tokenizer)
        if not path.is_file():
            raise SpecError(f"--tokenizer {path}: no such file; expected Meta's sentencepiece tokenizer.model")
        return path
    for path in (input_dir / "tokenizer.model", input_dir.parent / "tokenizer.model"):
        if path.is_file():
            return path
    raise SpecError(f"--input-dir {input_dir}: no tokenizer.model there or in its parent; pass --tokenizer FILE")


# params.json's numbers and their types (vocab_size -1 means "from the tokenizer" in LLaMA-1's files).
PARAM_TYPES: dict[str, type | tuple[type, ...]] = {
    "dim": int, "n_layers": int, "n_heads": int, "n_kv_heads": int, "multiple_of": int, "vocab_size": int,
    "max_seq_len": int, "ffn_dim_multiplier": (int, float), "norm_eps": (int, float), "rope_theta": (int, float),
    "rope_scaling_factor": (int, float),
}


def read_params(input_dir: Path) -> dict:
    path = input_dir / "params.json"
    if not path.is_file():
        raise SpecError(f"--input-dir {input_dir}: no params.json there; expected Meta's checkpoint directory")
    try:
        params = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise SpecError(f"{path}: cannot be read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise SpecError(f"{path}: not UTF-8 text; expected Meta's params.json") from None
    except json.JSONDecodeError as e:
        raise SpecError(f"{path}: not valid JSON ({e.msg})") from None
    if not isinstance(params, dict):
        raise SpecError(f"{path}: holds a {type(params).__name__}, not an object; expected Meta's params.json")
    missing = [k for k in ("dim", "n_layers", "n_heads") if k not in params]
    if missing:
        raise SpecError(f"{path}: missing {', '.join(missing)}; expected Meta's params.json "
                        f"(dim, n_layers, n_heads, norm_eps, multiple_of, vocab_size)")
    for key, kind in PARAM_TYPES.items():
        value = params.get(key)
        if value is None and key not in ("dim", "n_layers", "n_heads"):
            continue
        if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value) \
                or (value <= 0 and key != "vocab_size"):
            what = "a positive whole number" if kind is int else "a positive number"
            raise SpecError(f"{path}: {key} is {value!r}; expected {what}")
    if not isinstance(params.get("use_scaled_rope", False), bool):
        raise SpecError(f"{path}: use_scaled_rope is {params['use_scaled_rope']!r}; expected true or false")
    return params


# Llama 3's tiktoken tokenizer: its pre-tokenizer pattern and the 256 special tokens after the BPE ranks
# (Llama 3.1's names; Llama 3's differ only among the reserved ones, at the same ids).
TIKTOKEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                    r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
                  *(f"<|reserved_special_token_{2 + i}|>" for i in range(256 - 11))]
# Llama 3.1's rope scaling (llama-models' apply_scaling); Llama 3.2's 1B and 3B use factor 32.
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}


def tiktoken_ranks(path: Path) -> dict[bytes, int] | None:
    """A tiktoken-format file's BPE ranks (lines of base64 token and rank), or None when it is not one."""
    import base64
    import binascii

    ranks = {}
    try:
        with open(path, "rb") as f:
            for line in f:
                if line.strip():
                    token, rank = line.split()
                    ranks[base64.b64decode(token, validate=True)] = int(rank)
    except (ValueError, binascii.Error):
        return None
    return ranks or None


def tokenizer_kind(path: Path) -> str:
    """"sentencepiece" (LLaMA-1/2) or "tiktoken" (Llama 3); SpecError when it is neither."""
    import sentencepiece as spm

    try:
        spm.SentencePieceProcessor(model_file=str(path))
        return "sentencepiece"
    except (RuntimeError, OSError) as e:
        if tiktoken_ranks(path) is not None:
            return "tiktoken"
        raise SpecError(f"{path}: neither a sentencepiece model ({str(e).splitlines()[0][:120]}) nor a "
                        f"tiktoken BPE file (Llama 3's)") from None


def tokenizer_vocab(path: Path) -> int:
    import sentencepiece as spm

    if tokenizer_kind(path) == "tiktoken":
        return len(tiktoken_ranks(path)) + len(LLAMA3_SPECIAL)
    return spm.SentencePieceProcessor(model_file=str(path)).get_piece_size()


def inspect(input_dir: str | Path, tokenizer: str | Path | None = None, max_seq_len: int | None = None
            ) -> tuple[MetaCheckpoint, list[dict[str, torch.Tensor]]]:
    """Check the directory and open its shards (mmap: no weights read yet); the shape comes from
    params.json, cross-checked against the tensors' shapes."""
    input_dir = Path(input_dir)
    if max_seq_len is not None and (isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int)
                                    or max_seq_len < 1):
        raise SpecError(f"--max-seq-len {max_seq_len!r} must be a positive number of tokens")
    if not input_dir.is_dir():
        raise SpecError(f"--input-dir {input_dir}: not a directory")
    params = read_params(input_dir)
    shard_paths = find_shards(input_dir)
    tokenizer_path = find_tokenizer(input_dir, tokenizer)
    shards = [load_shard(p) for p in shard_paths]

    dim, n_layers, n_heads = params["dim"], params["n_layers"], params["n_heads"]
    n_kv_heads = params.get("n_kv_heads") or n_heads
    n_shards = len(shards)
    where = f"--input-dir {input_dir}"
    # Meta's model-parallel code gives every shard n_heads/n_shards query and n_kv_heads/n_shards kv heads.
    if dim % n_heads or n_heads % n_kv_heads or n_kv_heads % n_shards:
        raise SpecError(f"{where}: params.json dim {dim}, n_heads {n_heads}, n_kv_heads {n_kv_heads} do not "
                        f"divide into heads over {n_shards} shard(s)")
    for i, shard in enumerate(shards):
        missing = [k for k in _meta_keys(n_layers) if k not in shard]
        if missing:
            raise SpecError(f"{where}: {shard_paths[i].name} lacks {missing[0]} ({len(missing)} tensors missing); "
                            f"params.json says n_layers {n_layers}")
    # The merged shapes, from the shards' (params.json could disagree with the weights: say so).
    ffn_rows = sum(s["layers.0.feed_forward.w1.weight"].shape[0] for s in shards)
    embed = _embedding_concat_dim(shards, dim)
    vocab = (sum(s["tok_embeddings.weight"].shape[0] for s in shards) if embed == 0
             else shards[0]["tok_embeddings.weight"].shape[0])
    expected_ffn = ffn_dim(dim, params.get("multiple_of", 256), params.get("ffn_dim_multiplier"))
    if "multiple_of" in params and ffn_rows != expected_ffn:
        raise SpecError(f"{where}: the weights' feed-forward size is {ffn_rows}, params.json's multiple_of/"
                        f"ffn_dim_multiplier give {expected_ffn}")
    q_rows = sum(s["layers.0.attention.wq.weight"].shape[0] for s in shards)
    k_rows = sum(s["layers.0.attention.wk.weight"].shape[0] for s in shards)
    head_dim = dim // n_heads
    if q_rows != dim or k_rows != n_kv_heads * head_dim:
        raise SpecError(f"{where}: the weights' attention shapes (wq {q_rows} rows, wk {k_rows}) do not match "
                        f"params.json (dim {dim}, n_heads {n_heads}, n_kv_heads {n_kv_heads})")
    spm_vocab = tokenizer_vocab(tokenizer_path)
    declared = params.get("vocab_size", -1)
    if declared not in (-1, None) and declared != vocab:
        raise SpecError(f"{where}: params.json vocab_size {declared}, but the embedding has {vocab} rows")
    if spm_vocab > vocab:
        raise SpecError(f"{tokenizer_path}: {spm_vocab} tokens, more than the embedding's {vocab} rows; "
                        f"pass the tokenizer.model that belongs to this checkpoint (--tokenizer)")
    norm_eps = params.get("norm_eps", 1e-6)
    llama3 = tokenizer_kind(tokenizer_path) == "tiktoken"
    # Not in params.json: LLaMA-1 trained on 2048 tokens, LLaMA-2 (norm_eps 1e-5) on 4096, Llama 3 on
    # 8192, and Llama 3.1 and later (scaled rope) reach 131072.
    default_seq = 131072 if params.get("use_scaled_rope") else 8192 if llama3 else 2048 if norm_eps == 1e-6 else 4096
    seq = max_seq_len or params.get("max_seq_len") or default_seq
    shape = catalog.Shape(name=input_dir.name, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                          ffn_dim=ffn_rows, vocab_size=vocab, max_seq_len=seq, norm_eps=norm_eps,
                          rope_theta=float(params.get("rope_theta", 10000.0)))
    return MetaCheckpoint(shape=shape, shards=shard_paths, tokenizer=tokenizer_path, params=params,
                          llama3=llama3), shards


def check_size(shape: catalog.Shape, size: str) -> None:
    """--size only cross-checks: the shape always comes from params.json and the weights."""
    if size not in catalog.SIZES:
        raise SpecError(f"--size {size!r} is not known; choose one of {', '.join(catalog.SIZES)}")
    known = catalog.SIZES[size]
    fields = ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size")
    diff = [f"{f} {getattr(shape, f)} (catalog {getattr(known, f)})" for f in fields
            if getattr(shape, f) != getattr(known, f)]
    if diff:
        raise SpecError(f"--size {size}: the checkpoint is not that size: {', '.join(diff)}")


def load_shard(path: Path) -> dict[str, torch.Tensor]:
    """A shard memory-mapped (nothing read until a tensor is used); a legacy-format (pre-zip) file,
    which cannot be mapped, is read whole."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception:  # noqa: BLE001 - retried without mmap; a file unreadable both ways fails below
        pass
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever the reason, the user's answer is the same
        reason = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise Failure(f"{path}: cannot be read as a PyTorch checkpoint ({reason})") from None


def _meta_keys(n_layers: int) -> Iterator[str]:
    yield from ("tok_embeddings.weight", "norm.weight", "output.weight")
    for i in range(n_layers):
        for name in LAYER_NAMES:
            yield f"layers.{i}.{name}"


def _embedding_concat_dim(shards: list[dict[str, torch.Tensor]], dim: int) -> int | None:
    """LLaMA-1/2 split the embedding by columns (ParallelEmbedding), LLaMA-3 by rows (VocabParallelEmbedding)."""
    if len(shards) == 1:
        return None
    cols = [s["tok_embeddings.weight"].shape[1] for s in shards]
    return 1 if sum(cols) == dim and cols[0] != dim else 0


# --- merging ---


def permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved rotary layout of wq/wk's output rows -> HF's half-split layout, per head."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _merge(shards: list[dict[str, torch.Tensor]], key: str, concat_dim: int | None) -> torch.Tensor:
    if concat_dim is None or len(shards) == 1:
        return shards[0][key].clone()  # clone: a fresh tensor, not a view into the mmap'd file
    return torch.cat([s[key] for s in shards], dim=concat_dim)


def layer_tensors(shards: list[dict[str, torch.Tensor]], shape: catalog.Shape, i: int) -> dict[str, torch.Tensor]:
    """Decoder layer i, merged and permuted, with HF names."""
    out = {}
    for meta_name, (hf_name, concat_dim) in LAYER_NAMES.items():
        tensor = _merge(shards, f"layers.{i}.{meta_name}", concat_dim)
        if meta_name == "attention.wq.weight":
            tensor = permute(tensor, shape.n_heads)
        elif meta_name == "attention.wk.weight":
            tensor = permute(tensor, shape.n_kv_heads)
        out[f"model.layers.{i}.{hf_name}"] = tensor.contiguous()
    return out


def embedding_tensors(shards: list[dict[str, torch.Tensor]], shape: catalog.Shape) -> dict[str, torch.Tensor]:
    return {"model.embed_tokens.weight": _merge(shards, "tok_embeddings.weight",
                                                _embedding_concat_dim(shards, shape.dim)).contiguous()}


def head_tensors(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {"model.norm.weight": _merge(shards, "norm.weight", REPLICATED),
            "lm_head.weight": _merge(shards, "output.weight", COLUMN).contiguous()}


# --- writing ---


def _unit_bytes(shape: catalog.Shape, itemsize: int) -> list[int]:
    """Bytes of each unit written together: the embedding, every decoder layer, the norm and head."""
    embed = shape.vocab_size * shape.dim * itemsize
    return [embed] + [shape.layer_params * itemsize] * shape.n_layers + [embed + shape.dim * itemsize]


def plan_files(unit_bytes: list[int], max_bytes: int) -> list[list[int]]:
    """Consecutive units grouped greedily into files of at most max_bytes (a unit larger than that alone)."""
    groups: list[list[int]] = [[]]
    size = 0
    for unit, nbytes in enumerate(unit_bytes):
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(unit)
        size += nbytes
    return groups


def convert(input_dir: str | Path, out_dir: str | Path, *, size: str | None = None,
            tokenizer: str | Path | None = None, max_seq_len: int | None = None,
            max_shard_bytes: int = MAX_SHARD_BYTES) -> dict:
    """Convert and return a summary: out, shape, dtype, parameters, files."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise SpecError(f"--out {out_dir}: exists and is not an empty directory; choose a new one")
    if size is not None and size not in catalog.SIZES:
        raise SpecError(f"--size {size!r} is not known; choose one of {', '.join(catalog.SIZES)}")
    checkpoint, shards = inspect(input_dir, tokenizer, max_seq_len)
    shape = checkpoint.shape
    if size is not None:
        check_size(shape, size)
    dtype = shards[0]["layers.0.attention.wq.weight"].dtype

    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        groups = plan_files(_unit_bytes(shape, dtype.itemsize), max_shard_bytes)
        weight_map: dict[str, str] = {}
        total_bytes = 0
        for number, units in enumerate(groups, 1):
            name = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
            tensors: dict[str, torch.Tensor] = {}
            for unit in units:
                if unit == 0:
                    tensors.update(embedding_tensors(shards, shape))
                elif unit == shape.n_layers + 1:
                    tensors.update(head_tensors(shards))
                else:
                    tensors.update(layer_tensors(shards, shape, unit - 1))
            save_file(tensors, tmp / name, metadata={"format": "pt"})
            for key, tensor in tensors.items():
                weight_map[key] = name
                total_bytes += tensor.numel() * tensor.element_size()
            del tensors  # this group's RAM goes before the next group is merged
        index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        if checkpoint.llama3:
            bos, eos = write_tiktoken_tokenizer(tmp, checkpoint.tokenizer, shape.max_seq_len)
        else:
            bos, eos = 1, 2
            write_tokenizer(tmp, checkpoint.tokenizer, shape.max_seq_len)
        write_config(tmp, shape, dtype, rope_scaling=checkpoint.rope_scaling, bos=bos, eos=eos)
        if out_dir.exists():
            out_dir.rmdir()  # an empty directory (checked above): os.replace cannot replace a directory
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": str(out_dir), "shards_in": len(shards), "files_out": len(groups),
            "dtype": str(dtype).removeprefix("torch."),
            "params": shape.params, "dim": shape.dim, "n_layers": shape.n_layers, "n_heads": shape.n_heads,
            "n_kv_heads": shape.n_kv_heads, "ffn_dim": shape.ffn_dim, "vocab_size": shape.vocab_size,
            "max_seq_len": shape.max_seq_len}


def write_config(folder: Path, shape: catalog.Shape, dtype: torch.dtype, *, rope_scaling: dict | None = None,
                 bos: int = 1, eos: int = 2) -> None:
    from transformers import GenerationConfig, LlamaConfig

    rope = {"rope_scaling": {**rope_scaling, "rope_theta": shape.rope_theta}} if rope_scaling else {}
    config = LlamaConfig(**shape.hf_config() | rope, bos_token_id=bos, eos_token_id=eos, dtype=dtype, use_cache=True)
    config.save_pretrained(folder)
    GenerationConfig.from_model_config(config).save_pretrained(folder)


def write_tokenizer(folder: Path, spm_model: Path, max_seq_len: int) -> None:
    """tokenizer.model plus the files transformers writes for it (tokenizer.json, tokenizer_config.json),
    with one BOS added to every encoding, as LLaMA was trained."""
    from transformers import LlamaTokenizer

    shutil.copyfile(spm_model, folder / "tokenizer.model")
    tokenizer = LlamaTokenizer.from_pretrained(folder, add_bos_token=True, add_eos_token=False,
                                               model_max_length=max_seq_len)
    tokenizer.save_pretrained(folder)


def write_tiktoken_tokenizer(folder: Path, tiktoken_model: Path, max_seq_len: int) -> tuple[int, int]:
    """Llama 3's tiktoken BPE as a fast tokenizer.json (transformers' TikTokenConverter, which needs the
    tiktoken package), its 256 special tokens after the ranks, one BOS added to every encoding.
    Returns (bos, eos). The tiktoken file itself is not copied: a tokenizer.model beside the weights
    is read as sentencepiece's everywhere else."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    n_ranks = len(tiktoken_ranks(tiktoken_model))
    tokenizer = TikTokenConverter(vocab_file=str(tiktoken_model), pattern=TIKTOKEN_PATTERN,
                                  extra_special_tokens=LLAMA3_SPECIAL).converted()
    bos, eos = LLAMA3_SPECIAL[0], LLAMA3_SPECIAL[1]
    if tokenizer.token_to_id(bos) != n_ranks:
        raise SpecError(f"{tiktoken_model}: its {n_ranks} ranks are not numbered 0 to {n_ranks - 1}; expected "
                        f"Llama 3's tokenizer.model")
    tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                      special_tokens=[(bos, n_ranks)])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=bos, eos_token=eos,
                                   model_max_length=max_seq_len, clean_up_tokenization_spaces=True)
    fast.save_pretrained(folder)
    return n_ranks, n_ranks + 1
