"""The demo's model and tokenizer: a tiny random Qwen3-MoE and a character-level tokenizer trained offline
on the embedded task's text."""

from __future__ import annotations

import torch

from ..data import tasks
from .errors import ModelError

TINY_MOE = "tiny-moe"
SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>")

# Sized so the demo learns its task from random init in a couple of minutes on 2 CPU cores.
TINY_MOE_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_experts=4,
    num_experts_per_tok=2,
    norm_topk_prob=True,
    max_position_embeddings=64,
    router_aux_loss_coef=0.01,
    tie_word_embeddings=False,
)


def build_demo_tokenizer(task: str = "demo"):
    """A character-level tokenizer trained with ``tokenizers`` on the text of the embedded task ``task``
    (:mod:`grao.data.tasks`): one token per character, so each digit of the addition task is a token."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.train_from_iterator(
        tasks.get(task).tokenizer_corpus(), trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS))
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", padding_side="left"
    )


def tiny_moe(tokenizer, overrides: dict | None = None, attn_implementation: str = "sdpa", seed: int = 0):
    """The built-in tiny Qwen3-MoE (4 experts, top-2) with random weights drawn from ``seed``."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    known = Qwen3MoeConfig().to_dict()
    known.update({alias: known.get(name) for alias, name in Qwen3MoeConfig.attribute_map.items()}, **TINY_MOE_CONFIG)
    check_overrides(overrides or {}, known)
    fields = dict(TINY_MOE_CONFIG, **(overrides or {}))
    fields.update(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    try:
        config = Qwen3MoeConfig(**fields)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    except Exception as exc:  # transformers raises TypeError, ValueError or its own validation errors
        raise ModelError(f"bad model_overrides {overrides}: {type(exc).__name__}: {exc}".splitlines()[0]) from None


def check_overrides(overrides: dict, defaults: dict) -> None:
    """ModelError for a ``model_overrides`` key the config does not have (a misspelling would be ignored), or a
    value of another type than the default's, or a count or size below 1."""
    import difflib

    for key, value in overrides.items():
        if key not in defaults:
            close = difflib.get_close_matches(key, list(defaults), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ModelError(f"model_overrides: unknown key {key!r}{hint}")
        default = defaults[key]
        if isinstance(default, bool) or default is None:
            continue
        if isinstance(default, int) and (isinstance(value, bool) or not isinstance(value, int)):
            raise ModelError(f"model_overrides: {key!r} must be an integer, got {type(value).__name__} {value!r}")
        if isinstance(default, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ModelError(f"model_overrides: {key!r} must be a number, got {type(value).__name__} {value!r}")
        if isinstance(default, int) and default >= 1 and value < 1:
            raise ModelError(f"model_overrides: {key!r} must be >= 1, got {value}")
