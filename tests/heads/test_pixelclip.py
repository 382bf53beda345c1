"""PixelCLIP's training pieces against literal re-computations: Sinkhorn-Knopp (also split over two gloo
processes), mask pooling, target merging, the conv head, the covered-pixel BCE and the class prompts."""

from __future__ import annotations

import json
import os

import open_clip
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import make_tiny_clip

from vocabseg.heads.pixelclip import (
    ClassPrompts,
    ConvHead,
    covered_bce,
    hard_assignment,
    mask_pool,
    merge_targets,
    placeholder_template,
    sinkhorn,
)
from vocabseg.text.templates import SCENE_TEMPLATE


# -- Sinkhorn-Knopp ---------------------------------------------------------------------------------------------
def literal_sinkhorn(logits: torch.Tensor, iterations: int = 3) -> torch.Tensor:
    """SwAV's algorithm written out element by element in float64: Q = softmax rows, transposed to
    (K, B); Q /= its total; each round: each row / its sum / K, then each column / its sum / B."""
    n, k = logits.shape
    q = [[0.0] * n for _ in range(k)]
    for j in range(n):
        row = [float(v) for v in logits[j]]
        top = max(row)
        exps = [torch.tensor(v - top, dtype=torch.float64).exp().item() for v in row]
        for c in range(k):
            q[c][j] = exps[c] / sum(exps)
    total = sum(map(sum, q))  # = n
    q = [[v / total for v in r] for r in q]
    for _ in range(iterations):
        for c in range(k):
            s = sum(q[c])
            q[c] = [v / s / k for v in q[c]]
        for j in range(n):
            s = sum(q[c][j] for c in range(k))
            for c in range(k):
                q[c][j] = q[c][j] / s / total
    return torch.tensor([[q[c][j] * total for c in range(k)] for j in range(n)], dtype=torch.float64)


def skewed_logits(n: int = 24, k: int = 4, seed: int = 0) -> torch.Tensor:
    """eps·cos logits (eps 100 as for ViT) where every sample prefers cluster 0: the unbalanced case."""
    g = torch.Generator().manual_seed(seed)
    cos = 0.1 * torch.rand(n, k, generator=g)
    cos[:, 0] += 0.025
    return 100.0 * cos


def test_sinkhorn_matches_the_literal_algorithm_and_balances_the_clusters():
    logits = skewed_logits()
    got = sinkhorn(logits, iterations=3)
    want = literal_sinkhorn(logits, 3)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.sum(1), torch.ones(24), atol=1e-6, rtol=0)  # each sample's weights sum to 1
    n, k = logits.shape
    before = logits.softmax(-1).sum(0)  # cluster totals of the plain softmax
    after = got.sum(0)
    assert (before - n / k).abs().max() > 6.0  # the softmax piles onto cluster 0
    assert (after - n / k).abs().max() < 0.2 * (before - n / k).abs().max()  # nearly balanced after 3 rounds
    assert hard_assignment(logits.softmax(-1)).bincount(minlength=k).max() == 15  # 15 of 24 masks in one cluster
    assert hard_assignment(got).bincount(minlength=k).max() <= 8  # balancing spreads the hard assignment


def test_sinkhorn_with_one_iteration_and_without_samples():
    logits = skewed_logits(n=6, k=3, seed=1)
    torch.testing.assert_close(sinkhorn(logits, 1).double(), literal_sinkhorn(logits, 1), atol=1e-6, rtol=1e-5)
    empty = sinkhorn(torch.zeros(0, 5), 3)
    assert empty.shape == (0, 5)


def _sinkhorn_worker(rank: int, world_size: int, port: int, parts: list, out_dir: str) -> None:
    """One process of a gloo group: Sinkhorn on its own share of each case's logits."""
    from vocabseg.eval.distributed import exit_process, init_distributed

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    init_distributed("cpu")
    results = [sinkhorn(torch.tensor(case[rank]).reshape(-1, 4), 3).tolist() for case in parts]  # K = 4
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    exit_process(0)


