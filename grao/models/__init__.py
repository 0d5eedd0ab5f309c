"""Models: loading (the demo's tiny MoE or a local Hugging Face directory), the model head (read from grao_kernels.hf), MoE routing
and balancing, LoRA, and the device/precision runtime and sampling the trainer and evaluation share."""

from .demo import SPECIAL_TOKENS, TINY_MOE, TINY_MOE_CONFIG, build_demo_tokenizer, tiny_moe
from .errors import ModelError
from .heads import LogitHead, backbone, logit_head, output_head
from .loading import (
    check_source,
    enable_activation_checkpointing,
    load,
    load_model,
    load_tokenizer,
    parameter_counts,
    remote_code_files,
)
from .lora import ADAPTER_CONFIG, add_lora, is_adapter, load_adapter, lora_base_dtype, unwrap
from .moe import (
    MoEInfo,
    Routing,
    aux_loss_coef,
    capture_routing,
    correction_biases,
    expert_counts,
    load_balancing_loss,
    moe_info,
    router_scoring,
    routers,
    update_router_bias,
)

__all__ = [
    "ADAPTER_CONFIG",
    "LogitHead",
    "MoEInfo",
    "ModelError",
    "Routing",
    "SPECIAL_TOKENS",
    "TINY_MOE",
    "TINY_MOE_CONFIG",
    "add_lora",
    "aux_loss_coef",
    "backbone",
    "build_demo_tokenizer",
    "capture_routing",
    "check_source",
    "correction_biases",
    "enable_activation_checkpointing",
    "expert_counts",
    "is_adapter",
    "load",
    "load_adapter",
    "load_balancing_loss",
    "load_model",
    "load_tokenizer",
    "logit_head",
    "lora_base_dtype",
    "moe_info",
    "output_head",
    "parameter_counts",
    "remote_code_files",
    "router_scoring",
    "routers",
    "tiny_moe",
    "unwrap",
    "update_router_bias",
]
