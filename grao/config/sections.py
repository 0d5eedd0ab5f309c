"""The config's sections, one dataclass per part of a run, each key with its help, range or choices (:func:`key`).

The defaults are the embedded demo: ``grao train`` with no arguments trains the built-in tiny MoE on the bundled
synthetic task (:mod:`grao.data.demo_task`). A key is spelled by its field name where that is unique across the
sections (``lr``, ``group_size``) and ``section.name`` otherwise (``grpo.kl_beta``, ``lora.rank``); the keys of the
flat config before sections (``grpo_kl_beta``) still work, with a note naming the new spelling.

Float ranges reject values that cannot be meant: an AdamW lr above 1 moves every weight by about 1 per step, weight
decay above 1 shrinks weights past zero, loss weights or a temperature beyond 1e3 swamp every other term (the paper
uses beta 0.5, lambda 0.6, temperature 0.7), and a router bias step above 1 outweighs the sigmoid scores in [0, 1]
it is added to. A lower clip 1 - clip_epsilon below 0 clips nothing (ratios are positive); a clip range is a ratio's
distance from 1, so 1e3 bounds the upper one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from grao_kernels.backends import BACKENDS

from ..losses import DPO_REJECTED, GRPO_LOSS_TYPES, METHODS
from .fields import NON_NEGATIVE, POSITIVE, key

ROLLOUT_ENGINES = ("auto", "hf", "vllm")
WEIGHT = (0.0, 1e3, True)  # a loss weight or penalty: 0 turns it off
UNIT = (0.0, 1.0, True)


@dataclass
class Policy:
    """The model trained and its MoE router."""

    model: str = key("tiny-moe", "'tiny-moe' (built-in, random weights) or a local Hugging Face causal-LM directory")
    tokenizer: str | None = key(None, "tokenizer directory (default: the model's; the demo's for tiny-moe)")
    trust_remote_code: bool = key(
        False, "run the Python code a local model or tokenizer directory ships (its auto_map); only for code you trust"
    )
    model_overrides: dict = key({}, 'tiny-moe config fields, e.g. {"num_hidden_layers": 4} (JSON on the command line)')
    router_aux_loss_coef: float | None = key(
        None, "MoE load-balancing weight (default: the model config's)", range=WEIGHT
    )
    router_bias_update_rate: float = key(
        0.0,
        "DeepSeek-V3 auxiliary-loss-free balancing: after each step every expert's router bias moves this much "
        "toward balance (0 = off; arXiv 2412.19437 uses 0.001)",
        range=UNIT,
    )


@dataclass
class Dataset:
    """The training prompts and how they reach the model."""

    data: str = key("demo", "'demo' or a JSONL file of {prompt, reference} or HH-RLHF {chosen, rejected} lines")
    demo_train_size: int = key(4000, "training prompts of the demo task", range=POSITIVE)
    max_prompt_tokens: int = key(512, "prompts are cut to their last this many tokens", range=POSITIVE)
    chat_template: bool = key(
        False, "render each prompt as a user message through the tokenizer's chat template (when it has one)"
    )


@dataclass
class Rollout:
    """Each step's samples: P prompts, G completions each, scored by the reward (arXiv 2508.07750, Eq. 3)."""

    reward: str = key(
        "auto",
        "auto (demo for demo data, else edit), demo, exact, edit, model:DIR, module:function, or a pairwise judge "
        "R(o, y) in {-1, 0, 1}: judge-model:DIR (a local causal LM) or judge:module:function",
    )
    prompts_per_step: int = key(16, "P, prompts per step", range=POSITIVE)
    group_size: int = key(8, "G, sampled completions per prompt", range=POSITIVE)
    temperature: float = key(0.7, "sampling temperature of the completions", range=(0.0, 1e3, False))
    max_new_tokens: int | None = key(
        None, "longest completion, in tokens (default: 8 for tiny-moe, else 256)", range=POSITIVE
    )
    rollout_engine: str = key(
        "auto",
        "what samples the completions: hf (transformers' generate on the policy), vllm (an in-process vLLM engine, "
        "weights synced after each optimizer step) or auto (vllm when it is installed and runs the model on this "
        "device, else hf)",
        choices=ROLLOUT_ENGINES,
    )
    vllm_kv_cache_bytes: int = key(
        1 << 30,
        "vllm: the engine's KV cache in bytes, allocated in full at start (CPU; on CUDA vllm_gpu_memory_utilization "
        "sizes it)",
        range=POSITIVE,
        resume_safe=True,
    )
    vllm_gpu_memory_utilization: float = key(
        0.3,
        "vllm on CUDA: the share of the GPU's memory the engine may take (weights and KV cache), next to training",
        range=(0.0, 1.0, False),
        resume_safe=True,
    )
    vllm_sleep: bool = key(
        True,
        "vllm on CUDA: free the engine's KV cache and offload its weights while the update runs (sleep mode level "
        "1), woken before each rollout",
        resume_safe=True,
    )
    vllm_importance_sampling_cap: float = key(
        0.0,
        "grpo/ppo with num_iterations > 1 on the vllm engine: weight each token's policy loss by "
        "min(exp(old logp - engine logp), cap), TRL's truncated importance-sampling correction of the engine's "
        "sampling mismatch (0 = off; TRL uses 2)",
        range=(0.0, 1e3, True),
    )