@pytest.mark.slow
def test_sinkhorn_over_two_gloo_processes_equals_one_process_with_every_sample(tmp_path):
    """The all-reduced sums make the split irrelevant: even, uneven and one rank without any mask."""
    from train.harness import free_port

    full = skewed_logits(n=20, k=4, seed=3)
    splits = [10, 13, 0]  # samples on rank 0; the rest on rank 1
    parts = [[full[:s].tolist(), full[s:].tolist()] for s in splits]
    mp.spawn(_sinkhorn_worker, args=(2, free_port(), parts, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    single = sinkhorn(full, 3)
    for case in range(len(splits)):
        joined = torch.cat([torch.tensor(ranks[0][case]).reshape(-1, 4), torch.tensor(ranks[1][case]).reshape(-1, 4)])
        torch.testing.assert_close(joined, single, atol=1e-6, rtol=1e-5)
        assert torch.equal(hard_assignment(joined), hard_assignment(single))


# -- mask pooling, merging, loss -------------------------------------------------------------------------------
def test_mask_pool_is_the_mean_feature_of_each_usable_mask():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 3, 8, 8, generator=g)
    masks = torch.rand(2, 4, 8, 8, generator=g) > 0.6
    masks[0, 1] = False
    masks[0, 1, 2, 3] = True  # one pixel: dropped
    masks[1, 2] = False  # empty: dropped
    valid = torch.tensor([[True, True, True, False], [True, True, True, True]])  # (0, 3) is padding
    pooled, owners, kept = mask_pool(feats, masks, valid)
    want, want_owner, want_masks = [], [], []
    for b in range(2):
        for m in range(4):
            pixels = [(y, x) for y in range(8) for x in range(8) if masks[b, m, y, x]]
            if not valid[b, m] or len(pixels) < 2:
                continue
            want.append(torch.stack([feats[b, :, y, x] for y, x in pixels]).mean(0))
            want_owner.append(b)
            want_masks.append(masks[b, m])
    assert owners.tolist() == want_owner == [0, 0, 1, 1, 1]
    torch.testing.assert_close(pooled, torch.stack(want), atol=1e-6, rtol=1e-5)
    assert torch.equal(kept, torch.stack(want_masks))


def test_mask_pool_without_usable_masks():
    pooled, owners, kept = mask_pool(
        torch.randn(2, 3, 4, 4), torch.zeros(2, 2, 4, 4, dtype=torch.bool), torch.ones(2, 2).bool()
    )
    assert pooled.shape == (0, 3) and owners.shape == (0,) and kept.shape == (0, 4, 4)


def test_merge_targets_is_the_union_of_each_clusters_masks_per_image():
    g = torch.Generator().manual_seed(1)
    masks = torch.rand(6, 5, 5, generator=g) > 0.5
    owners = torch.tensor([0, 0, 0, 1, 1, 2])
    clusters = torch.tensor([1, 3, 1, 1, 0, 2])
    got = merge_targets(masks, owners, clusters, batch=4, num_classes=4)
    assert got.shape == (4, 4, 5, 5) and got.dtype == torch.bool
    for b in range(4):
        for c in range(4):
            for y in range(5):
                for x in range(5):
                    covered = any(
                        bool(masks[n, y, x]) for n in range(6) if int(owners[n]) == b and int(clusters[n]) == c
                    )
                    assert bool(got[b, c, y, x]) == covered
    assert not got[3].any()  # an image without masks has no positives


def test_covered_bce_is_the_mean_over_covered_pixels_and_every_cluster():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 4, 4, generator=g, requires_grad=True)
    targets = torch.zeros(2, 3, 4, 4, dtype=torch.bool)
    targets[0, 1, :2] = True
    targets[1, 2, 1:3, 1:3] = True
    targets[1, 0, 1, 1] = True
    total, count = 0.0, 0
    for b in range(2):
        for y in range(4):
            for x in range(4):
                if not targets[b, :, y, x].any():
                    continue
                for c in range(3):
                    z, t = float(logits[b, c, y, x].detach()), float(targets[b, c, y, x])
                    p = 1 / (1 + torch.exp(torch.tensor(-z)).item())
                    total += -(t * torch.log(torch.tensor(p)).item() + (1 - t) * torch.log(torch.tensor(1 - p)).item())
                    count += 1
    got = covered_bce(logits, targets)
    assert count == 3 * (8 + 4)
    assert abs(got.item() - total / count) < 1e-5
    zero = covered_bce(logits, torch.zeros_like(targets))
    zero.backward()
    assert zero.item() == 0.0 and logits.grad is not None and not logits.grad.any()


