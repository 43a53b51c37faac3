"""Tests for treevae.py's clustering metrics (those TreeVAE reports): Hungarian accuracy, NMI, leaf and dendrogram purity,
against brute force (all permutations; all pairs, with the lowest common ancestor found by walking parents) and
against hand-computed numbers. Split out of test_treevae.py, whose smoke-tree helpers they use."""
import itertools
import math

import numpy as np
import pytest
import torch

from test_treevae import make_model, smoke_cfg
from treevae import (TreeVAE, cluster_accuracy, cluster_metrics, dendrogram_purity, hungarian, leaf_purity, nmi)


def brute_force_assignment(cost):
    n, m = cost.shape
    return min(sum(cost[i, cols[i]] for i in range(n)) for cols in itertools.permutations(range(m), n))


@pytest.mark.parametrize("n,m", [(1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (6, 6), (1, 4), (2, 5), (3, 6), (4, 7)])
def test_hungarian_matches_brute_force(n, m):
    rng = np.random.default_rng(10 * n + m)
    for trial in range(4):
        # trials 0-1: integer costs with many ties (negative too); 2-3: continuous costs
        cost = rng.integers(-3, 4, (n, m)).astype(float) if trial < 2 else rng.normal(size=(n, m))
        col = hungarian(cost.tolist())
        assert len(col) == n and len(set(col)) == n and all(0 <= j < m for j in col)
        assert math.isclose(sum(cost[i, col[i]] for i in range(n)), brute_force_assignment(cost),
                            rel_tol=1e-9, abs_tol=1e-9)


def np_nmi(pred, labels):
    """NMI by hand: MI from the joint table over the arithmetic mean of the entropies."""
    pred, labels = np.asarray(pred), np.asarray(labels)
    joint = np.zeros((pred.max() + 1, labels.max() + 1))
    np.add.at(joint, (pred, labels), 1)
    joint /= joint.sum()
    pc, pk = joint.sum(1), joint.sum(0)
    mi = sum(joint[i, j] * math.log(joint[i, j] / (pc[i] * pk[j]))
             for i in range(joint.shape[0]) for j in range(joint.shape[1]) if joint[i, j] > 0)
    h = lambda p: -sum(v * math.log(v) for v in p if v > 0)
    return mi / ((h(pc) + h(pk)) / 2)


def test_nmi_identities_independence_and_hand_example():
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3])
    assert nmi(labels, labels) == pytest.approx(1.0, abs=1e-12)
    relabel = torch.tensor([2, 0, 3, 1])[labels]                 # same partition, other names
    assert nmi(relabel, labels) == pytest.approx(1.0, abs=1e-12)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 10, (20000,), generator=g), torch.randint(0, 10, (20000,), generator=g)
    assert 0 <= nmi(a, b) < 0.01
    # hand example: clusters {0,1} | {2,3,4} | {5} against classes {0,1,2} | {3,4,5}
    pred, lab = [0, 0, 1, 1, 1, 2], [0, 0, 0, 1, 1, 1]
    p = np.array([[2, 0], [1, 2], [0, 1]]) / 6
    mi = sum(p[i, j] * math.log(p[i, j] / (p[i].sum() * p[:, j].sum())) for i in range(3) for j in range(2)
             if p[i, j] > 0)
    h_c = -sum(q * math.log(q) for q in (2 / 6, 3 / 6, 1 / 6))
    h_k = math.log(2)
    assert nmi(pred, lab) == pytest.approx(mi / ((h_c + h_k) / 2), rel=1e-9)
    assert nmi(pred, lab) == pytest.approx(np_nmi(pred, lab), rel=1e-9)
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 4, 200), rng.integers(0, 3, 200)
    y[:120] = x[:120] % 3                                        # partly dependent
    assert nmi(x, y) == pytest.approx(np_nmi(x, y), rel=1e-9)
    assert nmi([0, 0, 0, 0], [0, 1, 0, 1]) == pytest.approx(0.0, abs=1e-12)


def test_leaf_purity_and_cluster_accuracy_hand_examples():
    # leaf 0 holds classes (0, 0, 1) -> 2 right; leaf 1 (1, 1) -> 2; leaf 2 (0) -> 1: 5 of 6
    assert leaf_purity([0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 1, 0]) == pytest.approx(5 / 6)
    assert leaf_purity([0, 1, 2, 3], [0, 0, 1, 1]) == pytest.approx(1.0)     # singletons are pure
    assert cluster_accuracy([2, 2, 0, 0, 1, 1], [0, 0, 1, 1, 2, 2]) == pytest.approx(1.0)   # permuted names
    # 3 clusters, 2 classes: cluster 0 -> class 1 (2), cluster 1 -> class 0 (2), cluster 2 unmatched: 4 of 6
    assert cluster_accuracy([0, 0, 1, 1, 2, 2], [1, 1, 0, 0, 0, 1]) == pytest.approx(4 / 6)
    # one-to-one: two clusters of the same class cannot both be right
    assert cluster_accuracy([0, 0, 1, 1], [0, 0, 0, 0]) == pytest.approx(0.5)
    assert cluster_accuracy([0, 0, 0, 0], [0, 1, 2, 2]) == pytest.approx(0.5)            # fewer clusters
    # table [[3, 2], [2, 0]]: greedy takes cluster 0 -> class 0 (3) and ends with 3 + 0; the optimum is 2 + 2
    pred, lab = [0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 0, 0]
    assert cluster_accuracy(pred, lab) == pytest.approx(4 / 7)


