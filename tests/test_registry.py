import numpy as np
import pytest

import prefopt


def test_names_and_kinds():
    assert prefopt.available_losses() == {"dpo": "pairwise", "mpo": "group", "sigmoid": "pairwise"}
    assert prefopt.get_loss("sigmoid") is prefopt.dpo_loss
    assert prefopt.get_loss("dpo") is prefopt.dpo_loss
    assert prefopt.get_loss("mpo") is prefopt.mpo_loss


def test_registered_functions_compute():
    x = np.array([-3.0, -4.0])
    np.testing.assert_array_equal(
        prefopt.get_loss("sigmoid")(x, x[::-1]), prefopt.dpo_loss(x, x[::-1])
    )


@pytest.mark.parametrize("name,suggestion", [("sigmod", "'sigmoid'"), ("mpoo", "'mpo'")])
def test_unknown_name_lists_the_valid_ones_and_suggests(name, suggestion):
    with pytest.raises(ValueError) as err:
        prefopt.get_loss(name)
    message = str(err.value)
    assert f"unknown loss {name!r}" in message
    assert f"Did you mean {suggestion}" in message  # the closest first
    assert "Known losses: dpo, mpo, sigmoid." in message


def test_unrelated_name_gets_no_suggestion():
    with pytest.raises(ValueError, match="unknown loss 'kto_xyz'. Known losses") as err:
        prefopt.get_loss("kto_xyz")
    assert "Did you mean" not in str(err.value)
