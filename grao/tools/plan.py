"""``grao plan``: the memory one training rank needs, part by part, and which options make it fit a device.

Parameters are counted exactly, by building the model on the meta device from
its config (a local Hugging Face directory or a preset below); everything else
is arithmetic on those counts and the run's shapes, with the formulas stated
where they are computed. Two presets carry the published architectures of the
paper's models, so a plan needs no download.

Per rank, for one micro-batch of ``M`` prompts, each with ``G`` samples and the
reference (``S = M (G+1)`` sequences of at most ``T`` tokens, ``N = S T``):

- parameters: ``params * param_bytes / shards``; LoRA: the frozen base at its
  dtype plus the adapters in fp32;
- gradients: ``trainable * grad_bytes / shards``;
- optimizer: AdamW's m and v in fp32 (8 bytes per trainable parameter), plus
  an fp32 master copy (4 more) when the parameters themselves are bf16;
- the frozen reference model (``dpo``, ``ppo``, ``grpo`` with a KL): the
  starting model's fp32 parameters, sharded like the trained ones (it runs
  forward only, and its gathered buffers are freed before the update);
- FSDP unshard buffers: the root (embeddings, final norm, lm_head) and two
  decoder layers (the one computing and the one prefetched) gathered whole;
- activations: what autograd saves for the backward pass, see
  :func:`activation_bytes`;
- the fused loss: at most its memory budget plus the (N, H) hidden-state
  gradient, where plain autograd would hold (N, V) fp32 logits and their
  gradient.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .architecture import PRESETS, Architecture, PlanError
from .architecture import architecture as architecture  # the model shapes a plan starts from

GIB = 2**30
DTYPE_BYTES = {"fp32": 4, "bf16": 2}
# The fused loss's default working-memory bound per backend (grao_kernels.backends.*.DEFAULT_BUDGET).
LOSS_BACKENDS = ("torch", "native", "triton")


@dataclass(frozen=True)
class Settings:
    """The run's settings that decide its memory, per rank."""

    devices: int = 1
    memory_gb: float = 80.0  # GiB per device (an "80 GB" H100 has 80 GiB)
    prompts_per_step: int = 16
    micro_batch_prompts: int = 0  # 0 = all of a rank's prompts at once
    group_size: int = 8
    seq_len: int = 520  # longest sequence (prompt + completion), tokens
    compute_dtype: str = "bf16"  # activations (autocast); fp32 on CPU
    param_dtype: str = "fp32"  # fp32 master weights, or bf16 parameters with an fp32 master copy in the optimizer
    lora_rank: int = 0
    lora_base_dtype: str = "bf16"
    fsdp: int = 1  # ranks the parameters, gradients and optimizer state are sharded over
    fsdp_param_dtype: str = "fp32"  # dtype FSDP gathers the parameters in for compute (bf16: mixed precision)
    cpu_offload: bool = False  # FSDP2 CPU offload of parameters, gradients and optimizer state
    gradient_checkpointing: bool = False
    reference_model: bool = False  # the method keeps a frozen copy of the starting model (dpo, ppo, grpo's KL)
    loss_backend: str = "triton"
    loss_budget: int | None = None  # bytes; None = the backend's default

    def micro_batch(self) -> int:
        """Prompts in one forward/backward on a rank: its share of the step's prompts, capped by the micro-batch."""
        per_rank = -(-self.prompts_per_step // max(1, self.fsdp))
        return min(per_rank, self.micro_batch_prompts) if self.micro_batch_prompts else per_rank

    def tokens(self) -> int:
        return self.micro_batch() * (self.group_size + 1) * self.seq_len


def layer_activation_elements(arch: Architecture, mlp_dim: int) -> int:
    """Elements autograd saves per token in one decoder layer (a SwiGLU transformer with SDPA attention).

    Attention: the input RMSNorm keeps its input, normalised input and output
    (3H); the projections' outputs q, k, v as SDPA saves them (keys and values
    repeated to the query heads for GQA), the attention output and its
    transposed copy for o_proj (2 q_dim); per-head q/k norms keep q and k
    twice more; MLA keeps its latent through a norm (3 latent) and the
    compressed input of its up-projection. Dense MLP: the second norm (3H) and
    gate, up, SiLU(gate) and their product (4I). MoE: the norm (3H), router
    logits and probabilities (2E), and per routed slot the gathered token (H),
    gate/up (2I), SiLU (I), product (I) and the expert output before weighting
    (H); shared experts as a dense MLP of their width.
    """
    H = arch.hidden
    attn = 3 * H + arch.q_dim + arch.k_dim + arch.v_dim + 2 * arch.q_dim
    if arch.qk_norm and not arch.mla_latent:
        attn += 2 * (arch.q_dim + arch.k_dim)
    if arch.mla_latent:
        attn += 4 * arch.mla_latent
    if mlp_dim:
        mlp = 3 * H + 4 * mlp_dim
    else:
        mlp = 3 * H + 2 * arch.experts + arch.top_k * (2 * H + 4 * arch.moe_intermediate)
        mlp += 4 * arch.shared_intermediate
    return attn + mlp


def activation_bytes(arch: Architecture, s: Settings) -> int:
    """Saved activations of one micro-batch: every layer's (:func:`layer_activation_elements`) plus the final norm
    (3H) per token; with gradient checkpointing, each layer's input (H) plus one layer's, recomputed in backward."""
    N, b = s.tokens(), DTYPE_BYTES[s.compute_dtype]
    per_layer = [layer_activation_elements(arch, d) for d in arch.mlp_dims]
    if s.gradient_checkpointing:
        elements = arch.layers * arch.hidden + max(per_layer) + 3 * arch.hidden
    else:
        elements = sum(per_layer) + 3 * arch.hidden
    return N * elements * b


def loss_workspace_bytes(arch: Architecture, s: Settings) -> int:
    """The fused loss beyond its inputs: its working memory (at most the budget; less when every row's logits fit)
    and the fp32 gradient of the (N, H) hidden states it returns."""
    from grao_kernels.backends import module  # importing a backend builds or compiles nothing

    budget = s.loss_budget or module(s.loss_backend).DEFAULT_BUDGET
    N = s.tokens()
    # a block of rows costs 6 bytes per logit (fp32 logits + GEMM slack) and 8 per hidden element (its fp32 copy
    # and its gradient), as grao_kernels.backends.torch_backend.plan_blocks sizes it
    return min(budget, N * arch.vocab * 6 + N * arch.hidden * 8) + N * arch.hidden * 4


def full_logits_bytes(arch: Architecture, s: Settings) -> int:
    """(N, V) fp32 logits and their gradient: what autograd through a plain lm_head would hold."""
    return 2 * s.tokens() * arch.vocab * 4


@dataclass(frozen=True)
class Plan:
    settings: Settings
    parameters: int
    gradients: int
    optimizer: int
    reference: int  # the frozen reference model's parameters
    fsdp_buffers: int
    activations: int
    loss_workspace: int
    full_logits_avoided: int
    kv_cache: int  # generation: the rollout's KV cache (not alive during the backward pass)
    offloaded: int  # bytes moved to CPU memory by offloading
    trainable: int

    @property
    def step_total(self) -> int:
        return (
            self.parameters
            + self.gradients
            + self.optimizer
            + self.reference
            + self.fsdp_buffers
            + max(self.activations + self.loss_workspace, self.kv_cache)
        )

    def fits(self) -> bool:
        return self.step_total <= self.settings.memory_gb * GIB


def plan(arch: Architecture, s: Settings) -> Plan:
    """The per-rank memory of ``arch`` trained with ``s``."""
    shards = max(1, s.fsdp)
    trainable = arch.lora_per_rank * s.lora_rank if s.lora_rank else arch.params
    pb = DTYPE_BYTES[s.lora_base_dtype if s.lora_rank else s.param_dtype]
    params = arch.params * pb + (trainable * 4 if s.lora_rank else 0)
    grad_b = 4 if s.lora_rank else DTYPE_BYTES[s.param_dtype]
    grads = trainable * grad_b
    optim = trainable * (8 + (4 if DTYPE_BYTES[s.param_dtype] == 2 and not s.lora_rank else 0))
    params, grads, optim = params // shards, grads // shards, optim // shards
    reference = arch.params * 4 // shards if s.reference_model else 0
    buffers = 0
    if shards > 1:
        gathered = DTYPE_BYTES[s.fsdp_param_dtype] if not s.lora_rank else pb
        buffers = (arch.embed_head + 2 * arch.largest_layer) * gathered
    offloaded = 0
    if s.cpu_offload:
        offloaded = params + grads + optim + reference
        params = grads = optim = reference = 0
    per_rank_prompts = -(-s.prompts_per_step // shards)
    kv = per_rank_prompts * s.group_size * s.seq_len * arch.kv_cache_per_token * DTYPE_BYTES[s.compute_dtype]
    return Plan(
        settings=s,
        parameters=params,
        gradients=grads,
        optimizer=optim,
        reference=reference,
        fsdp_buffers=buffers,
        activations=activation_bytes(arch, s),
        loss_workspace=loss_workspace_bytes(arch, s),
        full_logits_avoided=full_logits_bytes(arch, s),
        kv_cache=kv,
        offloaded=offloaded,
        trainable=trainable,
    )


OPTION_KEYS = ("fsdp", "lora_rank", "cpu_offload", "gradient_checkpointing", "micro_batch_prompts")


def options(arch: Architecture, s: Settings, max_changes: int = 2) -> list[Plan]:
    """The plans of ``s`` with up to ``max_changes`` of its memory options changed: FSDP over 1 or all devices, LoRA
    off or rank 16 (or the configured rank), CPU offload (with FSDP) off or on, gradient checkpointing off or on, the
    configured micro-batch or one prompt; fewest changes first, then smallest total."""
    values = dict(
        fsdp={1, s.devices, s.fsdp},
        lora_rank={0, s.lora_rank or 16},
        cpu_offload={False, True},
        gradient_checkpointing={False, True},
        micro_batch_prompts={s.micro_batch_prompts, 1},
    )

    def changes(c: Settings) -> int:
        return sum(getattr(c, k) != getattr(s, k) for k in OPTION_KEYS)

    seen, plans = set(), []
    for combo in itertools.product(*(sorted(values[k]) for k in OPTION_KEYS)):
        cand = replace(s, **dict(zip(OPTION_KEYS, combo)))
        if (cand.cpu_offload and cand.fsdp == 1) or cand in seen or changes(cand) > max_changes:
            continue  # FSDP2's offload needs FSDP
        seen.add(cand)
        plans.append(plan(arch, cand))
    return sorted(plans, key=lambda p: (changes(p.settings), p.step_total))


def _gib(n: int) -> str:
    """Bytes in GiB, or MiB below 1 GiB (the tiny models)."""
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


PARTS = (
    ("parameters", "parameters"),
    ("gradients", "gradients"),
    ("optimizer", "optimizer state (AdamW)"),
    ("reference", "frozen reference model"),
    ("fsdp_buffers", "FSDP unshard buffers"),
    ("activations", "activations (one micro-batch)"),
    ("loss_workspace", "fused loss workspace"),
    ("kv_cache", "generation KV cache (rollout)"),
)


def describe(s: Settings) -> str:
    parts = [f"FSDP over {s.fsdp}" if s.fsdp > 1 else "no FSDP"]
    if s.lora_rank:
        parts.append(f"LoRA r={s.lora_rank}")
    if s.cpu_offload:
        parts.append("CPU offload")
    if s.gradient_checkpointing:
        parts.append("checkpointing")
    parts.append(f"micro-batch {s.micro_batch()} prompt(s)")
    return ", ".join(parts)


def markdown(arch: Architecture, p: Plan, alternatives: list[Plan]) -> str:
    s = p.settings
    lines = [
        f"### {arch.name}: {arch.params:,} parameters, {arch.layers} layers, vocab {arch.vocab}",
        "",
        f"{s.devices} device(s) x {s.memory_gb:g} GiB; {s.prompts_per_step} prompts x G={s.group_size} per step, "
        f"sequences of {s.seq_len} tokens, {s.compute_dtype} activations, {s.param_dtype} parameters; "
        f"{describe(s)}: {s.tokens():,} tokens per micro-batch",
        "",
        "| per rank | memory |",
        "|---|---:|",
    ]
    shown = [(k, label) for k, label in PARTS if k != "reference" or s.reference_model]  # no row for grao, sft
    lines += [f"| {label} | {_gib(getattr(p, key))} |" for key, label in shown]
    lines += [
        f"| **total** (parameters + gradients + optimizer + reference + buffers + max(activations + loss, KV cache)) | "
        f"**{_gib(p.step_total)}** |",
        f"| device memory | {s.memory_gb:.2f} GiB |",
        f"| full fp32 logits + gradient the fused loss avoids | {_gib(p.full_logits_avoided)} |",
    ]
    if p.offloaded:
        lines.append(f"| offloaded to CPU memory | {_gib(p.offloaded)} |")
    lines += ["", f"**{'fits' if p.fits() else 'does not fit'}** ({_gib(p.step_total)} of {s.memory_gb:g} GiB).", ""]
    lines += ["| options | total | fits |", "|---|---:|---|"]
    lines += [
        f"| {describe(a.settings)} | {_gib(a.step_total)} | {'yes' if a.fits() else 'no'} |" for a in alternatives
    ]
    return "\n".join(lines) + "\n"


def to_json(arch: Architecture, p: Plan, alternatives: list[Plan]) -> dict:
    def row(q: Plan) -> dict:
        return dict(
            settings=asdict(q.settings),
            **{key: getattr(q, key) for key, _ in PARTS},
            full_logits_avoided=q.full_logits_avoided,
            offloaded=q.offloaded,
            trainable=q.trainable,
            total=q.step_total,
            fits=q.fits(),
        )

    return {"architecture": asdict(arch), "plan": row(p), "options": [row(a) for a in alternatives]}


def dumps(obj) -> str:
    return json.dumps(obj, indent=1)


def resolve_model(model: str) -> tuple[str, str | None]:
    """The model to plan for: a preset name, a local directory with a config.json, or (a directory without one,
    e.g. a config's placeholder path) the preset its directory name names, case-insensitively; with a note then."""
    if model in PRESETS or model == "tiny-moe" or (Path(model) / "config.json").is_file():
        return model, None
    name = Path(model).name.lower()
    if name in PRESETS:
        return name, f"{model} has no config.json; planning with the preset architecture {name!r}"
    raise PlanError(
        f"model {model!r} is neither a preset ({', '.join(PRESETS)}) nor a local directory with a config.json"
    )


def needs_reference_model(cfg) -> bool:
    """Whether ``cfg.objective.method``'s loss keeps a frozen reference model (its own ``needs_reference_model``; the
    hidden size only sizes ppo's value head, which the answer does not depend on)."""
    from ..losses import from_config

    return bool(getattr(from_config(cfg, hidden_size=1), "needs_reference_model", False))


def settings_from_config(cfg, devices: int, memory_gb: float, **overrides) -> Settings:
    """The plan's settings of a :class:`grao.config.TrainConfig` run on ``devices`` GPUs of ``memory_gb`` GiB
    (FSDP over all of them unless ``fsdp`` is given); ``overrides`` replace single settings."""
    s = Settings(
        devices=devices,
        memory_gb=memory_gb,
        prompts_per_step=cfg.rollout.prompts_per_step,
        micro_batch_prompts=cfg.runtime.micro_batch_prompts,
        group_size=cfg.rollout.group_size,
        seq_len=cfg.dataset.max_prompt_tokens + cfg.rollout.max_new_tokens,
        compute_dtype="fp32" if cfg.runtime.precision == "fp32" else "bf16",
        lora_rank=cfg.lora.rank,
        lora_base_dtype="fp32" if cfg.lora.base_dtype == "fp32" else "bf16",
        fsdp=devices,
        fsdp_param_dtype=getattr(cfg, "fsdp_param_dtype", "fp32"),
        cpu_offload=getattr(cfg, "fsdp_cpu_offload", False),
        gradient_checkpointing=cfg.runtime.gradient_checkpointing,
        reference_model=needs_reference_model(cfg),
        loss_backend="triton" if cfg.objective.loss_backend == "auto" else cfg.objective.loss_backend,
    )
    s = replace(s, **{k: v for k, v in overrides.items() if v is not None})
    for name in ("devices", "fsdp", "prompts_per_step", "group_size", "seq_len"):
        if getattr(s, name) < 1:
            raise PlanError(f"{name} must be >= 1, got {getattr(s, name)}")
    for name in ("lora_rank", "micro_batch_prompts"):
        if getattr(s, name) < 0:
            raise PlanError(f"{name} must be >= 0, got {getattr(s, name)}")
    if s.fsdp > s.devices:
        raise PlanError(f"fsdp ({s.fsdp}) must be <= devices ({s.devices})")
    if not s.memory_gb > 0:
        raise PlanError(f"memory_gb must be > 0, got {s.memory_gb}")
    for name in ("compute_dtype", "param_dtype", "lora_base_dtype", "fsdp_param_dtype"):
        if getattr(s, name) not in DTYPE_BYTES:
            raise PlanError(f"{name} must be one of {', '.join(DTYPE_BYTES)}, got {getattr(s, name)!r}")
    if s.loss_backend not in LOSS_BACKENDS:
        raise PlanError(f"loss_backend must be one of {', '.join(LOSS_BACKENDS)}, got {s.loss_backend!r}")
    return s
