"""DPO (Rafailov et al. 2023, arXiv 2305.18290) of each prompt's reference answer against one worse answer, with
the frozen starting model as its reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import LossBatch, LossOutput, check_number

DPO_REJECTED = ("auto", "data", "sampled")  # where dpo's rejected answers come from (grao.data.rejected_source)


class DPO:
    """DPO (Rafailov et al. 2023, arXiv 2305.18290, Eq. 7) on each prompt's reference answer and one sample::

        z_p  = beta * [(log pi(y_p) - log pi_ref(y_p)) - (log pi(o_p) - log pi_ref(o_p))]
        loss = (1/P) sum_p -log sigmoid(z_p)

    log pi(s) is the SUM of the completion tokens' log-probs (DPO's sequence
    likelihood, not GRAO's mean J); chosen y_p = the reference answer,
    rejected o_p = the group's lowest-scored sample (the first on ties). With
    the data's rejected answers (``dpo_rejected``: data, or auto on data that
    has them) the trainer builds each group as that answer and the reference
    (G = 1, nothing sampled), so o_p is the data's rejected answer.
    pi_ref is the frozen starting model: the trainer computes its token
    log-probs under no_grad (``LossBatch.reference_logp``) for a loss with
    ``needs_reference_model``. The other G - 1 samples get no gradient.
    """

    needs_reference_model = True

    def __init__(self, beta: float = 0.1, *, backend: str = "auto"):
        self.beta, self.backend = check_number("beta", beta, 0.0, low_open=True), backend

    def __call__(self, batch: LossBatch) -> LossOutput:
        frozen = batch.token_values(
            batch.reference_logp, "reference_logp", "DPO needs the frozen reference model's token log-probs"
        )
        G, m = batch.group_size, len(batch.groups)
        logp = batch.logprobs(self.backend)
        ignored = batch.targets == batch.ignore_index
        ref = torch.where(ignored, 0.0, frozen)
        delta = (logp.sum(1) - ref.sum(1)).view(m, G + 1)
        rejected = batch.rewards[:, :G].argmin(1).to(delta.device)
        margin = self.beta * (delta[:, G] - delta.gather(1, rejected[:, None])[:, 0])
        loss = F.softplus(-margin).sum() / batch.num_groups  # -log sigmoid(z) = softplus(-z)
        share = float(margin.detach().sum()) / batch.num_groups
        return LossOutput(loss, {"objective/dpo": float(loss.detach()), "dpo/margin": share}, logp.detach())
