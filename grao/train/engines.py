"""The rollout engines: what samples each step's completions (and, with vLLM, answers the held-out prompts).

One contract, two engines: token-id prompts in; out, ``n`` completions per prompt, prompt-major, each a list of
token ids cut after its first eos exactly as :func:`grao.models.generation.generate` returns them, with the
engine's log-prob of every completion token where it has them (:class:`Samples`).

* :class:`HFEngine`: transformers' ``generate`` on the policy itself (under FSDP too), torch's global RNG seeded
  per step; nothing to sync.
* :class:`VLLMEngine`: an in-process vLLM ``LLM`` created once per run
  (:mod:`grao_kernels.integrations.vllm`), in the policy's compute dtype, fed token ids, each prompt's request
  seeded from (seed, step, rank, prompt) so a resumed run samples the same completions, torch's RNG untouched.
  Its weights go stale with every optimizer step: :meth:`VLLMEngine.sync` pushes the policy's current weights
  (LoRA merged, FSDP2 gathered layer by layer) before the next rollout or evaluation. On CUDA it sleeps (frees its
  KV cache and offloads its weights) while the update runs, as TRL's colocate mode; under torchrun each rank has
  its own engine (tensor parallel 1) on its own GPU.

:func:`choose` decides which engine a run uses and why (``rollout_engine`` auto: vLLM when it is installed and runs
the model on this device).
"""

from __future__ import annotations

import tempfile
import time
from typing import NamedTuple

import numpy as np
import torch

from ..config import ConfigError
from ..models import generation


class Samples(NamedTuple):
    completions: list[list[int]]  # n per prompt, prompt-major, each cut after its first eos
    logprobs: list[list[float]] | None  # the engine's log-prob of each completion token; None: the engine has none


class Choice(NamedTuple):
    engine: str  # 'hf' or 'vllm'
    why: str


def sampling_seed(seed: int, step: int, rank: int) -> int:
    """torch's seed for step ``step``'s sampling on rank ``rank`` (the HF engine's: a resumed run samples the same)."""
    return seed * 1_000_003 + step + 1_000_000_007 * rank


def choose(setting: str, config, device: torch.device, max_model_len: int, world_size: int = 1) -> Choice:
    """Which engine samples (``setting``: ``rollout_engine``) and why. ``auto`` is vllm when vLLM is installed and
    runs the model of Hugging Face ``config`` (its architecture, head size, MoE sizes, context ``max_model_len``;
    :func:`grao_kernels.integrations.vllm.engine_config` of the model) on ``device``, else hf; ``vllm`` that vLLM
    cannot run is a ConfigError naming the reason."""
    if setting == "hf":
        return Choice("hf", "rollout_engine hf")
    from grao_kernels.integrations import vllm as integration

    reason = integration.engine_supports(config, device, max_model_len)
    if reason is None and world_size > 1 and torch.device(device).type != "cuda":
        reason = "one vLLM engine per process runs on CUDA only (one GPU per rank)"
    if setting == "vllm":
        if reason is not None:
            raise ConfigError(f"'rollout_engine' vllm: {reason}")
        return Choice("vllm", "rollout_engine vllm")
    if reason is not None:
        return Choice("hf", f"auto: {reason}")
    return Choice("vllm", f"auto: vLLM {integration.vllm_version()} runs this model on {torch.device(device).type}")


class HFEngine:
    """transformers' ``generate`` on the policy (its FSDP-registered forward method under torchrun)."""

    name = "hf"

    def __init__(self, policy, tokenizer):
        self.policy, self.tokenizer = policy, tokenizer

    def sample(self, prompt_ids, *, n: int, temperature: float, max_new_tokens: int, seed: int) -> Samples:
        torch.manual_seed(seed)
        completions = self.policy.generate(
            self.tokenizer,
            prompt_ids,
            num_return=n,
            sample=True,
            temperature=temperature,
            max_new_tokens=max_new_tokens,
        )
        return Samples(completions, None)

    def mark_stale(self) -> None:
        """The policy changed: nothing to do, generate runs on the policy itself."""

    def sleep(self) -> None:
        """Nothing to free while the update runs."""

    def sync(self, model) -> float:
        return 0.0

    def close(self) -> None:
        pass


