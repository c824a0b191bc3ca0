"""Elo from pairwise judgements: a Bradley–Terry maximum-likelihood fit with bootstrap intervals.

Player i has strength r_i (natural log-odds units) and P(i beats j) = sigmoid(r_i - r_j). The fit
maximises the log-likelihood of the observed outcomes (1 win, 0 loss, 0.5 tie, or any fraction),
with one player (the anchor, the initial model) fixed at 0. Elo = 400 * log10(e) * r, so a 400-point
gap means 10:1 odds, as in chess and in the paper's figures.

Each player also plays `prior_ties` virtual ties, spread evenly over every other player. This keeps
the fit finite when a player wins or loses every comparison (the MLE is then infinite) and costs a
negligible bias once there are more than a handful of real comparisons. The ties go to every pair,
not only to the anchor, so the prior treats all players alike: two players with the same record get
the same rating (a copy of the anchor rates exactly 0), and moving the anchor only shifts every
rating by a constant.

Pure functions on numpy arrays; cai/stages/eval.py feeds them the judge's verdicts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

ELO_PER_NAT = 400.0 / math.log(10.0)  # Elo points per unit of log-odds

Comparison = tuple[int, int, float]  # (player i, player j, score of i in [0, 1])


def win_matrix(n_players: int, comparisons: Sequence[Comparison]) -> tuple[np.ndarray, np.ndarray]:
    """W[i, j] = total score of i against j, N[i, j] = games between i and j; both (P, P)."""
    wins = np.zeros((n_players, n_players))
    games = np.zeros((n_players, n_players))
    for i, j, s in comparisons:
        if i == j:
            raise ValueError(f"a player cannot be compared with itself (player {i})")
        if not 0.0 <= s <= 1.0:
            raise ValueError(f"a score must lie in [0, 1], got {s}")
        wins[i, j] += s
        wins[j, i] += 1.0 - s
        games[i, j] += 1.0
        games[j, i] += 1.0
    return wins, games


def fit_strengths(
    wins: np.ndarray, games: np.ndarray, anchor: int = 0, prior_ties: float = 0.5, iters: int = 100, tol: float = 1e-10
) -> np.ndarray:
    """Bradley–Terry MLE by Newton's method. wins, games: (P, P) -> r: (P,) log-odds, r[anchor] = 0."""
    n = len(wins)
    wins, games = wins.astype(float).copy(), games.astype(float).copy()
    if n > 1:  # virtual ties between every pair: half a win and half a loss each
        tie = prior_ties / (n - 1) * (1.0 - np.eye(n))  # (P, P): each player plays prior_ties in all
        wins += tie / 2
        games += tie
    free = np.array([i for i in range(n) if i != anchor])
    r = np.zeros(n)
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(r[:, None] - r[None, :])))  # (P, P): P(i beats j)
        grad = (wins - games * p).sum(1)  # (P,): d loglik / d r_i
        w = games * p * (1.0 - p)  # (P, P): Fisher information of each pair
        hess = w - np.diag(w.sum(1))  # (P, P): negative semi-definite
        step = np.linalg.solve(hess[np.ix_(free, free)], grad[free])
        r[free] -= step
        if np.abs(step).max() < tol:
            break
    return r


def elo(n_players: int, comparisons: Sequence[Comparison], anchor: int = 0, prior_ties: float = 0.5) -> np.ndarray:
    """Elo ratings (P,), the anchor at exactly 0."""
    wins, games = win_matrix(n_players, comparisons)
    return ELO_PER_NAT * fit_strengths(wins, games, anchor, prior_ties)


def bootstrap_elo(
    n_players: int,
    comparisons: Sequence[Comparison],
    groups: Sequence[object] | None = None,
    n_boot: int = 200,
    seed: int = 0,
    anchor: int = 0,
    prior_ties: float = 0.5,
    level: float = 0.95,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Elo (P,) and percentile-bootstrap bounds low, high (P,) at `level`.

    Resampling is by group (the prompt): the comparisons on one prompt share its difficulty, so they
    are drawn together; with groups=None each comparison is its own group.
    """
    point = elo(n_players, comparisons, anchor, prior_ties)
    keys = list(range(len(comparisons))) if groups is None else list(groups)
    by_group: dict[object, list[int]] = {}
    for k, g in enumerate(keys):
        by_group.setdefault(g, []).append(k)
    members = list(by_group.values())
    # Per group, its own win and game matrices, so a resample is a weighted sum (fast).
    per_w = np.zeros((len(members), n_players, n_players))
    per_g = np.zeros_like(per_w)
    for m, idx in enumerate(members):
        per_w[m], per_g[m] = win_matrix(n_players, [comparisons[k] for k in idx])
    rng = np.random.default_rng(seed)
    samples = np.empty((n_boot, n_players))
    for b in range(n_boot):
        counts = np.bincount(rng.integers(0, len(members), len(members)), minlength=len(members)).astype(float)  # (G,)
        w = np.tensordot(counts, per_w, axes=1)  # (P, P)
        g = np.tensordot(counts, per_g, axes=1)
        samples[b] = ELO_PER_NAT * fit_strengths(w, g, anchor, prior_ties)
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail], axis=0)
    return point, low, high
