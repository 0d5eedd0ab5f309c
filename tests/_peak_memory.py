"""Run one forward+backward in a fresh process and print its memory high-water mark as JSON.

usage: python _peak_memory.py N H V [--naive] [--budget-mb MB] [--entropy]

The call is ``grao_loss``; with ``--entropy`` it is ``fused_linear_logprobs(...,
return_entropy=True)`` with a loss of both outputs (a policy-gradient term
plus an entropy bonus), so that the entropy's backward is measured too.

Reports ``extra_bytes``: the peak resident set during the call, minus the
resident set once inputs exist, minus the gradients the call returns. CPU
tensors come from the system allocator, so the RSS high-water mark is the peak
of live allocations (plus allocator slack: an over-estimate, never under).
"""

import argparse
import json

import torch

from grao_kernels.memory import peak_rss_bytes, reset_peak_rss, rss_bytes


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("N", type=int)
    ap.add_argument("H", type=int)
    ap.add_argument("V", type=int)
    ap.add_argument("--naive", action="store_true")
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--budget-mb", type=float, default=None)
    ap.add_argument("--entropy", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)

    import grao_kernels
    from grao_kernels.reference import reference_grao, reference_logprobs

    if args.budget_mb is not None:
        grao_kernels.set_memory_budget(int(args.budget_mb * 2**20))
    G, T = 3, args.N // 8
    P = 2
    S = P * (G + 1)
    hidden = torch.randn(S, T, args.H, requires_grad=True)
    weight = (torch.randn(args.V, args.H) / args.H**0.5).requires_grad_(True)
    targets = torch.randint(0, args.V, (S, T))
    rewards = torch.randn(P, G + 1)
    coef = torch.randn(S, T) / (S * T)

    def entropy_loss(logp, entropy):
        return (coef[:, : logp.shape[1]] * logp).sum() + 0.01 * entropy.sum()

    def call(h, w, t):
        if args.entropy and args.naive:
            return entropy_loss(*reference_logprobs(h, w, t, return_entropy=True))
        if args.entropy:
            return entropy_loss(*grao_kernels.fused_linear_logprobs(h, w, t, return_entropy=True, backend=args.backend))
        if args.naive:
            return reference_grao(h, w, t, rewards)["loss"]
        return grao_kernels.grao_loss(h, w, t, rewards, group_size=G, backend=args.backend).loss

    # Warm up thread pools and the allocator on a tiny problem, outside the measurement.
    call(hidden[:, :1], weight[:64], targets[:, :1] % 64)
    base = rss_bytes()
    if not reset_peak_rss():
        raise SystemExit("cannot reset the RSS high-water mark (/proc/self/clear_refs): no reliable measurement")
    loss = call(hidden, weight, targets)
    loss.backward()
    peak = peak_rss_bytes()
    grads = hidden.grad.numel() * hidden.grad.element_size() + weight.grad.numel() * weight.grad.element_size()
    print(
        json.dumps(
            {
                "extra_bytes": peak - base - grads,
                "peak_rss": peak,
                "base_rss": base,
                "grad_bytes": grads,
                "logits_bytes": S * T * args.V * 4,
                "loss": loss.item(),
            }
        )
    )


if __name__ == "__main__":
    main()
