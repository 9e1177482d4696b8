"""What llamajobs knows about models, accelerators and strategies: shapes, peaks, names."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path


@dataclass(frozen=True, kw_only=True, slots=True)
class Shape:
    """A LLaMA decoder's shape, enough to build it, count its parameters and its FLOPs."""

    name: str
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab_size: int
    max_seq_len: int
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    family: str = "llama"  # config.json's model_type
    # Set when config.json names a head size that is not dim // n_heads (Qwen3: 1024 wide, 16 heads of 128).
    explicit_head_dim: int | None = None
    qkv_bias: bool = False  # biases on the q, k and v projections (Qwen2; LLaMA's attention_bias also on o)
    o_bias: bool = False
    qk_norm: bool = False  # an RMSNorm over each head's queries and keys (Qwen3)

    @property
    def head_dim(self) -> int:
        return self.explicit_head_dim or self.dim // self.n_heads

    @property
    def layer_params(self) -> int:
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        attention = self.dim * q * 2 + self.dim * kv * 2
        biases = (q + 2 * kv if self.qkv_bias else 0) + (self.dim if self.o_bias else 0)
        norms = 2 * self.head_dim if self.qk_norm else 0
        mlp = 3 * self.dim * self.ffn_dim
        return attention + biases + norms + mlp + 2 * self.dim

    @property
    def embedding_params(self) -> int:
        """Input embedding plus the output head (untied in LLaMA)."""
        return self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)

    @property
    def params(self) -> int:
        return self.n_layers * self.layer_params + self.embedding_params + self.dim

    @property
    def non_embedding_params(self) -> int:
        """N in the 6N rule: what every token multiplies through, the head excluded."""
        return self.n_layers * self.layer_params

    def hf_config(self) -> dict:
        """The keys of a transformers config (the family's) for this shape."""
        extra = {"head_dim": self.explicit_head_dim} if self.explicit_head_dim else {}
        if self.family == "llama" and (self.qkv_bias or self.o_bias):
            extra["attention_bias"] = True
        return extra | {
            "architectures": [FAMILIES[self.family].architecture],
            "model_type": self.family,
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "intermediate_size": self.ffn_dim,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_seq_len,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu",
        }


# The bundled sentencepiece tokenizer (trained on the sample corpus) has this vocabulary; the tiny
# shape takes it, so a tiny model and its tokenizer always agree.
TINY_VOCAB = 512