# -- the conv head -----------------------------------------------------------------------------------------------
def test_conv_head_matches_its_layers_written_out():
    torch.manual_seed(0)
    head = ConvHead()
    x = torch.randn(3, 1, 5, 6)

    def double(m, z):
        conv_a, gn_a, _, conv_b, gn_b, _ = m.double_conv
        z = F.relu(F.group_norm(F.conv2d(z, conv_a.weight, padding=1), gn_a.num_groups, gn_a.weight, gn_a.bias))
        return F.relu(F.group_norm(F.conv2d(z, conv_b.weight, padding=1), gn_b.num_groups, gn_b.weight, gn_b.bias))

    z = F.conv2d(x, head.conv0.weight, head.conv0.bias, padding=1)
    z = double(head.conv1, F.conv_transpose2d(z, head.up1.weight, head.up1.bias, stride=2))
    z = double(head.conv2, F.conv_transpose2d(z, head.up2.weight, head.up2.bias, stride=2))
    want = F.conv2d(z, head.proj.weight, head.proj.bias, padding=1)
    got = head(x)
    assert got.shape == (3, 1, 20, 24)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert [m.num_groups for m in (head.conv1.double_conv[1], head.conv2.double_conv[1])] == [4, 2]


def test_conv_head_names_are_the_official_ones():
    """Released weights load by name: conv0, up1, conv1.double_conv.{0,1,3,4}, up2, conv2..., proj."""
    names = set(ConvHead().state_dict())
    official = {"conv0.weight", "conv0.bias", "up1.weight", "up1.bias", "up2.weight", "up2.bias", "proj.weight"}
    official |= {"proj.bias"} | {f"conv{i}.double_conv.{j}.weight" for i in (1, 2) for j in (0, 1, 3, 4)}
    official |= {f"conv{i}.double_conv.{j}.bias" for i in (1, 2) for j in (1, 4)}
    assert names == official


# -- class prompts -------------------------------------------------------------------------------------------------
def test_prompts_start_from_the_official_random_vocabulary_words(tiny_clip):
    prompts = ClassPrompts(tiny_clip.token_embedding, num_classes=8, length=4, seed=0)
    torch.manual_seed(0)  # the official code: torch.manual_seed(0); torch.randint(vocab_size - 10, (k, L))
    ids = torch.randint(tiny_clip.vocab_size - 10, (8, 4), dtype=torch.long)
    assert torch.equal(prompts.embeddings.detach(), tiny_clip.token_embedding(ids).detach())
    assert prompts.embeddings.requires_grad


def test_placeholder_template_matches_the_official_string():
    tok = open_clip.SimpleTokenizer()
    tokens, positions = placeholder_template(tok, SCENE_TEMPLATE, 4)
    official = tok(["A photo of a {}in the scene".format("{} " * 4)])  # as the official code builds it
    assert torch.equal(tokens, official)
    assert positions.tolist() == [5, 6, 7, 8] and set(tokens[0, positions].tolist()) == {39025}
    with pytest.raises(ValueError, match="exactly once"):
        placeholder_template(tok, "a {} and {}", 4)
    with pytest.raises(ValueError, match="spaces around"):
        placeholder_template(tok, "a photo of a {}.", 4)  # "{}." is not the placeholder token


def test_prompts_through_the_text_tower_equal_encoding_the_same_words():
    """Prompt embeddings set to real words' embeddings give CLIP's own embedding of the filled template."""
    clip = make_tiny_clip()
    tok = open_clip.SimpleTokenizer()
    prompts = ClassPrompts(clip.token_embedding, num_classes=2, length=2, seed=0)
    words = [["red", "cat"], ["wooden", "table"]]
    ids = torch.tensor([[int(tok([w])[0, 1]) for w in pair] for pair in words])
    assert all(int(tok([w])[0, 2]) == 49407 for pair in words for w in pair)  # one token each
    with torch.no_grad():
        prompts.embeddings.copy_(clip.token_embedding(ids))
    tokens, positions = placeholder_template(tok, SCENE_TEMPLATE, 2)
    got = prompts(clip, tokens, positions)
    with torch.no_grad():
        want = clip.encode_text(tok([SCENE_TEMPLATE.format(" ".join(pair)) for pair in words]))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    got.sum().backward()
    assert prompts.embeddings.grad is not None and prompts.embeddings.grad.abs().sum() > 0
