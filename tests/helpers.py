from __future__ import annotations

import numpy as np

# (rtol, atol) of a loss computed in a dtype against the float64 reference evaluated on the
# same (rounded) inputs. Half-precision inputs are computed in float32, hence float32's.
TOL = {
    "float64": (1e-10, 1e-10),
    "float32": (2e-5, 2e-5),
    "bfloat16": (2e-5, 2e-5),
    "float16": (2e-5, 2e-5),
}
GRAD_TOL = {"float64": (1e-6, 1e-8), "float32": (1e-4, 1e-5)}


def assert_close(actual, expected, dtype="float64", tol=TOL, scale=0.0):
    """``scale``: the largest |beta * input| of the loss. Rounding of the compute dtype on
    inputs that large shifts the result by about eps * scale, whatever the formula."""
    rtol, atol = tol[dtype]
    eps = np.finfo(np.float64 if dtype == "float64" else np.float32).eps
    atol = atol + 8 * eps * scale
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert np.all(np.isfinite(actual)), actual
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


def check_result(backend, out, shape, dtype):
    """The namespace, shape and dtype a loss must return for inputs of ``dtype``."""
    from array_api_compat import array_namespace

    assert array_namespace(out) is array_namespace(backend.asarray([0.0]))
    assert tuple(out.shape) == shape
    expect = "float32" if dtype in ("bfloat16", "float16") else dtype
    assert out.dtype == backend.dtype(expect), (out.dtype, expect)


def cli_fails(capsys, *args):
    """Run ``prefopt train ARGS`` (2 steps); return its one-line error (status 2 asserted)."""
    from prefopt.cli import main

    status = main(["train", "--no-progress", "--steps", "2", *map(str, args)])
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.count("\n") == 1 and err.startswith("prefopt train: error: "), err
    return err
