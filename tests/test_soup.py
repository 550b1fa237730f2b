"""Model soups: the uniform and greedy soups, BatchNorm re-estimation and state digests."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from lightning_modules.soup import (
    average_state_dicts,
    greedy_soup,
    has_batchnorm,
    reestimate_batchnorm,
    state_digest,
)
from tests.conftest import ONE_THREAD, ROOT


def tiny_net(seed: int) -> nn.Sequential:
    """conv + BN + ReLU + pool + linear, with seeded weights and non-trivial BN buffers."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.normal_()
        net[1].running_mean.normal_()
        net[1].running_var.uniform_(0.5, 2.0)
        net[1].num_batches_tracked.fill_(10 * (seed + 1))
    return net


# ---------------------------------------------------------------------------- uniform soup
def test_the_uniform_soup_is_the_elementwise_mean():
    members = [tiny_net(seed).state_dict() for seed in range(3)]
    first_conv = members[0]["0.weight"].clone()
    soup = average_state_dicts(members)

    assert list(soup) == list(members[0])
    for key, value in soup.items():
        assert value.dtype == members[0][key].dtype, key
        if key.endswith("num_batches_tracked"):
            assert value.item() == members[0][key].item() == 10  # from the first, not 20
        else:
            mean = torch.stack([m[key] for m in members]).mean(dim=0)
            torch.testing.assert_close(value, mean, rtol=1e-6, atol=1e-7)
            assert not torch.equal(value, members[0][key])  # really averaged
    # no shared memory: changing the soup leaves the members alone
    soup["0.weight"].add_(1.0)
    assert torch.equal(members[0]["0.weight"], first_conv)


def test_the_uniform_soup_keeps_half_precision_and_averages_in_float64():
    a = {"w": torch.tensor([1.0, 2.0], dtype=torch.float16), "n": torch.tensor(3)}
    b = {"w": torch.tensor([2.0, 4.0], dtype=torch.float16), "n": torch.tensor(7)}
    soup = average_state_dicts([a, b])
    assert soup["w"].dtype == torch.float16 and soup["n"].dtype == torch.int64
    assert soup["w"].tolist() == [1.5, 3.0] and soup["n"].item() == 3
    # float64 accumulation: 1e8 + 1 survives where a float32 sum would lose the 1
    big = [{"w": torch.tensor([1e8 + 1.0], dtype=torch.float64)}] * 3
    assert average_state_dicts(big)["w"].item() == 1e8 + 1.0
    assert average_state_dicts([a])["w"].tolist() == [1.0, 2.0]


def test_mismatched_state_dicts_raise_naming_the_key():
    a = tiny_net(0).state_dict()
    missing = {k: v for k, v in a.items() if k != "1.running_var"}
    with pytest.raises(ValueError, match=r"1\.running_var"):
        average_state_dicts([a, missing])
    extra = {**a, "7.weight": torch.zeros(2)}
    with pytest.raises(ValueError, match=r"7\.weight"):
        average_state_dicts([a, extra])
    reshaped = {**a, "5.weight": torch.zeros(2, 4)}
    with pytest.raises(ValueError, match=r"5\.weight"):
        average_state_dicts([a, reshaped])
    with pytest.raises(ValueError):
        average_state_dicts([])


# ---------------------------------------------------------------------------- greedy soup
def test_greedy_soup_keeps_only_additions_that_do_not_lower_the_score():
    """Ingredients as one-hot vectors: a soup's members are read off its nonzero entries."""
    own = {"a": 0.70, "bad": 0.65, "b": 0.90, "c": 0.60, "d": 0.70}
    names = list(own)
    candidates = [
        (name, {"w": torch.eye(len(names))[i], "n": torch.tensor(i)})
        for i, name in enumerate(names)
    ]
    offered, objects = [], []

    def score(state_dict):
        objects.append(state_dict)
        members = [names[i] for i in torch.nonzero(state_dict["w"]).flatten().tolist()]
        offered.append(members)
        if len(members) == 1:
            return own[members[0]]
        # a soup is better the more good ingredients it has; "bad" drags it down
        return 0.9 + 0.01 * len(members) - (0.2 if "bad" in members else 0.0)

    result = greedy_soup(candidates, score)

    assert result.order == ["b", "a", "d", "bad", "c"]  # descending, the tie a/d stable
    assert result.kept == ["b", "a", "d", "c"]
    assert len(offered) == 2 * len(names) - 1
    # alone: each candidate's own dict, in the given order; then new soups
    assert all(o is sd for o, (_, sd) in zip(objects, candidates, strict=False))
    assert not any(o is sd for o in objects[len(names) :] for _, sd in candidates)
    assert offered[len(names) :] == [
        ["a", "b"],
        ["a", "b", "d"],
        ["a", "bad", "b", "d"],
        ["a", "b", "c", "d"],
    ]
    assert result.scores == pytest.approx({"b": 0.90, "a": 0.92, "d": 0.93, "bad": 0.74, "c": 0.94})
    assert result.score == pytest.approx(0.94)
    expected = torch.zeros(len(names))
    expected[[names.index(k) for k in result.kept]] = 1 / 4
    torch.testing.assert_close(result.state_dict["w"], expected)
    assert result.state_dict["n"].item() == names.index("b")  # integers from the first kept


