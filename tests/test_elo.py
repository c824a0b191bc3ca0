"""The Bradley–Terry Elo fit: hand-computed cases, recovery, symmetry, anchoring, bootstrap coverage."""

import math

import numpy as np
import pytest

from cai.elo import ELO_PER_NAT, bootstrap_elo, elo, fit_strengths, win_matrix


def simulate(true_elo, per_pair, rng):
    """Binary outcomes drawn from the Bradley–Terry model with these Elo ratings, with a prompt id each."""
    comps, groups = [], []
    n = len(true_elo)
    for i in range(n):
        for j in range(i + 1, n):
            p = 1 / (1 + 10 ** (-(true_elo[i] - true_elo[j]) / 400))
            for k in range(per_pair):
                comps.append((i, j, float(rng.random() < p)))
                groups.append(k)
    return comps, groups


def test_two_players_match_the_closed_form():
    # 3 wins in 4 games and no prior: P(win) = 3/4, so r = log 3 and Elo = 400 * log10(3).
    wins, games = win_matrix(2, [(1, 0, 1.0), (1, 0, 1.0), (0, 1, 0.0), (1, 0, 0.0)])
    r = fit_strengths(wins, games, anchor=0, prior_ties=0.0)
    assert r[0] == 0.0
    assert r[1] == pytest.approx(math.log(3))
    assert ELO_PER_NAT * r[1] == pytest.approx(400 * math.log10(3))
    # Ties count half: 1 win + 2 ties in 3 games = a score of 2/3 -> odds 2.
    assert elo(2, [(1, 0, 1.0), (1, 0, 0.5), (0, 1, 0.5)], prior_ties=0.0)[1] == pytest.approx(400 * math.log10(2))


def test_fit_recovers_known_strengths():
    truth = np.array([0.0, 120.0, -150.0, 300.0])
    comps, _ = simulate(truth, 600, np.random.default_rng(0))
    fitted = elo(4, comps)
    assert fitted[0] == 0.0
    assert np.abs(fitted - truth).max() < 30


def test_symmetric_and_anchored():
    comps, _ = simulate(np.array([0.0, 80.0, -60.0]), 50, np.random.default_rng(1))
    base = elo(3, comps)
    # The same games written from the other side give the same ratings.
    flipped = [(j, i, 1.0 - s) for i, j, s in comps]
    assert np.allclose(elo(3, flipped), base)
    # Relabelling the players permutes the ratings (anchor kept as player 0).
    perm = [0, 2, 1]
    relabelled = [(perm[i], perm[j], s) for i, j, s in comps]
    assert np.allclose(elo(3, relabelled)[perm], base)
    # Anchoring another player shifts every rating by a constant, with or without the prior.
    for prior in (0.0, 0.5):
        a0, a1 = elo(3, comps, anchor=0, prior_ties=prior), elo(3, comps, anchor=1, prior_ties=prior)
        assert a1[1] == 0.0
        assert np.allclose(a0 - a1, a0[1])
    # A player that wins every game stays finite thanks to the virtual ties.
    assert np.isfinite(elo(2, [(1, 0, 1.0)] * 10)).all()


def test_bootstrap_intervals_cover_the_truth():
    truth = np.array([0.0, 100.0, -50.0])
    rng = np.random.default_rng(2)
    covered, total = 0, 0
    for sim in range(120):
        comps, groups = simulate(truth, 40, rng)
        point, low, high = bootstrap_elo(3, comps, groups, n_boot=150, seed=sim)
        assert (low <= point + 1e-9).all() and (point <= high + 1e-9).all()
        covered += int(((low[1:] <= truth[1:]) & (truth[1:] <= high[1:])).sum())
        total += 2
    coverage = covered / total
    assert 0.88 <= coverage <= 0.99, coverage


def test_identical_players_rate_identically():
    # Player 2 is a copy of the anchor: it ties the anchor and meets player 1 exactly as the anchor does.
    comps = [(0, 2, 0.5)] * 10 + [(1, 0, 1.0)] * 7 + [(0, 1, 1.0)] * 3 + [(1, 2, 1.0)] * 7 + [(2, 1, 1.0)] * 3
    ratings = elo(3, comps)
    assert ratings[2] == pytest.approx(0.0, abs=1e-9)
    # Two copies of a player that won everything: infinite without the prior, equal and finite with it.
    ratings = elo(3, [(1, 0, 1.0)] * 5 + [(2, 0, 1.0)] * 5 + [(1, 2, 0.5)] * 4)
    assert np.isfinite(ratings).all() and ratings[1] == pytest.approx(ratings[2]) and ratings[1] > 300


def test_prior_pulls_toward_a_tie_by_the_hand_computed_amount():
    # Two players, 3 wins in 4 games, plus 0.5 virtual games of ties: score (3 + 0.25) / 4.5 -> odds 13/5.
    assert elo(2, [(1, 0, 1.0)] * 3 + [(1, 0, 0.0)], prior_ties=0.5)[1] == pytest.approx(400 * math.log10(13 / 5))
