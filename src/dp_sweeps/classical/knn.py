"""k-nearest neighbours with private prediction: noisy neighbour votes per query.

A KNN classifier *is* its training set, so it is never released. What is released is
one predicted label per query (the test set, plus the validation split if any), and
those labels are DP with respect to adding or removing one training example.

Per query q: the votes ``v_c`` count the labels among the k training examples nearest
to q in Euclidean distance, ties broken by training index (a fixed total order, so the
neighbour set is well defined). Adding or removing one training example inserts or
drops at most one neighbour and pushes out or pulls in at most one other, so every
``v_c`` moves by at most 1: sensitivity Δ = 1, not monotone (one count can rise while
another falls). The label is drawn by the exponential mechanism with utility ``v_c``
and ε_q: P(c) ∝ exp(ε_q · v_c / (2Δ)) (diffprivlib's ``Exponential``, non-monotone;
equivalently report-noisy-max with Gumbel noise of scale 2/ε_q). That is ε_q-DP and
ε_q-bounded-range, hence (ε_q²/8)-zCDP (Cesar & Rogers 2021; see
https://differentialprivacy.org/exponential-mechanism-bounded-range/).

Composition over the T queries (they are fixed in advance; the test labels are the
public evaluation set and are not protected):

- ``composition: basic``: T·ε_q, pure ε-DP (δ = 0; ``privacy.delta`` unused).
- ``composition: zcdp`` (default): the smaller of T·ε_q (δ = 0) and the (ε, δ) of
  (T·ε_q²/8)-zCDP at ``privacy.delta``, converted by dp-accounting's RDP accountant.
  Both are valid bounds; the record says which one the reported ε is.

ε_q is the largest per-query ε whose composed ε is at most ``privacy.epsilon`` (found
by bisection on the accountant); ``epsilon`` in the record is the composed ε of that
ε_q over all T queries, recomputed by the accountant.

Caveats: ``train_accuracy`` is a diagnostic on up to ``train_accuracy_queries``
training points predicted the same way, outside the guarantee (like the deep models'
training accuracy); floating-point rounding of distances is not modelled.
``privacy=none`` takes the plain majority vote of the same k neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant

from dp_sweeps.classical import accuracy, import_diffprivlib, register_classifier, target_epsilon
from dp_sweeps.privacy.randomness import mechanism_random_state
from dp_sweeps.validation import require_choice, require_number

COMPOSITIONS = ("zcdp", "basic")
VOTE_SENSITIVITY = 1
# RDP orders for the zCDP bound: dense near 1 (large ε), up to 1e4 (tiny ε).
RDP_ORDERS = np.concatenate((np.linspace(1.01, 10.0, 300), np.logspace(1.0, 4.0, 300)[1:]))


@dataclass(frozen=True)
class KNNSettings:
    # Neighbours per vote: a larger k gives the noisy vote a wider margin to survive.
    k: int = 1600
    composition: str = "zcdp"
    query_batch_size: int = 512
    train_accuracy_queries: int = 1000

    def __post_init__(self) -> None:
        require_number("model.k", self.k, low=1, low_open=False, integer=True)
        require_choice("model.composition", self.composition, COMPOSITIONS)
        require_number("model.query_batch_size", self.query_batch_size, low=1, low_open=False, integer=True)
        require_number("model.train_accuracy_queries", self.train_accuracy_queries, low=0, low_open=False,
                       integer=True)


def neighbour_votes(train_x: torch.Tensor, train_y: torch.Tensor, queries: torch.Tensor, *, k: int,
                    num_classes: int, batch_size: int = 512) -> np.ndarray:
    """Votes (queries x classes, int): the labels of each query's k nearest training
    examples, nearest by Euclidean distance with ties broken by training index."""
    train = train_x.reshape(len(train_x), -1).float()
    labels = torch.nn.functional.one_hot(train_y.to(train.device), num_classes).float()
    k = min(k, len(train))
    squared_norms = (train * train).sum(1)
    out = []
    for start in range(0, len(queries), batch_size):
        q = queries[start:start + batch_size].reshape(-1, train.shape[1]).float().to(train.device)
        # |q - x|^2 up to |q|^2, which is the same for every x of one query.
        distance = squared_norms[None, :] - 2.0 * q @ train.T
        kth = torch.topk(distance, k, dim=1, largest=False, sorted=True).values[:, -1:]  # k-th smallest
        chosen = distance <= kth
        # Where several examples tie at the k-th distance, the lowest indices fill the slots left.
        crowded = (chosen.sum(1) > k).nonzero().flatten()
        if len(crowded):
            sub, sub_kth = distance[crowded], kth[crowded]
            tied = sub == sub_kth
            slots = k - (sub < sub_kth).sum(1, keepdim=True)
            chosen[crowded] = (sub < sub_kth) | (tied & (tied.cumsum(1, dtype=torch.int32) <= slots))
        out.append((chosen.float() @ labels).round().to(torch.int64).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, num_classes), dtype=np.int64)


def noisy_votes(votes: np.ndarray, *, epsilon_per_query: Optional[float], random_state) -> np.ndarray:
    """One label per row of ``votes``: the exponential mechanism (ε_q, Δ = 1, non-monotone)
    from diffprivlib, or the plain argmax (ties: lowest class) when ``epsilon_per_query`` is None."""
    if epsilon_per_query is None:
        return votes.argmax(1)
    import_diffprivlib(model="knn")  # diffprivlib is not imported at module import (dp_sweeps.classical)
    from diffprivlib.mechanisms import Exponential

    return np.array([Exponential(epsilon=epsilon_per_query, sensitivity=VOTE_SENSITIVITY, utility=row.tolist(),
                                 monotonic=False, random_state=random_state).randomise() for row in votes],
                    dtype=np.int64)


def composed_epsilon(*, epsilon_per_query: float, num_queries: int, delta: float,
                     composition: str) -> tuple[float, float, str]:
    """(ε, δ, bound) for ``num_queries`` ε_q-DP exponential mechanisms (module docstring)."""
    basic = num_queries * epsilon_per_query
    if composition == "basic":
        return basic, 0.0, "basic"
    accountant = rdp_privacy_accountant.RdpAccountant(orders=RDP_ORDERS)
    accountant.compose(dp_event.ZCDpEvent(rho=epsilon_per_query ** 2 / 8), num_queries)
    zcdp = float(accountant.get_epsilon(delta))
    return (basic, 0.0, "basic") if basic <= zcdp else (zcdp, delta, "zcdp")


def epsilon_per_query_for(*, target_epsilon: float, num_queries: int, delta: float, composition: str) -> float:
    """The largest ε_q (to relative 1e-9) whose composed ε over ``num_queries`` is ≤ the target."""
    def total(eps_q: float) -> float:
        return composed_epsilon(epsilon_per_query=eps_q, num_queries=num_queries, delta=delta,
                                composition=composition)[0]
    # Basic composition meets the target at target/T (shaved by a rounding margin).
    low, high = target_epsilon / num_queries * (1 - 1e-12), target_epsilon
    if total(high) <= target_epsilon:
        return high
    while high - low > 1e-9 * low:
        mid = 0.5 * (low + high)
        low, high = (mid, high) if total(mid) <= target_epsilon else (low, mid)
    return low


@register_classifier("knn", settings=KNNSettings, imports=lambda: import_diffprivlib(model="knn"))
def run_knn(cfg, settings: KNNSettings, *, data, device, output_dir) -> dict[str, Any]:
    private = bool(cfg.privacy.enabled)
    num_queries = len(data.test_y) + len(data.val_y)
    fields: dict[str, Any] = {"mechanism": "majority vote of the k nearest neighbours (non-private)",
                              "num_queries": num_queries, "k": settings.k}
    epsilon_q: Optional[float] = None
    if private:
        target = target_epsilon(cfg, model="knn")
        delta = float(cfg.privacy.delta)
        epsilon_q = epsilon_per_query_for(target_epsilon=target, num_queries=num_queries, delta=delta,
                                          composition=settings.composition)
        epsilon, delta_spent, bound = composed_epsilon(epsilon_per_query=epsilon_q, num_queries=num_queries,
                                                       delta=delta, composition=settings.composition)
        fields.update(
            mechanism="exponential mechanism on the k-NN label votes (diffprivlib Exponential)",
            guarantee=("pure ε-DP (δ=0)" if bound == "basic" else "(ε, δ)-DP via zCDP") +
                      " for the predicted labels of all queries, add/remove one training example",
            epsilon=epsilon, delta=delta_spent, composition=settings.composition, composition_bound=bound,
            epsilon_per_query=epsilon_q, vote_sensitivity=VOTE_SENSITIVITY,
            noise_scale=2 * VOTE_SENSITIVITY / epsilon_q)  # Gumbel scale of the equivalent noisy max
    if cfg.dry_run:
        return {**fields, "status": "planned"}
    random_state = mechanism_random_state("classical", noise_seed=cfg.privacy.noise_seed)
    train_x, train_y = data.train_x.to(device), data.train_y

    def predict(queries: torch.Tensor) -> np.ndarray:
        votes = neighbour_votes(train_x, train_y, queries, k=settings.k, num_classes=data.num_classes,
                                batch_size=settings.query_batch_size)
        return noisy_votes(votes, epsilon_per_query=epsilon_q, random_state=random_state)

    test_predictions = predict(data.test_x)
    val_accuracy = accuracy(predict(data.val_x), data.val_y) if len(data.val_y) else None
    sample = np.random.default_rng(cfg.seed).permutation(data.num_train)[:settings.train_accuracy_queries]
    sample_idx = torch.from_numpy(sample)
    train_accuracy = accuracy(predict(data.train_x[sample_idx]), data.train_y[sample_idx]) if len(sample) else None
    return {**fields, "test_accuracy": accuracy(test_predictions, data.test_y), "val_accuracy": val_accuracy,
            "train_accuracy": train_accuracy, "train_accuracy_queries": len(sample)}
