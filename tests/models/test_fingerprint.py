"""The weights fingerprint: equal weights hash equal, every way of changing weights changes the hash, and
the memo (keyed by tensor version counters) spares re-hashing unchanged weights."""

from __future__ import annotations

import hashlib

import pytest
import torch
from torch import nn

from vocabseg.models import fingerprint
from vocabseg.models.fingerprint import hash_tensors, weights_fingerprint


def small_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))


@pytest.fixture()
def count_hashes(monkeypatch):
    """Counts calls of the (expensive) full hash behind ``weights_fingerprint``."""
    calls = []
    real = fingerprint.hash_tensors

    def counting(tensors, *args, **kwargs):
        tensors = list(tensors)
        calls.append([name for name, _ in tensors])
        return real(tensors, *args, **kwargs)

    monkeypatch.setattr(fingerprint, "hash_tensors", counting)
    return calls


def test_digest_is_blake2b_of_names_dtypes_shapes_and_bytes():
    a, b = torch.arange(6, dtype=torch.float32).reshape(2, 3), torch.tensor([1, 2], dtype=torch.int64)
    h = hashlib.blake2b(digest_size=16)
    for name, t in (("a", a), ("b", b)):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    assert hash_tensors([("a", a), ("b", b)]) == h.hexdigest()
    # the name, the shape and the dtype are part of the hash, not only the bytes
    assert hash_tensors([("a", a.reshape(3, 2)), ("b", b)]) != h.hexdigest()
    assert hash_tensors([("x", a), ("b", b)]) != h.hexdigest()
    assert hash_tensors([("a", a.view(torch.int32)), ("b", b)]) != h.hexdigest()


def test_same_weights_give_the_same_digest_and_other_weights_another():
    a, b, c = small_net(0), small_net(0), small_net(1)
    assert weights_fingerprint(a) == weights_fingerprint(b)
    assert weights_fingerprint(a) != weights_fingerprint(c)
    # the digest is the hash of the sorted state dict (parameters and buffers)
    assert weights_fingerprint(a) == hash_tensors(sorted(a.state_dict().items()))
    assert len(weights_fingerprint(a)) == 32


@pytest.mark.parametrize(
    "change",
    [
        "copy_no_grad",
        "add_no_grad",
        "load_state_dict",
        "optimizer_step",
        "buffer_update_by_forward",
        "dtype",
        "replace_parameter",
        "data_add",
        "data_copy",
        "data_one_ulp",
    ],
)
def test_every_way_of_changing_weights_changes_the_digest(change, count_hashes):
    net = small_net(0)
    before = weights_fingerprint(net)
    assert weights_fingerprint(net) == before  # memoised
    first = net[0].weight
    if change == "copy_no_grad":
        with torch.no_grad():
            first.copy_(torch.ones_like(first))
    elif change == "add_no_grad":
        with torch.no_grad():
            first.add_(0.1)
    elif change == "load_state_dict":
        net.load_state_dict(small_net(1).state_dict())
    elif change == "optimizer_step":
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        net.train()
        net(torch.randn(5, 4)).square().sum().backward()
        opt.step()
    elif change == "buffer_update_by_forward":  # BatchNorm running statistics change in train mode
        net.train()
        with torch.no_grad():
            net(torch.randn(5, 4))
    elif change == "dtype":
        net.double()
    elif change == "replace_parameter":
        net[0].weight = nn.Parameter(first.detach() * 2)
    elif change == "data_add":  # writes through .data do not bump the version counter
        first.data.add_(0.1)
    elif change == "data_copy":
        first.data.copy_(torch.zeros_like(first))
    elif change == "data_one_ulp":  # the smallest possible change of one element, untracked
        first.data[1, 2] = torch.nextafter(first[1, 2].detach(), torch.tensor(float("inf")))
    after = weights_fingerprint(net)
    assert after != before
    assert after == hash_tensors(sorted(net.state_dict().items()))  # the new digest, not a stale one
    assert len(count_hashes) == 2  # hashed once before the change (memo hit on the repeat), once after


def test_writing_the_same_values_back_gives_the_same_digest():
    net = small_net(0)
    before = weights_fingerprint(net)
    saved = net[0].weight.detach().clone()
    with torch.no_grad():
        net[0].weight.add_(1.0)
    assert weights_fingerprint(net) != before
    with torch.no_grad():
        net[0].weight.copy_(saved)
    assert weights_fingerprint(net) == before  # content, not history


def test_memo_spares_the_second_hash(count_hashes):
    net = small_net(0)
    digest = weights_fingerprint(net)
    for _ in range(3):
        assert weights_fingerprint(net) == digest
    assert len(count_hashes) == 1
    other = small_net(0)  # another module with equal weights has its own memo entry
    assert weights_fingerprint(other) == digest
    assert len(count_hashes) == 2


def test_keep_filter_and_tags_are_separate_memo_entries(count_hashes):
    net = small_net(0)
    first_only = weights_fingerprint(net, keep=lambda n: n.startswith("0."), tag="first")
    everything = weights_fingerprint(net)
    assert count_hashes == [["0.bias", "0.weight"], sorted(net.state_dict())]
    assert first_only != everything
    assert first_only == hash_tensors([(n, t) for n, t in sorted(net.state_dict().items()) if n.startswith("0.")])
    # both memo entries survive each other: repeated calls hash nothing
    assert weights_fingerprint(net, keep=lambda n: n.startswith("0."), tag="first") == first_only
    assert weights_fingerprint(net) == everything
    assert len(count_hashes) == 2
    # a change outside the filter leaves the filtered digest unchanged, but it is re-checked and re-hashed
    # only when its own tensors changed
    with torch.no_grad():
        net[2].weight.add_(1.0)
    assert weights_fingerprint(net, keep=lambda n: n.startswith("0."), tag="first") == first_only
    assert len(count_hashes) == 2
    assert weights_fingerprint(net) != everything
    assert len(count_hashes) == 3


def test_inference_mode_tensors_are_hashed_every_time(count_hashes):
    with torch.inference_mode():
        net = small_net(0)
    digest = weights_fingerprint(net)
    assert weights_fingerprint(net) == digest
    assert len(count_hashes) == 2  # no version counter: never memoised, so never stale
