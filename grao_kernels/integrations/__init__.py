"""GRAO and the fused log-probs inside other trainers.

Each submodule needs its framework and imports it when the submodule itself is
imported, never from ``import grao_kernels``:

* :mod:`grao_kernels.integrations.verl` (verl >= 0.9): a ``"grao"`` advantage
  estimator and a ``"grao"`` policy loss in verl's registries,
  :func:`~grao_kernels.integrations.verl.add_reference_responses`, which puts
  each group's reference answer into a rollout ``DataProto``, and
  ``patch_verl``, which puts :func:`grao_kernels.fused_linear_logprobs` behind
  the log-probs and entropies of verl's actor (``use_fused_kernels``).
* :mod:`grao_kernels.integrations.trl` (TRL >= 1.16): ``patch_trl(trainer)``,
  which makes a stock ``GRPOTrainer`` compute its log-probs and entropies with
  :func:`grao_kernels.fused_linear_logprobs`, ``GRAOConfig`` /
  ``GRAOTrainer``, GRAO on top of ``GRPOTrainer``, and ``ColocatedVLLM``,
  which makes TRL's ``use_vllm`` colocate mode work with vLLM >= 0.32.
* :mod:`grao_kernels.integrations.vllm` (vLLM >= 0.32, CPU build or CUDA): a
  policy's current weights into an in-process vLLM engine without a disk
  round trip (checkpoint names, LoRA merged, FSDP2 gathered layer by layer),
  and :func:`~grao_kernels.integrations.vllm.engine_supports`, why vLLM cannot
  run a model on a device. It imports vLLM only when its functions run.
"""