class VLLMEngine:
    """An in-process vLLM engine colocated with the trainer; see the module docstring.

    ``max_model_len``: the longest prompt plus completion. ``logprob_temperature``: the temperature of the trainer's
    log-probs (1, or the sampling temperature): the engine reports its log-probs of the raw distribution for 1 and
    of the temperature-scaled one otherwise, so they compare with the trainer's (``rollout/logp_gap``).
    """

    name = "vllm"

    def __init__(self, model, tokenizer, cfg, runtime, world, max_model_len: int, logprob_temperature: float):
        from grao_kernels.integrations import vllm as integration

        self.integration, self.tokenizer, self.rank = integration, tokenizer, world.rank
        self.device = runtime.device
        cuda = self.device.type == "cuda"
        dtype = runtime.autocast_dtype or next(p for p in model.parameters()).dtype
        args = dict(enforce_eager=not cuda)  # CPU: no graph capture to gain; eager also starts faster
        if cuda:
            args.update(gpu_memory_utilization=cfg.vllm_gpu_memory_utilization, enable_sleep_mode=cfg.vllm_sleep)
            if world.size > 1:  # one engine per rank, tensor parallel 1, on the rank's own GPU (TRL's colocate mode)
                args.update(distributed_executor_backend="external_launcher", tensor_parallel_size=1)
        else:
            args.update(kv_cache_memory_bytes=cfg.vllm_kv_cache_bytes)
        self.sleeps = cuda and cfg.vllm_sleep
        self.asleep, self.stale = False, True  # built with dummy weights: synced before its first use
        self._config_dir = tempfile.TemporaryDirectory(prefix="grao-vllm-")  # the config.json vLLM builds from
        self.llm = integration.create_llm(
            integration.engine_config(model),
            dtype=dtype,
            max_model_len=max_model_len,
            seed=cfg.seed,
            logprobs_mode="processed_logprobs" if logprob_temperature != 1.0 else "raw_logprobs",
            directory=self._config_dir.name,
            **args,
        )
        memory = (
            f"{cfg.vllm_gpu_memory_utilization:g} of the GPU's memory{', sleeping during updates' if self.sleeps else ''}"
            if cuda
            else f"KV cache {cfg.vllm_kv_cache_bytes / 2**30:.2f} GiB"
        )
        self.description = (
            f"vLLM {integration.vllm_version()} in-process on {self.device}, {str(dtype).removeprefix('torch.')}, "
            f"{memory}"
        )

    # ------------------------------------------------------------------ weights

    def mark_stale(self) -> None:
        """The policy took an optimizer step: sync before the next generate."""
        self.stale = True

    def sleep(self) -> None:
        """On CUDA with sleep mode: free the KV cache and offload the weights until the next sync, leaving the
        memory to the update."""
        if self.sleeps and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def sync(self, model) -> float:
        """Push ``model``'s current weights into the engine if it is stale (waking it first); the seconds taken."""
        if not self.stale:
            return 0.0
        started = time.perf_counter()
        if self.asleep:
            self.llm.wake_up(tags=["weights"])
        self.integration.load_weights(self.llm, self.integration.checkpoint_tensors(model))
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        self.stale = False
        return time.perf_counter() - started

    # ------------------------------------------------------------------ generation

    def sample(self, prompt_ids, *, n: int, temperature: float, max_new_tokens: int, seed: int) -> Samples:
        """``n`` sampled completions per prompt at ``temperature``, each prompt's request seeded from ``seed`` and
        its position (one seed for all would make G copies of a prompt sample alike)."""
        seeds = np.random.SeedSequence([seed % 2**63, self.rank]).generate_state(len(prompt_ids), np.uint32)
        return self._generate(prompt_ids, n, temperature, max_new_tokens, [int(s) for s in seeds])

    def respond(self, prompt_ids, *, greedy: bool, temperature: float, max_new_tokens: int, seed: int):
        """One completion per prompt for evaluation: greedy, or sampled at ``temperature`` from ``seed``."""
        if greedy:
            return self._generate(prompt_ids, 1, 0.0, max_new_tokens, [None] * len(prompt_ids)).completions
        return self.sample(prompt_ids, n=1, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)[0]

    def _generate(self, prompt_ids, n, temperature, max_new_tokens, seeds) -> Samples:
        from vllm import SamplingParams

        if self.stale:
            raise RuntimeError("the vLLM engine holds weights older than the policy's: sync() before generating")
        eos = self.tokenizer.eos_token_id
        params = [
            SamplingParams(
                n=n,
                temperature=temperature,
                max_tokens=max_new_tokens,
                seed=s,
                stop_token_ids=[eos],
                logprobs=0 if temperature > 0 else None,  # the sampled token's own log-prob
            )
            for s in seeds
        ]
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # vLLM's sampler must not move the trainer's RNG
            results = self.llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params, use_tqdm=False)
        completions, logprobs = [], []
        for result in results:
            for out in sorted(result.outputs, key=lambda o: o.index):
                tokens = generation.trim(list(out.token_ids), eos)
                completions.append(tokens)
                if out.logprobs is not None:
                    logprobs.append([float(step[t].logprob) for step, t in zip(out.logprobs, tokens)])
        return Samples(completions, logprobs if temperature > 0 else None)

    def close(self) -> None:
        """vLLM's own teardown, now rather than at interpreter exit: it frees the engine's memory and ends the
        process groups vLLM made or joined, which must still exist then; a later engine in this process starts
        clean."""
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None
        self._config_dir.cleanup()
