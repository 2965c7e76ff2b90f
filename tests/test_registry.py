import numpy as np
import pytest

import prefopt

# The contract's names (LOSSES.md), by kind.
CONTRACT = {
    "pairwise": [
        "sigmoid", "dpo", "robust", "ipo", "hinge", "exo_pair", "nca_pair", "bco_pair",
        "sppo_hard", "apo_zero", "apo_down", "discopop", "aot", "aot_unpaired", "sigmoid_norm",
    ],
    "reference-free": ["simpo", "cpo", "orpo"],
    "unpaired": ["kto"],
    "group": ["mpo", "infonca", "nca", "plackett_luce", "lipo"],
}  # fmt: skip


def test_every_loss_of_the_contract_is_registered_with_its_kind():
    expected = {name: kind for kind, names in CONTRACT.items() for name in names}
    assert prefopt.available_losses() == dict(sorted(expected.items()))


def test_names_map_to_the_functions():
    assert prefopt.get_loss("sigmoid") is prefopt.dpo_loss
    assert prefopt.get_loss("dpo") is prefopt.dpo_loss
    assert prefopt.get_loss("mpo") is prefopt.mpo_loss
    assert prefopt.get_loss("robust") is prefopt.robust_dpo_loss
    for name in prefopt.available_losses():
        fn = prefopt.get_loss(name)
        assert getattr(prefopt, fn.__name__) is fn


def test_registered_functions_compute():
    x = np.array([-3.0, -4.0])
    np.testing.assert_array_equal(
        prefopt.get_loss("sigmoid")(x, x[::-1]), prefopt.dpo_loss(x, x[::-1])
    )


@pytest.mark.parametrize(
    "name,suggestion", [("sigmod", "'sigmoid'"), ("mpoo", "'mpo'"), ("simPO", "'simpo'")]
)
def test_unknown_name_lists_the_valid_ones_and_suggests(name, suggestion):
    with pytest.raises(ValueError) as err:
        prefopt.get_loss(name)
    message = str(err.value)
    assert f"unknown loss {name!r}" in message
    assert f"Did you mean {suggestion}" in message  # the closest first
    assert "Known losses: aot, aot_unpaired, apo_down," in message
    assert message.count(", ") >= len(prefopt.available_losses()) - 1


def test_unrelated_name_gets_no_suggestion():
    with pytest.raises(ValueError, match="unknown loss 'xyzzy_q'. Known losses") as err:
        prefopt.get_loss("xyzzy_q")
    assert "Did you mean" not in str(err.value)
