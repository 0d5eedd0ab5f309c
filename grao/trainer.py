"""The GRAO training loop (arXiv 2508.07750) on Hugging Face causal LMs, without materialising the logits.

One step for P prompts:
  1. sample G completions per prompt (``rollout``);
  2. score them and the prompt's reference with the reward;
  3. build the group-major batch of P (G+1) sequences, reference last in each
     group, targets = ignore_index at prompt and padding positions;
  4. run the backbone for the final hidden states and call
     ``grao_kernels.grao_loss`` with the lm_head weight (``update``); the lm_head
     itself is never called, so the (tokens x vocabulary) logits never exist;
  5. for MoE models add the router load-balancing loss.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from grao_kernels import grao_loss

from . import config as config_mod
from . import demo_task, evaluate, generation, models, rewards
from .data import Example, load_jsonl
from .generation import encode_prompt, encode_reference

IGNORE_INDEX = -100
STATE_FILE = "trainer_state.pt"
TIME_KEYS = ("tokens_per_s", "time/generate", "time/train")


@dataclass
class Rollout:
    """P prompts with their G sampled completions and the rewards of completions and reference."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[list[int]]]  # [P][G+1] token ids, the reference last
    rewards: torch.Tensor  # (P, G+1) float32
    completions: list[list[str]]  # [P][G] decoded samples


def build_batch(rollout: Rollout, groups: range, pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """(input_ids, attention_mask, targets) for the sequences of ``groups``, right-padded.

    Position t of a sequence predicts token t + 1, so ``targets[s, t]`` is that
    token where it is a completion token and IGNORE_INDEX elsewhere.
    """
    seqs, starts = [], []
    for p in groups:
        for comp in rollout.completion_ids[p]:
            seqs.append(rollout.prompt_ids[p] + comp)
            starts.append(len(rollout.prompt_ids[p]))
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    targets = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
    for i, (s, start) in enumerate(zip(seqs, starts)):
        row = torch.tensor(s, dtype=torch.long)
        ids[i, : len(s)] = row
        mask[i, : len(s)] = 1
        targets[i, start - 1 : len(s) - 1] = row[start:]
    return ids.to(device), mask.to(device), targets.to(device)


def load_balancing_loss(router_logits, num_experts: int, top_k: int, attention_mask: torch.Tensor, groups: int = 1):
    """Switch-Transformer load-balancing loss (arXiv 2101.03961, Eq. 4-6) over all layers, padding excluded.

    ``router_logits``: one (S*T, E) tensor per MoE layer; ``attention_mask`` (S, T).
    The S sequences are split into ``groups`` equal consecutive groups and the
    loss is computed within each, returned as a (groups,) tensor; with
    ``groups=1`` it is transformers' ``load_balancing_loss_func``. Also returns
    each expert's share of the routed (token, slot) assignments, (E,).
    """
    mask = attention_mask.reshape(groups, -1).float()  # (groups, tokens per group)
    counts = torch.zeros(groups, num_experts, device=mask.device)
    prob_sum = torch.zeros(groups, num_experts, device=mask.device)
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1).view(groups, -1, num_experts)
        chosen = torch.nn.functional.one_hot(probs.topk(top_k, dim=-1).indices, num_experts).sum(2).float()
        counts = counts + (chosen * mask[..., None]).sum(1)
        prob_sum = prob_sum + (probs * mask[..., None]).sum(1)
    rows = mask.sum(1, keepdim=True) * len(router_logits)
    aux = num_experts * ((counts / rows) * (prob_sum / rows)).sum(1)
    load = counts.sum(0)
    return aux, (load / load.sum().clamp(min=1)).detach()


def lr_lambda(cfg: config_mod.TrainConfig) -> Callable[[int], float]:
    """Linear warmup, then cosine or linear decay to ``min_lr_ratio`` (or constant)."""
    warm, total, floor = cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio

    def f(i: int) -> float:  # i = optimizer steps taken so far
        if i < warm:
            return (i + 1) / warm
        if cfg.lr_schedule == "constant" or total <= warm:
            return 1.0
        progress = min(1.0, (i - warm) / max(1, total - warm))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.lr_schedule == "cosine" else 1 - progress
        return floor + (1 - floor) * decay

    return f


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = sorted((Path(run_dir) / "checkpoints").glob("step-*[0-9]"))
    ckpts = [c for c in ckpts if (c / STATE_FILE).is_file()]
    return ckpts[-1] if ckpts else None


