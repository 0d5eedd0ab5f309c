"""Bad input raises ValueError naming the argument and the shapes."""

from __future__ import annotations

import pytest
import torch

from grao_kernels import (
    GRAOLoss,
    fused_linear_logprobs,
    grao_coefficients,
    grao_loss,
    group_advantages,
    linear_logprob_loss,
)


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
    kw = {"backend": "torch", "group_size": 2}
    kw.update({k: over.pop(k) for k in list(over) if k not in args})
    args.update(over)
    return grao_loss(args["hidden"], args["weight"], args["targets"], args["rewards"], **kw)


@pytest.mark.parametrize(
    "over,pattern",
    [
        (dict(hidden=torch.randn(6, 8)), r"hidden must be \(S, T, H\), got shape \(6, 8\)"),
        (dict(weight=torch.randn(31, 8, 1)), r"weight must be \(V, H\).*got shape \(31, 8, 1\)"),
        (dict(weight=torch.randn(0, 8)), r"weight must be \(V, H\) with V >= 1, got shape \(0, 8\)"),
        (dict(weight=torch.randn(31, 9)), r"hidden \(6, 4, 8\) has H=8 but weight \(31, 9\) has H=9"),
        (dict(targets=torch.randint(0, 31, (6, 5))), r"targets shape \(6, 5\) does not match hidden \(6, 4, 8\)"),
        (dict(targets=torch.randint(0, 31, (6, 4)).float()), r"targets must be an int64 tensor"),
        (dict(rewards=torch.randn(3, 3)), r"S=6 .* rewards \(3, 3\) implies S = P\*\(G\+1\) = 3\*3 = 9"),
        (dict(rewards=torch.randn(6, 1), group_size=None), r"rewards \(6, 1\) needs at least 2 columns .*G >= 1"),
        (dict(rewards=torch.randn(6), group_size=None), r"rewards \(6,\): give group_size=G for \(P, G\+1\)"),
        (
            dict(rewards=torch.tensor([[0.0, float("nan"), 1.0], [1.0, 2.0, 3.0]])),
            r"rewards \(2, 3\) contains non-finite",
        ),
        (dict(rewards=torch.tensor([[0.0, float("inf"), 1.0], [1.0, 2.0, 3.0]])), r"non-finite"),
        (dict(rewards=torch.ones(2, 3, dtype=torch.int64)), r"rewards must be floating point"),
        (dict(temperature=0.0), r"temperature must be a finite number > 0, got 0.0"),
        (dict(temperature=-1.0), r"temperature must be a finite number > 0"),
        (dict(temperature=float("inf")), r"temperature must be finite, got inf"),
        (dict(temperature=1e-300), r"1 / temperature = 1e\+300 overflows float32"),
        (dict(temperature=1e-39), r"1 / temperature = .* overflows float32"),
        (dict(temperature=None), r"temperature must be a real number, got NoneType None"),
        (dict(temperature="0.7"), r"temperature must be a real number, got str '0.7'"),
        (dict(logit_scale=float("nan")), r"logit_scale must be finite, got nan"),
        (dict(logit_scale=0.0), r"logit_scale must be a finite number > 0"),
        (dict(logit_scale=1e30, temperature=1e-10), r"logit_scale / temperature = .* overflows float32"),
        (dict(softcap=0.0), r"softcap must be a finite number > 0, got 0.0"),
        (dict(softcap="30"), r"softcap must be a real number, got str"),
        (dict(beta=float("nan")), r"beta must be finite, got nan"),
        (dict(beta=float("inf")), r"beta must be finite, got inf"),
        (dict(lam=float("-inf")), r"lam must be finite, got -inf"),
        (dict(lam=None), r"lam must be a real number, got NoneType"),
        (dict(beta="0.5"), r"beta must be a real number, got str '0.5'"),
        (dict(eps=-1e-3), r"eps must be >= 0, got -0.001"),
        (dict(eps=float("nan")), r"eps must be finite, got nan"),
        (dict(ignore_index=None), r"ignore_index must be an int, got NoneType"),
        (dict(ignore_index=-100.0), r"ignore_index must be an int, got float"),
        (dict(validate="yes"), r"validate must be True or False, got str"),
        (dict(memory_budget=1000), r"memory_budget must be at least 1 MiB"),
        (dict(memory_budget="64MB"), r"memory_budget must be a number of bytes, got str"),
        (dict(hidden=torch.randint(0, 3, (6, 4, 8))), r"hidden must be float32, bfloat16 or float16, got torch.int64"),
        (dict(weight=torch.randn(31, 8, dtype=torch.float64)), r"weight must be float32, bfloat16 or float16"),
        (dict(bias=torch.randn(30)), r"bias must be \(V,\) = \(31,\) to match weight \(31, 8\), got \(30,\)"),
        (dict(backend="cuda-magic"), r"backend must be 'auto' or one of .*available on cpu"),
        (dict(group_size=0), r"group_size must be >= 1"),
        (dict(group_size=2.0), r"group_size must be an int, got float"),
    ],
)
def test_bad_input_raises_value_error(over, pattern):
    with pytest.raises(ValueError, match=pattern):
        call(**over)


