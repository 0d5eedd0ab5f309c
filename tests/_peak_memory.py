"""Run one forward+backward in a fresh process and print its memory high-water mark as JSON.

usage: python _peak_memory.py N H V [--naive] [--budget-mb MB]

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
    args = ap.parse_args()
    torch.set_num_threads(2)

    import grao_kernels
    from grao_kernels.reference import reference_grao

    if args.budget_mb is not None:
        grao_kernels.set_memory_budget(int(args.budget_mb * 2**20))
    G, T = 3, args.N // 8
    P = 2
    S = P * (G + 1)
    hidden = torch.randn(S, T, args.H, requires_grad=True)
    weight = (torch.randn(args.V, args.H) / args.H**0.5).requires_grad_(True)
    targets = torch.randint(0, args.V, (S, T))
    rewards = torch.randn(P, G + 1)
    # Warm up thread pools and the allocator on a tiny problem, outside the measurement.
    grao_kernels.grao_loss(hidden[:, :1], weight[:64], targets[:, :1] % 64, rewards, backend=args.backend)
    base = rss_bytes()
    if not reset_peak_rss():
        raise SystemExit("cannot reset the RSS high-water mark (/proc/self/clear_refs): no reliable measurement")
    if args.naive:
        loss = reference_grao(hidden, weight, targets, rewards)["loss"]
    else:
        loss = grao_kernels.grao_loss(hidden, weight, targets, rewards, backend=args.backend).loss
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
