"""Bad input raises ValueError naming the argument and the shapes."""

from __future__ import annotations

import pytest
import torch

from grao_kernels import GRAOLoss, fused_linear_logprobs, grao_loss, group_advantages


def good(P=2, G=2, T=4, H=8, V=31):
    S = P * (G + 1)
    return dict(
        hidden=torch.randn(S, T, H),
        weight=torch.randn(V, H),
        targets=torch.randint(0, V, (S, T)),
        rewards=torch.randn(P, G + 1),
    )


def call(**over):
    args = good()
    kw = {"backend": "torch"}
    kw.update({k: over.pop(k) for k in list(over) if k not in args})
    args.update(over)
    return grao_loss(args["hidden"], args["weight"], args["targets"], args["rewards"], **kw)


@pytest.mark.parametrize(
    "over,pattern",
    [
        (dict(hidden=torch.randn(6, 8)), r"hidden must be \(S, T, H\), got shape \(6, 8\)"),
        (dict(weight=torch.randn(31, 8, 1)), r"weight must be \(V, H\), got shape \(31, 8, 1\)"),
        (dict(weight=torch.randn(31, 9)), r"hidden \(6, 4, 8\) has H=8 but weight \(31, 9\) has H=9"),
        (dict(targets=torch.randint(0, 31, (6, 5))), r"targets shape \(6, 5\) does not match hidden \(6, 4, 8\)"),
        (dict(targets=torch.randint(0, 31, (6, 4)).float()), r"targets must be an int64 tensor"),
        (dict(rewards=torch.randn(3, 3)), r"S=6 .* rewards \(3, 3\) implies S = P\*\(G\+1\) = 3\*3 = 9"),
        (dict(rewards=torch.randn(6, 1)), r"rewards \(6, 1\) needs at least 2 columns .*G >= 1"),
        (dict(rewards=torch.randn(6)), r"rewards must be \(P, G\+1\), got \(6,\)"),
        (
            dict(rewards=torch.tensor([[0.0, float("nan"), 1.0], [1.0, 2.0, 3.0]])),
            r"rewards \(2, 3\) contains non-finite",
        ),
        (dict(rewards=torch.tensor([[0.0, float("inf"), 1.0], [1.0, 2.0, 3.0]])), r"non-finite"),
        (dict(rewards=torch.ones(2, 3, dtype=torch.int64)), r"rewards must be floating point"),
        (dict(temperature=0.0), r"temperature must be a finite number > 0, got 0.0"),
        (dict(temperature=-1.0), r"temperature must be a finite number > 0"),
        (dict(eps=-1e-3), r"eps must be >= 0, got -0.001"),
        (dict(hidden=torch.randint(0, 3, (6, 4, 8))), r"hidden must be float32, bfloat16 or float16, got torch.int64"),
        (dict(weight=torch.randn(31, 8, dtype=torch.float64)), r"weight must be float32, bfloat16 or float16"),
        (dict(bias=torch.randn(30)), r"bias must be \(V,\) = \(31,\) to match weight \(31, 8\), got \(30,\)"),
        (dict(backend="cuda-magic"), r"backend must be 'auto' or one of .*available on cpu"),
    ],
)
def test_bad_input_raises_value_error(over, pattern):
    with pytest.raises(ValueError, match=pattern):
        call(**over)


@pytest.mark.parametrize("bad_id", [31, -1, 10**6])
def test_target_ids_outside_vocabulary(bad_id):
    args = good()
    args["targets"][2, 1] = bad_id
    with pytest.raises(ValueError, match=rf"targets \(6, 4\) holds id {bad_id} at \(2, 1\), outside \[0, V=31\)"):
        call(targets=args["targets"])
    with pytest.raises(ValueError, match="outside"):
        fused_linear_logprobs(args["hidden"], args["weight"], args["targets"], backend="torch")


def test_ignore_index_is_not_out_of_range():
    args = good()
    args["targets"][0] = -7
    out = call(targets=args["targets"], ignore_index=-7)
    assert out.seq_logp[0] == 0


def test_logprobs_and_advantages_validate_too():
    with pytest.raises(ValueError, match=r"targets shape \(3,\) does not match hidden \(4, 8\)"):
        fused_linear_logprobs(torch.randn(4, 8), torch.randn(5, 8), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        fused_linear_logprobs(torch.randn(4, 8), torch.randn(5, 8), torch.zeros(4, dtype=torch.long), temperature=0)
    with pytest.raises(ValueError, match=r"rewards must be \(P, K\), got \(4,\)"):
        group_advantages(torch.randn(4))
    with pytest.raises(ValueError, match="non-finite"):
        group_advantages(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="temperature"):
        GRAOLoss(temperature=-2)


def test_unknown_and_unavailable_backends_name_the_available_ones():
    args = good()
    with pytest.raises(ValueError, match=r"available on cpu: \[.*'torch'.*\]"):
        grao_loss(*args.values(), backend="nope")
    with pytest.raises(ValueError, match="backend must be a string"):
        grao_loss(*args.values(), backend=None)
