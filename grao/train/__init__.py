"""Training: the loop (rollout, update, evaluation, logging), its micro-batches, the policy module and FSDP2
sharding, checkpoints and the run directory."""