def test_greedy_soup_keeps_an_addition_that_ties_and_rejects_duplicate_names():
    candidates = [("x", {"w": torch.tensor([1.0])}), ("y", {"w": torch.tensor([3.0])})]
    result = greedy_soup(candidates, lambda sd: 0.5)  # all equal: ties keep the given order
    assert result.order == ["x", "y"] and result.kept == ["x", "y"]
    assert result.state_dict["w"].item() == 2.0
    with pytest.raises(ValueError, match="unique"):
        greedy_soup([candidates[0], candidates[0]], lambda sd: 0.5)
    with pytest.raises(ValueError):
        greedy_soup([], lambda sd: 0.5)


# ---------------------------------------------------------------------------- BatchNorm
def _net_with_bn_inside() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 5, 3),
        nn.Dropout(0.5),
        nn.BatchNorm2d(5, momentum=0.3),
        nn.ReLU(),
        nn.Conv2d(5, 4, 1),
        nn.BatchNorm2d(4),
        nn.Flatten(),
    )


def test_reestimated_statistics_are_those_of_all_inputs_concatenated():
    net = _net_with_bn_inside()
    net.eval()
    net[1].train()  # a submodule with its own flag: restored too
    params = {k: v.clone() for k, v in net.named_parameters()}
    seen = {2: [], 5: []}
    hooks = [
        net[i].register_forward_pre_hook(lambda m, a, i=i: seen[i].append(a[0].detach().clone()))
        for i in seen
    ]
    torch.manual_seed(1)
    batches = [torch.randn(n, 3, 6, 6) * 2 + 1 for n in (2, 5, 3)]  # unequal sizes

    assert reestimate_batchnorm(net, iter(batches)) == 2
    for h in hooks:
        h.remove()

    for i, inputs in seen.items():
        assert len(inputs) == 3
        x = torch.cat(inputs).double().transpose(0, 1).flatten(1)  # (C, all values)
        torch.testing.assert_close(net[i].running_mean, x.mean(1).float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            net[i].running_var, x.var(1, unbiased=True).float(), rtol=1e-5, atol=1e-6
        )
        assert net[i].num_batches_tracked.item() == 3
    assert net[2].momentum == 0.3 and net[5].momentum == 0.1
    assert not net.training and net[1].training and not net[2].training
    for k, v in net.named_parameters():
        assert torch.equal(v, params[k]), k
        assert v.grad is None


def test_the_first_layer_bn_matches_hand_computed_statistics_and_update_bn_for_equal_batches():
    torch.manual_seed(2)
    net = nn.Sequential(nn.BatchNorm1d(3), nn.Linear(3, 2))
    batches = [torch.randn(n, 3) * torch.tensor([1.0, 5.0, 0.1]) + 3 for n in (4, 4, 4)]
    assert reestimate_batchnorm(net, [(b, torch.zeros(len(b))) for b in batches]) == 1
    x = torch.cat(batches).double()
    torch.testing.assert_close(net[0].running_mean.double(), x.mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(net[0].running_var.double(), x.var(0), rtol=1e-5, atol=1e-6)

    reference = nn.Sequential(nn.BatchNorm1d(3), nn.Linear(3, 2))
    torch.optim.swa_utils.update_bn(batches, reference)
    torch.testing.assert_close(net[0].running_mean, reference[0].running_mean)  # equal sizes


def test_a_net_without_tracked_batchnorm_is_left_alone():
    net = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 1))
    before = state_digest(net)

    def no_batches():
        raise AssertionError("no forward pass may run")
        yield

    assert not has_batchnorm(net)
    assert reestimate_batchnorm(net, no_batches()) == 0
    assert state_digest(net) == before and net.training
    untracked = nn.Sequential(nn.BatchNorm1d(3, track_running_stats=False))
    assert has_batchnorm(untracked) and reestimate_batchnorm(untracked, no_batches()) == 0