@dataclass
class Judge:
    """A judge-model:DIR reward's generation."""

    template: str | None = key(
        None,
        "judge-model's prompt: a text file using {prompt}, {response}, {reference} (default: the built-in one)",
        flat="judge_template",
    )
    max_new_tokens: int = key(
        16, "judge-model's longest verdict reply, in tokens (greedy)", range=POSITIVE, flat="judge_max_new_tokens"
    )
    batch_size: int = key(
        16, "judge-model's prompts per generate call", range=POSITIVE, resume_safe=True, flat="judge_batch_size"
    )


@dataclass
class Objective:
    """The training objective and what every method shares: log-prob temperature, reuse of a rollout, clipping."""

    method: str = key("grao", f"training objective: {', '.join(METHODS)} (grao.losses)", choices=METHODS)
    logprob_temperature: str = key(
        "1",
        "temperature of the log-probs every loss (and the frozen reference model) computes: 1 (the model's own "
        "distribution) or sampling (logits / temperature, as TRL)",
        choices=("1", "sampling"),
    )
    num_iterations: int = key(
        1,
        "optimizer steps on each rollout (TRL's num_iterations); grpo and ppo clip their ratio to the sampling "
        "policy's log-probs, methods without such a correction (grao, sft, dpo) take the same loss again",
        range=POSITIVE,
    )
    clip_epsilon: float = key(
        0.2,
        "ppo's ratio clip [1 - eps, 1 + eps]; grpo's lower clip 1 - eps (with num_iterations > 1)",
        range=(0.0, 1.0, False),
    )
    clip_epsilon_high: float | None = key(
        None,
        "grpo with num_iterations > 1: the ratio's upper clip 1 + clip_epsilon_high (default: clip_epsilon)",
        range=(0.0, 1e3, False),
    )
    loss_backend: str = key(
        "auto", "grao_kernels backend: auto, torch, triton or native", choices=("auto", *BACKENDS), resume_safe=True
    )


@dataclass
class Grao:
    """GRAO's weights (arXiv 2508.07750, Eq. 4)."""

    beta: float = key(0.5, "imitation weight", range=WEIGHT)
    lam: float = key(0.6, "alignment weight", range=WEIGHT)