def brute_force_dendrogram_purity(model, pred, labels):
    """Mean over all pairs of distinct same-label samples of the label's fraction among the samples below the
    pair's lowest common ancestor, which is found by walking parents."""
    leaves = model.leaves

    def ancestors(node):
        chain = []
        while node is not None:
            chain.append(node)
            node = model.parent[node]
        return chain

    def below(node):                                             # samples whose leaf lies in node's subtree
        return [s for s in range(len(pred)) if node in ancestors(leaves[pred[s]])]

    scores = []
    for a, b in itertools.combinations(range(len(pred)), 2):
        if labels[a] != labels[b]:
            continue
        up_a = ancestors(leaves[pred[a]])
        lca = next(n for n in ancestors(leaves[pred[b]]) if n in up_a)
        members = below(lca)
        scores.append(sum(labels[s] == labels[a] for s in members) / len(members))
    return sum(scores) / len(scores)


def test_dendrogram_purity_hand_example_and_brute_force():
    model = make_model()                                         # root 0 -> leaves 1, 2
    # leaf 0: labels (0, 0), leaf 1: (0, 1). Label-0 pairs: inside leaf 0 (purity 1) and twice across the root
    # (3 of the 4 samples carry label 0): (1 + 3/4 + 3/4) / 3
    assert dendrogram_purity(model, [0, 0, 1, 1], [0, 0, 0, 1]) == pytest.approx(2.5 / 3)
    model.split(1)                                               # 0 -> (1, 2), 1 -> (3, 4): leaves [2, 3, 4]
    pred = [0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 1]
    labels = [1, 1, 0, 0, 0, 1, 0, 1, 2, 2, 2]
    expected = brute_force_dendrogram_purity(model, pred, labels)
    assert dendrogram_purity(model, pred, labels) == pytest.approx(expected, rel=1e-12)
    assert cluster_metrics(model, pred, labels)["dendrogram_purity"] == pytest.approx(expected, rel=1e-12)
    # a pure tree scores 1; an empty leaf changes nothing
    assert dendrogram_purity(model, [0, 0, 2, 2], [1, 1, 0, 0]) == pytest.approx(1.0)


def test_dendrogram_purity_with_pass_through_nodes():
    cfg = smoke_cfg(max_depth=3)
    # 0 -> (1, 2); 1 -> (3, 4); 3 -> 5 only (pass-through); 4 -> (6, 7). Leaves [2, 5, 6, 7].
    topo = {"parent": [[0, -1], [1, 0], [2, 0], [3, 1], [4, 1], [5, 3], [6, 4], [7, 4]], "next_id": 8}
    model = TreeVAE(cfg, topo)
    assert model.leaves == [2, 5, 6, 7] and "3" not in model.router_p
    rng = np.random.default_rng(0)
    pred, labels = rng.integers(0, 4, 25).tolist(), rng.integers(0, 3, 25).tolist()
    assert dendrogram_purity(model, pred, labels) == pytest.approx(
        brute_force_dendrogram_purity(model, pred, labels), rel=1e-12)
    # pruning made pass-through: 0 -> (1, 2), 1 -> 3 only
    model = make_model(splits=[1])
    model.prune([10, 10, 0], 0.01)
    pred, labels = rng.integers(0, 2, 12).tolist(), rng.integers(0, 3, 12).tolist()
    assert dendrogram_purity(model, pred, labels) == pytest.approx(
        brute_force_dendrogram_purity(model, pred, labels), rel=1e-12)


def test_cluster_metrics_collects_the_four_figures():
    model = make_model(splits=[1])
    pred, labels = torch.tensor([0, 0, 1, 1, 2, 2, 2]), torch.tensor([0, 0, 1, 1, 1, 2, 2])
    m = cluster_metrics(model, pred, labels)
    assert m["nmi"] == pytest.approx(nmi(pred, labels)) and m["acc"] == pytest.approx(6 / 7)
    assert m["leaf_purity"] == pytest.approx(6 / 7) and m["n_leaves"] == 3 and m["leaf_sizes"] == [2, 2, 3]