def test_no_batches_is_an_error_before_anything_is_reset():
    net = tiny_net(0)
    before = state_digest(net)
    with pytest.raises(ValueError, match="no batches"):
        reestimate_batchnorm(net, [])
    assert state_digest(net) == before


# ---------------------------------------------------------------------------- digest
def test_state_digest_sees_every_tensor_and_not_the_dict_order():
    a, b = tiny_net(0), tiny_net(0)
    assert state_digest(a) == state_digest(b) == state_digest(a.state_dict())
    sd = a.state_dict()
    assert state_digest(dict(reversed(list(sd.items())))) == state_digest(sd)
    for key in sd:
        changed = dict(sd)
        changed[key] = sd[key].clone()
        changed[key].view(-1)[0] += 1
        assert state_digest(changed) != state_digest(sd), key
    # the same bytes under another dtype or shape are another state
    assert state_digest({"w": torch.zeros(4)}) != state_digest({"w": torch.zeros(2, 2)})
    assert state_digest({"w": torch.zeros(4)}) != state_digest({"w": torch.zeros(4).int()})
    # a non-contiguous view hashes like its contiguous copy
    t = torch.arange(6.0).reshape(2, 3)
    assert state_digest({"w": t.T}) == state_digest({"w": t.T.contiguous()})


def test_state_digest_exclude_leaves_out_the_head():
    a, b = tiny_net(0), tiny_net(0)
    with torch.no_grad():
        b[5].weight.add_(1.0)
    head = lambda name: name.startswith("5.")  # noqa: E731
    assert state_digest(a) != state_digest(b)
    assert state_digest(a, exclude=head) == state_digest(b, exclude=head)
    with torch.no_grad():
        b[0].bias.add_(1.0)
    assert state_digest(a, exclude=head) != state_digest(b, exclude=head)


def test_state_digest_is_the_same_in_another_process():
    code = (
        "import torch\n"
        "from lightning_modules.soup import state_digest\n"
        "g = torch.Generator().manual_seed(0)\n"
        "sd = {'b': torch.randn(3, 4, generator=g), 'a': torch.arange(5), 'c': torch.ones(2).bool()}\n"
        "print(state_digest(sd))\n"
    )
    other = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**ONE_THREAD, "PATH": "", "PYTHONHASHSEED": "123"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    g = torch.Generator().manual_seed(0)
    sd = {"b": torch.randn(3, 4, generator=g), "a": torch.arange(5), "c": torch.ones(2).bool()}
    assert other == state_digest(sd)
    assert len(other) == 64 and int(other, 16) >= 0


def test_only_the_batchnorm_layers_that_differ_are_reestimated():
    """Members that share a frozen BatchNorm keep its statistics in the soup; during the pass it
    normalises with them (eval mode), as at inference."""
    from lightning_modules.soup import differing_batchnorm

    torch.manual_seed(0)
    net = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with torch.no_grad():
        net[0].running_mean.fill_(0.5)
        net[0].running_var.fill_(2.0)
    a = {k: v.clone() for k, v in net.state_dict().items()}
    b = {k: v.clone() for k, v in a.items()}
    b["1.weight"] += 0.1  # the conv was fine-tuned ...
    b["2.running_mean"] += 0.3  # ... and so the BatchNorm after it
    assert differing_batchnorm(net, [a, b]) == ["2"]
    frozen = (net[0].running_mean.clone(), net[0].running_var.clone())
    inputs = []
    hook = net[1].register_forward_pre_hook(lambda m, args: inputs.append(args[0].clone()))
    batches = [torch.randn(6, 3, 8, 8) for _ in range(2)]
    assert reestimate_batchnorm(net, batches, only=["2"]) == 1
    hook.remove()
    assert torch.equal(net[0].running_mean, frozen[0]) and torch.equal(
        net[0].running_var, frozen[1]
    )
    expected = (batches[0] - 0.5) / torch.sqrt(torch.tensor(2.0) + net[0].eps)
    assert torch.allclose(inputs[0], expected * net[0].weight[None, :, None, None], atol=1e-5)
    conv_out = torch.cat([net[1](x) for x in inputs])
    assert torch.allclose(net[2].running_mean, conv_out.mean((0, 2, 3)), atol=1e-5)