SIZES: dict[str, Shape] = {
    "tiny": Shape(name="tiny", dim=64, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=172,
                  vocab_size=TINY_VOCAB, max_seq_len=512),
    # LLaMA-1 (Touvron et al. 2023, table 2): 6.74B, 13.0B, 32.5B, 65.2B parameters.
    "7b": Shape(name="7b", dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008,
                vocab_size=32000, max_seq_len=2048),
    "13b": Shape(name="13b", dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, ffn_dim=13824,
                 vocab_size=32000, max_seq_len=2048),
    "33b": Shape(name="33b", dim=6656, n_layers=60, n_heads=52, n_kv_heads=52, ffn_dim=17920,
                 vocab_size=32000, max_seq_len=2048),
    "65b": Shape(name="65b", dim=8192, n_layers=80, n_heads=64, n_kv_heads=64, ffn_dim=22016,
                 vocab_size=32000, max_seq_len=2048),
    # LLaMA-2 and LLaMA-3 shapes for planning.
    "llama2-7b": Shape(name="llama2-7b", dim=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                       ffn_dim=11008, vocab_size=32000, max_seq_len=4096, norm_eps=1e-5),
    "llama2-13b": Shape(name="llama2-13b", dim=5120, n_layers=40, n_heads=40, n_kv_heads=40,
                        ffn_dim=13824, vocab_size=32000, max_seq_len=4096, norm_eps=1e-5),
    "llama2-70b": Shape(name="llama2-70b", dim=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                        ffn_dim=28672, vocab_size=32000, max_seq_len=4096, norm_eps=1e-5),
    # TinyLlama: the 1.1B shape of the GPU bench (full fine-tuning), a real LLaMA-2-architecture model.
    "tinyllama-1.1b": Shape(name="tinyllama-1.1b", dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, ffn_dim=5632,
                            vocab_size=32000, max_seq_len=2048, norm_eps=1e-5),
    "llama3-8b": Shape(name="llama3-8b", dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                       ffn_dim=14336, vocab_size=128256, max_seq_len=8192, norm_eps=1e-5,
                       rope_theta=500000.0),
    # The shapes of the Hub models the shipped presets name (llamajobs/presets/), from their
    # config.json: a preset is planned offline with these, a submit reads the model's own config.json.
    # Llama 3, 3.1 and 3.3 70B share this shape (3.1's longer context aside).
    "llama3-70b": Shape(name="llama3-70b", dim=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                        ffn_dim=28672, vocab_size=128256, max_seq_len=8192, norm_eps=1e-5,
                        rope_theta=500000.0),
    "mistral-7b": Shape(name="mistral-7b", dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                        vocab_size=32768, max_seq_len=32768, norm_eps=1e-5, rope_theta=1000000.0,
                        family="mistral"),  # v0.3 (v0.1 and v0.2: 32000 tokens)
    "qwen2.5-7b": Shape(name="qwen2.5-7b", dim=3584, n_layers=28, n_heads=28, n_kv_heads=4, ffn_dim=18944,
                        vocab_size=152064, max_seq_len=32768, rope_theta=1000000.0, family="qwen2",
                        qkv_bias=True),
}


@dataclass(frozen=True, kw_only=True, slots=True)
class Family:
    """A LLaMA-architecture family as transformers names it (config.json's model_type): what the worker
    and the estimator need to know about it, as data."""

    model_type: str
    architecture: str  # the CausalLM class (AutoModelForCausalLM builds it from model_type)
    decoder_layer: str  # the block class: FSDP's unit of sharding, pp's unit of placement, what compiles
    models: str  # what it covers, for messages
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")  # LoRA's modules when --lora-targets is not given
    qkv_bias: bool = False  # always biases on q, k and v (whatever config.json says)
    qk_norm: bool = False  # per-head RMSNorm on queries and keys
    attention_bias_key: bool = True  # config.json's attention_bias adds biases to q, k, v and o
    liger: bool = True  # liger-kernel patches it (RMSNorm, SwiGLU, RoPE; --kernels liger)


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family(model_type="llama", architecture="LlamaForCausalLM", decoder_layer="LlamaDecoderLayer",
           models="LLaMA 1 and 2, Llama 3, 3.1, 3.2 and 3.3, TinyLlama"),
    Family(model_type="mistral", architecture="MistralForCausalLM", decoder_layer="MistralDecoderLayer",
           models="Mistral 7B", attention_bias_key=False),
    Family(model_type="qwen2", architecture="Qwen2ForCausalLM", decoder_layer="Qwen2DecoderLayer",
           models="Qwen2, Qwen2.5", qkv_bias=True, attention_bias_key=False),
    Family(model_type="qwen3", architecture="Qwen3ForCausalLM", decoder_layer="Qwen3DecoderLayer",
           models="Qwen3 (dense)", qk_norm=True),
)}