def test_rewards_without_the_reference_cannot_pass_for_a_group():
    """(P, G) rewards of the completions alone, with the group size said, are refused."""
    args = good()
    S = args["hidden"].shape[0]
    with pytest.raises(ValueError, match=r"rewards \(3, 2\) has 2 columns but group_size=2 means G\+1 = 3"):
        grao_loss(args["hidden"], args["weight"], args["targets"], torch.randn(3, 2), group_size=2)
    with pytest.raises(ValueError, match=r"rewards \(3, 2\) has 2 columns but group_size=2"):
        grao_coefficients(torch.randn(3, 2), group_size=2)
    # The old positional call still works, says how to make the layout explicit, and equals the explicit one.
    with pytest.warns(FutureWarning, match=r"pass group_size=2"):
        old = grao_loss(args["hidden"], args["weight"], args["targets"], args["rewards"], backend="torch")
    new = grao_loss(args["hidden"], args["weight"], args["targets"], args["rewards"], group_size=2, backend="torch")
    assert torch.equal(old.loss, new.loss) and S == 6


@pytest.mark.parametrize(
    "group_ids,is_reference,pattern",
    [
        ([0, 0, 1, 1], [True, False, False, False], r"group 1 has 0 references among its 2 sequences"),
        ([0, 0, 1, 1], [True, True, True, False], r"group 0 has 2 references among its 2 sequences"),
        ([7, 7, 5, 9], [True, False, True, True], r"group 5 has 1 references among its 1 sequences.*one completion"),
        ([0, 0, 1], [True, False, True], r"group_ids shape \(3,\) does not match rewards \(4,\)"),
        ([0.0, 0.0, 1.0, 1.0], [True, False, True, False], r"group_ids must be an integer tensor"),
        ([0, 0, 1, 1], [1, 0, 1, 0], r"is_reference must be a bool tensor"),
    ],
)
def test_per_sequence_groups_are_checked(group_ids, is_reference, pattern):
    ids = torch.tensor(group_ids)
    ref = torch.tensor(is_reference)
    with pytest.raises(ValueError, match=pattern):
        grao_coefficients(torch.randn(4), group_ids=ids, is_reference=ref)


def test_layouts_cannot_be_mixed_or_left_unsaid():
    ids, ref = torch.tensor([0, 0]), torch.tensor([True, False])
    with pytest.raises(ValueError, match="either group_size .* or group_ids and is_reference, not both"):
        grao_coefficients(torch.randn(2), group_ids=ids, is_reference=ref, group_size=1)
    with pytest.raises(ValueError, match=r"give group_size=G"):
        grao_coefficients(torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"rewards must be \(S,\) with group_ids"):
        grao_coefficients(torch.randn(1, 2), group_ids=ids, is_reference=ref)


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
    with pytest.raises(ValueError, match="return_entropy must be True or False"):
        fused_linear_logprobs(torch.randn(4, 8), torch.randn(5, 8), torch.zeros(4, dtype=torch.long), return_entropy=1)
    with pytest.raises(ValueError, match=r"rewards must be \(P, K\) with K >= 2, got \(4,\)"):
        group_advantages(torch.randn(4))
    with pytest.raises(ValueError, match="non-finite"):
        group_advantages(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="temperature"):
        GRAOLoss(temperature=-2)
    with pytest.raises(ValueError, match="beta must be finite"):
        GRAOLoss(beta=float("nan"))


def test_linear_loss_coefficients_are_checked():
    h, w, t = torch.randn(2, 3, 8), torch.randn(5, 8), torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"coef shape \(2, 4\) does not match targets \(2, 3\)"):
        linear_logprob_loss(h, w, t, torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"coef must be a floating-point tensor shaped like targets, got torch.int64"):
        linear_logprob_loss(h, w, t, torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"coef requires grad.*pass coef.detach\(\)"):
        linear_logprob_loss(h, w, t, torch.randn(2, 3, requires_grad=True))
    with pytest.raises(ValueError, match=r"entropy_coef \(2, 3\) contains non-finite"):
        linear_logprob_loss(h, w, t, torch.randn(2, 3), entropy_coef=torch.full((2, 3), float("nan")))


def test_validate_false_skips_only_the_host_syncing_checks():
    args = good()
    args["targets"][0, 0] = 10**6
    with pytest.raises(ValueError, match="hidden must be float32"):
        call(hidden=args["hidden"].long(), validate=False)
    # An out-of-range id is not looked for: the caller vouches for the data.
    rewards = torch.tensor([[0.0, 1.0, float("nan")], [1.0, 2.0, 3.0]])
    coefs = grao_coefficients(rewards, group_size=2, validate=False)
    assert coefs.seq_coef.shape == (6,)


def test_unknown_and_unavailable_backends_name_the_available_ones():
    args = good()
    with pytest.raises(ValueError, match=r"available on cpu: \[.*'torch'.*\]"):
        grao_loss(*args.values(), group_size=2, backend="nope")
    with pytest.raises(ValueError, match="backend must be a string"):
        grao_loss(*args.values(), group_size=2, backend=None)