@dataclass
class Grpo:
    """method grpo (as TRL's GRPOTrainer)."""

    loss_type: str = key(
        "grpo",
        f"grpo's loss aggregation, as TRL's loss_type: {', '.join(GRPO_LOSS_TYPES)}",
        choices=GRPO_LOSS_TYPES,
        flat="grpo_loss_type",
    )
    kl_beta: float = key(
        0.0,
        "grpo's weight of the k3 KL estimate to the frozen starting model, per token (0 = off, as TRL's beta)",
        range=WEIGHT,
        flat="grpo_kl_beta",
    )


@dataclass
class Dpo:
    """method dpo."""

    beta: float = key(
        0.1,
        "dpo's beta, the weight of its implicit KL to the frozen starting model",
        range=(0.0, 1e3, False),
        flat="dpo_beta",
    )
    rejected: str = key(
        "auto",
        "dpo's rejected answer: data (each example's 'rejected', e.g. HH-RLHF; no sampling), sampled (the "
        "lowest-scored of the G samples) or auto (data when every training example has one, else sampled)",
        choices=DPO_REJECTED,
        flat="dpo_rejected",
    )


@dataclass
class Ppo:
    """method ppo: a value head, GAE and a per-token KL penalty."""

    kl_coef: float = key(
        0.05, "ppo's per-token KL penalty to the frozen starting model, in the reward", range=WEIGHT, flat="ppo_kl_coef"
    )
    gamma: float = key(1.0, "ppo's discount over completion tokens", range=UNIT, flat="ppo_gamma")
    gae_lambda: float = key(0.95, "ppo's GAE lambda", range=UNIT, flat="ppo_gae_lambda")
    vf_coef: float = key(0.1, "ppo's value-loss weight", range=WEIGHT, flat="ppo_vf_coef")
    vf_clip: float = key(
        0.2,
        "ppo's value clip: new values stay within this of the rollout's",
        range=(0.0, 1e3, False),
        flat="ppo_vf_clip",
    )


@dataclass
class Optimizer:
    """AdamW and its learning-rate schedule."""

    lr: float | None = key(
        None, "peak AdamW learning rate (default: 3e-3 for tiny-moe, else the paper's 1e-6)", range=(0.0, 1.0, False)
    )
    weight_decay: float = key(0.01, "AdamW weight decay", range=UNIT)
    warmup_steps: int | None = key(None, "linear warmup steps (default: 20 for tiny-moe, else 0)", range=NON_NEGATIVE)
    lr_schedule: str = key(
        "cosine", "after warmup: cosine, linear or constant", choices=("cosine", "linear", "constant")
    )
    min_lr_ratio: float = key(0.1, "final learning rate / peak for cosine and linear", range=UNIT)
    max_grad_norm: float = key(1.0, "gradient clipping norm", range=(0.0, math.inf, False))


@dataclass
class Lora:
    """LoRA (peft): a frozen base with trained low-rank adapters; the lm_head stays frozen and still feeds the loss."""

    rank: int = key(0, "LoRA adapter rank r; 0 = off (full fine-tuning)", range=NON_NEGATIVE, flat="lora_rank")
    alpha: float = key(
        16.0,
        "LoRA scaling numerator: the adapter update is (alpha / r) B A",
        range=(0.0, 1e4, False),
        flat="lora_alpha",
    )
    dropout: float = key(0.0, "dropout on the LoRA adapters' input, in [0, 1)", range=UNIT, flat="lora_dropout")
    target_modules: str = key(
        "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        "comma-separated names of the Linear modules that get adapters (never the lm_head)",
        flat="lora_target_modules",
    )
    base_dtype: str = key(
        "auto",
        "dtype of the frozen LoRA base: auto (bf16 on CUDA, fp32 on CPU), fp32 or bf16",
        choices=("auto", "fp32", "bf16"),
        resume_safe=True,
        flat="lora_base_dtype",
    )