def load_examples(cfg: config_mod.TrainConfig) -> tuple[list[Example], list[Example]]:
    """(train, held-out) examples for the config's data and eval_data.

    ``eval_data`` unset: the demo's own held-out set for demo data, else the
    last ``eval_size`` examples of the data file (removed from training).
    """
    held_out = None
    if cfg.data == "demo":
        train, held_out = demo_task.make_splits(cfg.demo_train_size, cfg.eval_size, cfg.seed)
    else:
        train = load_jsonl(cfg.data)
    if cfg.eval_data == "demo":
        held_out = demo_task.make_splits(0, cfg.eval_size, cfg.seed)[1]
    elif cfg.eval_data is not None:
        held_out = load_jsonl(cfg.eval_data)[: cfg.eval_size]
    elif held_out is None:
        if len(train) < 2:
            raise config_mod.ConfigError(f"{cfg.data} has {len(train)} example(s): too few to hold some out")
        k = min(cfg.eval_size, len(train) // 2)
        train, held_out = train[:-k], train[-k:]
    return train, held_out


class Trainer:
    """Owns the model, optimizer, data and run directory of one training run.

    ``reward`` overrides the config's reward with any callable; ``callbacks``
    are called as ``cb(trainer, step, metrics)`` after each training step.
    """

    def __init__(self, cfg: config_mod.TrainConfig, *, resume: bool = False, reward=None, callbacks=()):
        config_mod.validate(cfg)
        self.cfg = cfg
        self.run_dir = Path(cfg.output_dir)
        self.callbacks = list(callbacks)
        self.runtime = models.choose_runtime(cfg.device, cfg.precision, cfg.attn_implementation)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        elif cfg.model == models.TINY_MOE and self.runtime.device.type == "cpu":
            torch.set_num_threads(1)

        self.train_examples, self.eval_examples = load_examples(cfg)
        self.checkpoint = latest_checkpoint(self.run_dir) if resume else None
        if resume and self.checkpoint is None:
            raise config_mod.ConfigError(f"--resume: no checkpoint in {self.run_dir / 'checkpoints'}")
        if self.checkpoint is not None:
            self.model = models.load_model(self.checkpoint, self.runtime.attn_implementation).to(self.runtime.device)
            self.tokenizer = models.load_tokenizer(self.checkpoint)
        else:
            self.model, self.tokenizer = models.load(
                cfg.model, cfg.tokenizer, cfg.model_overrides, self.runtime, cfg.seed
            )
        self.reward = reward if reward is not None else rewards.resolve(cfg.reward, cfg.data, self.runtime.device)
        self.moe = models.moe_info(self.model)
        coef = cfg.router_aux_loss_coef
        self.aux_coef = float(coef if coef is not None else getattr(self.model.config, "router_aux_loss_coef", 0.0))
        if cfg.gradient_checkpointing:
            kwargs = {"use_reentrant": False}
            if hasattr(self.model, "activation_checkpointing_enable"):  # the newer transformers name
                self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        self.model.config.use_cache = True  # for generate; the training forward passes use_cache=False

        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.step = 0
        self.baseline_eval: list[float] | None = None  # held-out rewards of the starting model, for eval/nag
        self._stop = False
        self.last_eval: float | None = None
        if self.checkpoint is not None:
            self._load_state(self.checkpoint)

    # ------------------------------------------------------------------ data and rollout

    def prompts_for_step(self, step: int) -> list[Example]:
        """The P examples of ``step`` (1-based): consecutive slices of per-epoch permutations seeded by (seed, epoch)."""
        n, P = len(self.train_examples), self.cfg.prompts_per_step
        out = []
        for i in range((step - 1) * P, step * P):
            epoch, pos = divmod(i, n)
            perm = self._permutation(epoch)
            out.append(self.train_examples[perm[pos]])
        return out

    def _permutation(self, epoch: int) -> np.ndarray:
        cache = getattr(self, "_perm_cache", None)
        if cache is None or cache[0] != epoch:
            perm = np.random.default_rng([self.cfg.seed, epoch]).permutation(len(self.train_examples))
            self._perm_cache = cache = (epoch, perm)
        return cache[1]

    def rollout(self, examples: list[Example], step: int) -> Rollout:
        """Sample G completions per prompt (seeded by step, so a resumed run samples the same) and score all."""
        cfg, tok = self.cfg, self.tokenizer
        prompt_ids = [encode_prompt(tok, ex.prompt, cfg.max_prompt_tokens) for ex in examples]
        torch.manual_seed(cfg.seed * 1_000_003 + step)
        sampled = generation.generate(
            self.model,
            tok,
            prompt_ids,
            self.runtime,
            num_return=cfg.group_size,
            sample=True,
            temperature=cfg.temperature,
            max_new_tokens=cfg.max_new_tokens,
        )
        texts = generation.decode(tok, sampled)
        G = cfg.group_size
        prompts = [ex.prompt for ex in examples for _ in range(G)]
        refs = [ex.reference for ex in examples for _ in range(G)]
        sample_rewards = rewards.score(self.reward, prompts, texts, refs)
        ref_texts = [ex.reference for ex in examples]
        ref_rewards = rewards.score(self.reward, [ex.prompt for ex in examples], ref_texts, ref_texts)
        r = torch.tensor(sample_rewards, dtype=torch.float32).view(len(examples), G)
        r = torch.cat([r, torch.tensor(ref_rewards, dtype=torch.float32)[:, None]], dim=1)
        completion_ids = [
            sampled[p * G : (p + 1) * G] + [encode_reference(tok, ex.reference)] for p, ex in enumerate(examples)
        ]
        completions = [texts[p * G : (p + 1) * G] for p in range(len(examples))]
        return Rollout(prompt_ids, completion_ids, r, completions)

    # ------------------------------------------------------------------ the update

    def update(self, rollout: Rollout) -> dict:
        """One optimizer step on the rollout: :meth:`accumulate_gradients`, clipping, AdamW, schedule."""
        stats = self.accumulate_gradients(rollout)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        stats.update({"grad_norm": float(grad_norm), "lr": lr})
        return stats

    def accumulate_gradients(self, rollout: Rollout) -> dict:
        """Gradients of the step's loss (into ``.grad``), over micro-batches of whole prompt groups.

        ``grao_loss`` averages over the prompts it is given, so a micro-batch of
        m of the P groups is weighted m / P: the accumulated gradient equals the
        one-batch gradient (advantages are computed within each group, so
        splitting between groups changes nothing else). The MoE load-balancing
        loss is likewise computed within each prompt group (its G+1 sequences)
        and averaged over the P groups, so it too is the same for any split; a
        batch-wide balance loss would not be, as its token shares are not a sum
        over micro-batches.
        """
        cfg, model = self.cfg, self.model
        P = rollout.rewards.shape[0]
        mb = cfg.micro_batch_prompts or P
        model.train()
        self.optimizer.zero_grad(set_to_none=True)
        backbone = models.backbone(model)
        stats = dict.fromkeys(("loss", "objective/exploration", "objective/imitation", "objective/alignment"), 0.0)
        aux_total, load_total, n_tokens = 0.0, None, 0
        rewards_dev = rollout.rewards.to(self.runtime.device)
        for start in range(0, P, mb):
            groups = range(start, min(P, start + mb))
            frac = len(groups) / P
            ids, mask, targets = build_batch(rollout, groups, self.tokenizer.pad_token_id, self.runtime.device)
            n_tokens += int(mask.sum())
            extra = {"output_router_logits": True} if self.moe else {}
            with generation.autocast(self.runtime):
                out = backbone(input_ids=ids, attention_mask=mask, use_cache=False, **extra)
            hidden = out.last_hidden_state
            weight, bias = models.output_head(model)
            if self.runtime.autocast_dtype is not None:
                dt = self.runtime.autocast_dtype
                hidden, weight = hidden.to(dt), weight.to(dt)
                bias = None if bias is None else bias.to(dt)
            res = grao_loss(
                hidden,
                weight,
                targets,
                rewards_dev[start : start + len(groups)],
                bias=bias,
                beta=cfg.beta,
                lam=cfg.lam,
                ignore_index=IGNORE_INDEX,
                backend=cfg.loss_backend,
            )
            loss = res.loss * frac
            if self.moe and getattr(out, "router_logits", None):
                aux, load = load_balancing_loss(out.router_logits, *self.moe, mask, groups=len(groups))
                loss = loss + self.aux_coef * aux.sum() / P
                aux_total += float(aux.detach().sum()) / P
                load_total = load * frac if load_total is None else load_total + load * frac
            loss.backward()
            stats["loss"] += float(loss.detach())
            stats["objective/exploration"] += float(res.exploration) * frac
            stats["objective/imitation"] += float(res.imitation) * frac
            stats["objective/alignment"] += float(res.alignment) * frac
        stats.update({"moe/aux_loss": aux_total, "train_tokens": n_tokens})
        if load_total is not None:
            stats["moe/expert_load"] = [round(float(x), 4) for x in load_total]
        return stats

    def train_step(self, step: int) -> dict:
        t0 = time.perf_counter()
        ro = self.rollout(self.prompts_for_step(step), step)
        t1 = time.perf_counter()
        stats = self.update(ro)
        t2 = time.perf_counter()
        r = ro.rewards
        n_tokens = stats.pop("train_tokens")
        metrics = {
            "step": step,
            "reward/samples": float(r[:, :-1].mean()),
            "reward/reference": float(r[:, -1].mean()),
            **stats,
            "completion_len": sum(len(c) for g in ro.completion_ids for c in g[:-1]) / (r.shape[0] * (r.shape[1] - 1)),
            "tokens_per_s": n_tokens / max(t2 - t1, 1e-9),
            "time/generate": t1 - t0,
            "time/train": t2 - t1,
        }
        return metrics

    # ------------------------------------------------------------------ evaluation

    def evaluate(self) -> dict:
        cfg = self.cfg
        res = evaluate.evaluate(
            self.model,
            self.tokenizer,
            self.eval_examples,
            self.reward,
            self.runtime,
            max_new_tokens=cfg.max_new_tokens,
            max_prompt_tokens=cfg.max_prompt_tokens,
            batch_size=cfg.eval_batch_size,
            greedy=cfg.eval_greedy,
            temperature=cfg.temperature,
            seed=cfg.seed,
        )
        if self.baseline_eval is None:
            self.baseline_eval = res.rewards
        self.last_eval = res.mean_reward
        line = {
            "step": self.step,
            "eval/reward": res.mean_reward,
            "eval/ras": res.ras,
            "eval/nag": evaluate.nag(res.rewards, self.baseline_eval),
        }
        return line

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> Path:
        """``checkpoints/step-NNNNNN``: save_pretrained model and tokenizer plus optimizer, scheduler, RNG and step."""
        final = self.run_dir / "checkpoints" / f"step-{self.step:06d}"
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(tmp)
        self.tokenizer.save_pretrained(tmp)
        state = {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": {
                "python": random.getstate(),
                "numpy": np.random.get_state(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
            "baseline_eval": self.baseline_eval,
            "config": config_mod.to_dict(self.cfg),
        }
        torch.save(state, tmp / STATE_FILE)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        kept = sorted(p for p in final.parent.glob("step-*[0-9]") if (p / STATE_FILE).is_file())
        for old in kept[: -self.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def _load_state(self, ckpt: Path) -> None:
        state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        rng = state["rng"]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.step = int(state["step"])
        self.baseline_eval = state["baseline_eval"]

    # ------------------------------------------------------------------ the loop

    def request_stop(self) -> None:
        """Finish the current step, save a checkpoint and return from :meth:`train` (what Ctrl-C does)."""
        self._stop = True

    def _log(self, line: dict) -> None:
        with (self.run_dir / "metrics.jsonl").open("a") as fh:
            fh.write(json.dumps(line) + "\n")

    def _prepare_run_dir(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        metrics = self.run_dir / "metrics.jsonl"
        if self.checkpoint is None:  # a fresh run replaces what an earlier run left here
            for name in ("checkpoints", "initial"):
                shutil.rmtree(self.run_dir / name, ignore_errors=True)
            for name in ("metrics.jsonl", "plot.png"):
                (self.run_dir / name).unlink(missing_ok=True)
        elif metrics.is_file():  # drop what the interrupted run logged after its checkpoint
            lines = [ln for ln in metrics.read_text().splitlines() if ln.strip()]
            kept = [ln for ln in lines if json.loads(ln)["step"] <= self.step]
            metrics.write_text("".join(ln + "\n" for ln in kept))
        import yaml

        with (self.run_dir / "config.yaml").open("w") as fh:
            yaml.safe_dump(config_mod.to_dict(self.cfg), fh, sort_keys=False)

    def train(self) -> bool:
        """Train to ``cfg.steps``; True when done, False when stopped early (a checkpoint is saved either way)."""
        cfg = self.cfg
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            return self._train_loop()
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
            if cfg.plot and (self.run_dir / "metrics.jsonl").is_file():
                from .plot import plot_metrics

                plot_metrics(self.run_dir / "metrics.jsonl", self.run_dir / "plot.png")

    def _train_loop(self) -> bool:
        from tqdm.auto import tqdm

        cfg = self.cfg
        self._prepare_run_dir()
        if self.step == 0:
            if cfg.model == models.TINY_MOE:  # keep the random starting point: `grao eval` measures NAG against it
                self.model.save_pretrained(self.run_dir / "initial")
                self.tokenizer.save_pretrained(self.run_dir / "initial")
            self._log(self.evaluate())
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not cfg.progress, desc="grao train", dynamic_ncols=True)
        ema = None
        try:
            while self.step < cfg.steps and not self._stop:
                step = self.step + 1
                metrics = self.train_step(step)
                self.step = step
                self._log(metrics)
                r = metrics["reward/samples"]
                ema = r if ema is None else 0.9 * ema + 0.1 * r
                if step % cfg.eval_every == 0 or step == cfg.steps:
                    self._log(self.evaluate())
                for cb in self.callbacks:
                    cb(self, step, metrics)
                if step % cfg.save_every == 0 or step == cfg.steps or self._stop:
                    self.save_checkpoint()
                last = self.last_eval
                bar.set_postfix(reward=f"{ema:.3f}", eval="-" if last is None else f"{last:.3f}")
                bar.update(1)
        finally:
            bar.close()
        return self.step >= cfg.steps

    def _on_sigint(self, signum, frame) -> None:
        print("\ngrao: interrupted; finishing this step and saving a checkpoint (Ctrl-C again to abort)", flush=True)
        self._stop = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