def family_of(model_type: object) -> Family:
    """The family of a config.json's model_type; ValueError naming the supported ones."""
    if not isinstance(model_type, str) or model_type not in FAMILIES:
        raise ValueError(f"model_type is {model_type!r}; supported: {', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def shape_from_hf_config(config: dict, name: str) -> Shape:
    """The shape of an HF checkpoint of a supported family, read from its config.json keys; ValueError
    naming a key that is missing or of the wrong type."""
    def number(key: str, default: float | None = None, kind: type = int, source: dict = config) -> float:
        value = source.get(key, default)
        if value is None and default is None:
            raise ValueError(f"config.json has no {key!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or (kind is int and value != int(value)) or value <= 0:
            raise ValueError(f"config.json's {key!r} is {value!r}; expected a positive {kind.__name__}")
        return kind(value)

    family = family_of(config.get("model_type", "llama"))
    n_heads, dim = number("num_attention_heads"), number("hidden_size")
    # transformers 5 writes rope_theta inside rope_parameters; the Hub's configs keep it at the top.
    rope = config.get("rope_parameters") if isinstance(config.get("rope_parameters"), dict) else {}
    head_dim = number("head_dim") if config.get("head_dim") is not None else None
    attention_bias = family.attention_bias_key and config.get("attention_bias") is True
    return Shape(
        name=name,
        dim=dim,
        n_layers=number("num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=number("num_key_value_heads") if config.get("num_key_value_heads") else n_heads,
        ffn_dim=number("intermediate_size"),
        vocab_size=number("vocab_size"),
        max_seq_len=number("max_position_embeddings", 2048),
        norm_eps=number("rms_norm_eps", 1e-6, float),
        rope_theta=number("rope_theta", 10000.0, float, rope) if "rope_theta" in rope
        else number("rope_theta", 10000.0, float),
        tie_embeddings=config.get("tie_word_embeddings") is True,
        family=family.model_type,
        explicit_head_dim=head_dim if head_dim and head_dim * n_heads != dim else None,
        qkv_bias=family.qkv_bias or attention_bias,
        o_bias=attention_bias,
        qk_norm=family.qk_norm,
    )


def read_hf_config(model_path: str | Path) -> dict:
    """config.json of an HF model directory of a supported family; ValueError naming the path when it is not one."""
    path = Path(model_path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"--model-path {path}: no config.json there; expected a Hugging Face model directory "
                         f"or a Hub id (org/name[@revision])")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except OSError as e:
        raise ValueError(f"--model-path {path}: config.json cannot be read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise ValueError(f"--model-path {path}: config.json is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"--model-path {path}: config.json is not valid JSON ({e.msg})") from None
    if not isinstance(config, dict):
        raise ValueError(f"--model-path {path}: config.json holds a {type(config).__name__}, not an object")
    try:
        family_of(config.get("model_type"))
    except ValueError as e:
        raise ValueError(f"--model-path {path}: {e}") from None
    return config


def shape_for(size: str, model_path: str | None = None) -> Shape:
    """The shape a run trains: read from the checkpoint when there is one, else the named size."""
    if model_path:
        try:
            return shape_from_hf_config(read_hf_config(model_path), name=Path(model_path).name)
        except ValueError as e:
            message = str(e)
            raise ValueError(message if message.startswith("--") else f"--model-path {model_path}: {message}") from None
    if size not in SIZES:
        raise ValueError(f"--size {size!r} is not known; choose one of {', '.join(SIZES)}")
    return SIZES[size]


def with_vocab(shape: Shape, vocab_size: int) -> Shape:
    return replace(shape, vocab_size=vocab_size)


@dataclass(frozen=True, kw_only=True, slots=True)
class Accelerator:
    name: str
    peak_bf16_flops: float  # dense, datasheet
    memory_gib: float
    # What torch.cuda.get_device_name() contains for this card (plus memory for the A100 pair).
    match: str = ""
    # How the node's GPUs talk to each other: "nvlink" (NVLink/NVSwitch, the SXM boards) or "pcie"
    # (PCIe cards: every collective inside the node crosses PCIe switches and the CPU's root ports).
    interconnect: str = "nvlink"


GPUS: dict[str, Accelerator] = {
    "a100-40g": Accelerator(name="a100-40g", peak_bf16_flops=312e12, memory_gib=40, match="A100"),
    "a100-80g": Accelerator(name="a100-80g", peak_bf16_flops=312e12, memory_gib=80, match="A100"),
    "h100": Accelerator(name="h100", peak_bf16_flops=989e12, memory_gib=80, match="H100"),
    "h200": Accelerator(name="h200", peak_bf16_flops=989e12, memory_gib=141, match="H200"),
    # Node variants (`--gpu`): the same chips on PCIe boards, and the A800 (an A100 whose NVLink
    # carries 400 GB/s, not 600). Datasheet peaks: A100 PCIe as SXM; H100 PCIe 756 TFLOP/s dense bf16.
    "a100-80g-pcie": Accelerator(name="a100-80g-pcie", peak_bf16_flops=312e12, memory_gib=80, interconnect="pcie"),
    "a100-40g-pcie": Accelerator(name="a100-40g-pcie", peak_bf16_flops=312e12, memory_gib=40, interconnect="pcie"),
    "h100-pcie": Accelerator(name="h100-pcie", peak_bf16_flops=756e12, memory_gib=80, interconnect="pcie"),
    "a800-80g": Accelerator(name="a800-80g", peak_bf16_flops=312e12, memory_gib=80),
}

# A CPU has no datasheet bf16 peak that means anything for MFU; this nominal figure (one AVX2 FMA
# pipe pair at 2.5 GHz, fp32, per core) only keeps the CPU runs' MFU column comparable between runs.
CPU_PEAK_FLOPS_PER_CORE = 2 * 8 * 2 * 2.5e9


def gpu_from_device_name(device_name: str, memory_gib: float) -> Accelerator | None:
    """The catalog entry for a CUDA device, or None when the card is not in the catalog."""
    pcie = "-pcie" if "PCIE" in device_name.upper() else ""  # "NVIDIA A100-PCIE-40GB", "NVIDIA H100 PCIe"
    for gpu in GPUS.values():
        if gpu.match and gpu.match in device_name:
            if gpu.match == "A100":
                gpu = GPUS["a100-80g"] if memory_gib > 45 else GPUS["a100-40g"]
            return GPUS.get(gpu.name + pcie, gpu)
    return None


@dataclass(frozen=True, kw_only=True, slots=True)
class StrategyInfo:
    """What a strategy is, as data: every module asks these fields instead of parsing the name."""

    name: str
    engine: str  # "fsdp" (FSDP2), "deepspeed" or "pp" (one process drives the node's GPUs)
    zero_stage: int | None = None  # DeepSpeed's ZeRO stage
    offload_optimizer: bool = False  # Adam's states (and the step) on the CPU
    offload_params: bool = False  # the parameters live on the CPU between uses
    compiles: bool = False  # --compile is implemented
    without_offload: str | None = None  # the same strategy with nothing offloaded
    fp8: bool = False  # --fp8 is implemented (torchao's float8 linears under FSDP2, as torchtitan runs them)

    @property
    def deepspeed(self) -> bool:
        return self.engine == "deepspeed"

    @property
    def fsdp(self) -> bool:
        return self.engine == "fsdp"

    @property
    def offload(self) -> bool:
        return self.offload_optimizer or self.offload_params

    @property
    def one_process_per_node(self) -> bool:
        return self.engine == "pp"


STRATEGY: dict[str, StrategyInfo] = {s.name: s for s in (
    StrategyInfo(name="fsdp", engine="fsdp", compiles=True, fp8=True),
    StrategyInfo(name="fsdp-offload", engine="fsdp", offload_optimizer=True, offload_params=True, compiles=True,
                 without_offload="fsdp"),
    StrategyInfo(name="ds-zero2", engine="deepspeed", zero_stage=2),
    StrategyInfo(name="ds-zero2-offload", engine="deepspeed", zero_stage=2, offload_optimizer=True,
                 without_offload="ds-zero2"),
    StrategyInfo(name="ds-zero3", engine="deepspeed", zero_stage=3),
    StrategyInfo(name="ds-zero3-offload", engine="deepspeed", zero_stage=3, offload_optimizer=True,
                 offload_params=True, without_offload="ds-zero3"),
    StrategyInfo(name="pp", engine="pp"),
)}
STRATEGIES: tuple[str, ...] = tuple(STRATEGY)
DEEPSPEED_STRATEGIES = frozenset(s.name for s in STRATEGY.values() if s.deepspeed)


@dataclass(frozen=True, kw_only=True, slots=True)
class ModeInfo:
    """What a training mode trains, as data."""

    name: str
    frozen_base: bool  # the base weights get no gradient (about 4N FLOPs per token, not 6N)
    adapters: bool = False  # LoRA: the --lora-* flags apply, --merge can fold them in
    virtual_tokens: bool = False  # the prompt methods: --num-virtual-tokens applies
    # Prefix tuning: trained keys and values in every layer (not only embeddings before the input).
    layer_prefix: bool = False


MODE: dict[str, ModeInfo] = {m.name: m for m in (
    ModeInfo(name="full", frozen_base=False),
    ModeInfo(name="lora", frozen_base=True, adapters=True),
    ModeInfo(name="prefix", frozen_base=True, virtual_tokens=True, layer_prefix=True),
    ModeInfo(name="ptuning", frozen_base=True, virtual_tokens=True),
    ModeInfo(name="prompt", frozen_base=True, virtual_tokens=True),
)}
MODES: tuple[str, ...] = tuple(MODE)
PROMPT_MODES: tuple[str, ...] = tuple(m.name for m in MODE.values() if m.virtual_tokens)


def flops_per_token(shape: Shape, seq_len: int, mode: str) -> float:
    """Model FLOPs to train on one token: 6N + 12·L·d·s (N without embeddings; PaLM appendix B).

    A frozen base (LoRA and the prompt methods) skips the weight gradients: about 4N. The output
    head's matmul (2·d·V forward, twice that backward) is counted with N's rule; the input embedding
    (a lookup) is not. The worker's MFU and the estimator both use this count (it reproduces
    DESIGN.md's 49.5% anchor); it lives here, beside the shape, so the worker needs no estimator.
    """
    weight_flops_per_param = 4 if MODE[mode].frozen_base else 6
    n = shape.non_embedding_params + shape.dim * shape.vocab_size  # the head multiplies every token
    attention = 12 * shape.n_layers * shape.dim * seq_len
    return weight_flops_per_param * n + attention


def recompute_flops_per_token(shape: Shape, seq_len: int) -> float:
    """What activation recompute adds (spent, never counted in MFU): one more forward of the decoder
    layers, 2N for the weights and 4·L·d·s for attention (the head is not recomputed)."""
    return 2 * shape.non_embedding_params + 4 * shape.n_layers * shape.dim * seq_len


def reference_flops_per_token(shape: Shape, seq_len: int) -> float:
    """What DPO's reference adds per token of each answer row: one forward of the whole model, the
    head included (its log-probabilities need the logits): 2N + 4·L·d·s. Counted in MFU: it is work
    the objective needs, as the policy's forward and backward are."""
    return 2 * (shape.non_embedding_params + shape.dim * shape.vocab_size) + 4 * shape.n_layers * shape.dim * seq_len


def objective_flops_per_token(shape: Shape, seq_len: int, mode: str, objective: str) -> float:
    """Model FLOPs per trained token under an objective: SFT's, plus the reference's forward for DPO
    (a token here is one of a row's: a pair is two rows)."""
    return flops_per_token(shape, seq_len, mode) + (reference_flops_per_token(shape, seq_len)
                                                     if objective == "dpo" else 0.0)


def trained_params(shape: Shape, mode: ModeInfo, lora_r: int, lora_targets: tuple[str, ...],
                   num_virtual_tokens: int) -> int:
    """Parameters that get a gradient (and are checkpointed): all of them, the LoRA adapters, or the
    virtual tokens."""
    if not mode.frozen_base:
        return shape.params
    if mode.adapters:
        kv = shape.n_kv_heads * shape.head_dim
        dims = {"q_proj": (shape.dim, shape.dim), "k_proj": (shape.dim, kv), "v_proj": (shape.dim, kv),
                "o_proj": (shape.dim, shape.dim), "gate_proj": (shape.dim, shape.ffn_dim),
                "up_proj": (shape.dim, shape.ffn_dim), "down_proj": (shape.ffn_dim, shape.dim)}
        per_layer = sum(lora_r * sum(dims[t]) for t in lora_targets if t in dims)
        return shape.n_layers * per_layer
    # prefix tuning trains key/value prefixes in every layer; prompt/p-tuning only input embeddings
    per_token = 2 * shape.n_layers * shape.dim if mode.layer_prefix else shape.dim
    return num_virtual_tokens * per_token


@dataclass(frozen=True, kw_only=True, slots=True)
class ClusterInfo:
    """What a kind of cluster can do, as data: the spec, the rules and the CLI ask these fields (as
    they ask StrategyInfo) and never compare a cluster's name. Each backend in llamajobs/cluster/ names
    its ClusterInfo; the catalog holds them so that the spec reads them without the cluster layer."""

    name: str
    spans_nodes: bool  # a job may have --nodes > 1
    can_hold: bool  # --hold: queued held until released
    can_depend: bool  # --after: start once other jobs of this cluster completed
    # --gpus-per-node GPUs are asked of the cluster for each node (a --gres line), so --device auto
    # plans on GPUs there; without it the job runs on whatever the host has (the CPU, planned).
    allocates_gpus: bool
    preempts: bool  # a partition may preempt the job (GraceTime applies)
    # The submitting host runs the job: its RAM and GPUs are the node's, readable at submit.
    host_is_node: bool
    poll_s: float  # the shortest interval between two state queries (a controller is not to be hammered)
    runs_arrays: bool = True  # `data prepare --shards` can run its tasks here


CLUSTER: dict[str, ClusterInfo] = {c.name: c for c in (
    ClusterInfo(name="slurm", spans_nodes=True, can_hold=True, can_depend=True, allocates_gpus=True, preempts=True,
                host_is_node=False, poll_s=2.0),
    ClusterInfo(name="local", spans_nodes=False, can_hold=False, can_depend=False, allocates_gpus=False,
                preempts=False, host_is_node=True, poll_s=0.0),
    # The local cluster for quick debugging runs; no sharded preparation there.
    ClusterInfo(name="debug", spans_nodes=False, can_hold=False, can_depend=False, allocates_gpus=False,
                preempts=False, host_is_node=True, poll_s=0.0, runs_arrays=False),
)}
CLUSTERS: tuple[str, ...] = tuple(CLUSTER)


def allocates_gpus(cluster: str) -> bool:
    """Whether a job recorded on this cluster was given GPUs (False for a name no ClusterInfo has: a
    damaged job.json's)."""
    info = CLUSTER.get(cluster)
    return info is not None and info.allocates_gpus
LAUNCHERS: tuple[str, ...] = ("torchrun", "deepspeed")
TASKS: tuple[str, ...] = ("medqa", "medmcqa", "pubmedqa")  # eval's multiple-choice sets
# --shard-within (fsdp strategies): FSDP2 shards each layer over the ranks of one node and replicates
# across nodes (HSDP), or over every rank of the job; auto: the estimator picks the faster that fits.
SHARD_WITHIN: tuple[str, ...] = ("auto", "node", "all")
KERNELS: tuple[str, ...] = ("liger", "none")  # --kernels: Liger's fused kernels on CUDA, or the plain modules
SCORES: tuple[str, ...] = ("letter", "text")  # eval's log-likelihood of an option's letter, or of its text
# debug.fault: what the worker injects at a step for tests (worker/faults.py says what each does).
FAULTS: tuple[str, ...] = ("crash", "oom", "stop", "die", "hang", "fsize")
OBJECTIVES: tuple[str, ...] = ("sft", "dpo")  # --objective: next-token loss, or preference pairs (worker/dpo.py)
DPO_LOSSES: tuple[str, ...] = ("sigmoid", "ipo")  # --loss: DPO's logistic loss, or IPO's squared one