@dataclass
class Runtime:
    """Where and how each step is computed; none of these change what it computes."""

    device: str = key("auto", "auto, cpu, cuda, cuda:1, ...", resume_safe=True)
    precision: str = key(
        "auto",
        "auto (bf16 autocast on CUDA, fp32 on CPU), fp32 or bf16",
        choices=("auto", "fp32", "bf16"),
        resume_safe=True,
    )
    attn_implementation: str = key(
        "auto",
        "auto (flash_attention_2 on CUDA when installed, else sdpa), sdpa, eager",
        choices=("auto", "sdpa", "eager", "flash_attention_2"),
        resume_safe=True,
    )
    threads: int = key(
        0,
        "torch CPU threads; 0 = 1 for tiny-moe on CPU (its tiny matmuls only lose to thread sync)",
        range=NON_NEGATIVE,
        resume_safe=True,
    )
    micro_batch_prompts: int = key(
        0,
        "prompt groups per forward/backward, gradients accumulated; 0 = all P at once",
        range=NON_NEGATIVE,
        resume_safe=True,
    )
    gradient_checkpointing: bool = key(False, "recompute activations in the backward pass", resume_safe=True)


@dataclass
class Fsdp:
    """Several processes (torchrun) and the FSDP2 memory options; either shards the model (grao.train.distributed)."""

    cpu_offload: bool = key(
        False,
        "FSDP2 CPU offload: sharded parameters, gradients and optimizer state live in CPU memory",
        resume_safe=True,
        flat="fsdp_cpu_offload",
    )
    param_dtype: str = key(
        "fp32",
        "FSDP2 parameter dtype for compute: bf16 all-gathers and computes in bf16 over fp32 master weights "
        "(gradients reduced in fp32)",
        choices=("fp32", "bf16"),
        resume_safe=True,
        flat="fsdp_param_dtype",
    )


@dataclass
class Evaluation:
    """The held-out evaluation (mean reward, RAS, NAG) at step 0, every few steps and at the end."""

    data: str | None = key(
        None, "held-out JSONL or 'demo' (default: the demo's, else the last eval_size of data)", flat="eval_data"
    )
    size: int = key(64, "held-out prompts evaluated", range=POSITIVE, flat="eval_size")
    every: int = key(
        25,
        "evaluate every this many steps (and at step 0 and the end)",
        range=POSITIVE,
        resume_safe=True,
        flat="eval_every",
    )
    batch_size: int = key(
        64, "prompts per generate call in evaluation", range=POSITIVE, resume_safe=True, flat="eval_batch_size"
    )
    greedy: bool = key(True, "greedy decoding in evaluation (false: sample at temperature)", flat="eval_greedy")


@dataclass
class Run:
    """The run directory, its length and seed, its checkpoints and what it shows."""

    output_dir: str = key("runs/demo", "run directory: config, metrics, plot, checkpoints", resume_safe=True)
    seed: int = key(0, "seeds the data order, the model init and each step's sampling")
    steps: int = key(
        200,
        "training steps, each a rollout and num_iterations optimizer steps on it (a resumed run may extend it; "
        "the lr schedule stretches)",
        range=POSITIVE,
        resume_safe=True,
    )
    save_every: int = key(100, "checkpoint every this many steps (and at the end)", range=POSITIVE, resume_safe=True)
    keep_checkpoints: int = key(2, "checkpoints kept, newest first", range=POSITIVE, resume_safe=True)
    plot: bool = key(True, "write plot.png at the end", resume_safe=True)
    progress: bool = key(True, "show a progress bar", resume_safe=True)


# section name -> its dataclass, in the order of ``grao train --help`` and of a written config.yaml
SECTIONS = {
    "run": Run,
    "policy": Policy,
    "dataset": Dataset,
    "rollout": Rollout,
    "judge": Judge,
    "objective": Objective,
    "grao": Grao,
    "grpo": Grpo,
    "dpo": Dpo,
    "ppo": Ppo,
    "optimizer": Optimizer,
    "lora": Lora,
    "runtime": Runtime,
    "fsdp": Fsdp,
    "evaluation": Evaluation,
}
