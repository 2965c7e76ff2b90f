"""Invariances of the group losses, as properties over generated groups (hypothesis)."""

import numpy as np
import pytest

import prefopt

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)
# Rewards on a grid of tenths, as ratings and scores often are: many ties with the mean.
tenths = st.integers(-30, 30).map(lambda k: k / 10)
log_probs = st.floats(-60.0, -0.5)


@st.composite
def groups(draw, n_min=2, n_max=7):
    n = draw(st.integers(n_min, n_max))
    rewards = np.array(draw(st.lists(tenths, min_size=n, max_size=n)))
    logps = np.array(draw(st.lists(log_probs, min_size=n, max_size=n)))
    return logps[None], rewards[None]


@SETTINGS
@given(groups(), st.randoms(use_true_random=False))
def test_split_and_loss_do_not_depend_on_the_order_of_a_group(group, random):
    logps, rewards = group
    order = list(range(rewards.shape[1]))
    random.shuffle(order)
    chosen, _, _ = prefopt.mpo_split(rewards)
    shuffled, _, _ = prefopt.mpo_split(rewards[:, order])
    assert np.array_equal(shuffled, chosen[:, order])
    np.testing.assert_allclose(
        prefopt.mpo_loss(logps[:, order], None, rewards[:, order]),
        prefopt.mpo_loss(logps, None, rewards),
        rtol=1e-12,
    )


@SETTINGS
@given(groups(), st.sampled_from([0.1, -0.3, 1.0, 7.0, -100.0]))
def test_split_does_not_depend_on_a_constant_shift_of_the_rewards(group, shift):
    logps, rewards = group
    assert np.array_equal(prefopt.mpo_split(rewards + shift)[0], prefopt.mpo_split(rewards)[0])
    np.testing.assert_allclose(
        prefopt.mpo_loss(logps, None, rewards + shift),
        prefopt.mpo_loss(logps, None, rewards),
        rtol=1e-9,
    )


@SETTINGS
@given(groups())
def test_split_is_the_same_in_float32_and_float64(group):
    _, rewards = group
    assert np.array_equal(
        prefopt.mpo_split(rewards.astype(np.float32))[0], prefopt.mpo_split(rewards)[0]
    )
    # tenths times ten are integers: the exact integer split agrees with the float one
    ratings = np.round(rewards * 10).astype(np.int64)
    assert np.array_equal(prefopt.mpo_split(ratings)[0], prefopt.mpo_split(rewards)[0])


@SETTINGS
@given(groups(), st.integers(1, 4), st.sampled_from([np.nan, np.inf, -np.inf, 1e300]))
def test_padding_garbage_changes_nothing(group, pad, garbage):
    logps, rewards = group
    n = rewards.shape[1]
    padded_logps = np.concatenate([logps, np.full((1, pad), garbage)], axis=1)
    padded_rewards = np.concatenate([rewards, np.full((1, pad), garbage)], axis=1)
    mask = np.arange(n + pad)[None] < n
    for name in ("mpo", "infonca", "nca", "plackett_luce", "lipo"):
        fn = prefopt.get_loss(name)
        np.testing.assert_allclose(
            fn(padded_logps, None, padded_rewards, mask=mask),
            fn(logps, None, rewards),
            rtol=1e-12,
            err_msg=name,
        )


@SETTINGS
@given(groups(), tenths)
def test_a_group_of_equal_rewards_has_loss_zero(group, reward):
    logps, rewards = group
    equal = np.full_like(rewards, reward)
    assert prefopt.mpo_loss(logps, None, equal)[0] == 0.0
    assert prefopt.lipo_loss(logps, None, equal)[0] == 0.0
    assert not prefopt.mpo_split(equal)[2][0]


@SETTINGS
@given(log_probs, log_probs, log_probs, log_probs, st.floats(0.01, 5.0))
def test_mpo_of_two_responses_is_dpo(cw, cl, rw, rl, beta):
    for weighting in ("abs", "squared", "none"):
        mpo = prefopt.mpo_loss(
            np.array([[cw, cl]]),
            np.array([[rw, rl]]),
            np.array([[1.0, 0.0]]),
            beta=beta,
            weighting=weighting,
            alpha=0.0 if weighting == "none" else 1.0,
        )
        dpo = prefopt.dpo_loss(
            np.array([cw]), np.array([cl]), np.array([rw]), np.array([rl]), beta=beta
        )
        np.testing.assert_allclose(mpo, dpo, rtol=1e-12, atol=1e-300)
