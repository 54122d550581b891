"""Spatial operators: orthogonal bases, SVD == direct degradation, pseudo-inverse == projection."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage

from df5t_deploy.operators import BlockMean, GaussianBlur, Identity, Inpainting

SHAPE = (24, 36)  # deliberately not square


def _operators(rng):
    return {
        "identity": Identity(SHAPE),
        "inpaint": Inpainting(rng.random(SHAPE) < 0.3),
        "sr2": BlockMean(SHAPE, (2, 2)),
        "sr3": BlockMean(SHAPE, (3, 3)),
        "sr4": BlockMean(SHAPE, (4, 4)),
        "along-z-4": BlockMean(SHAPE, (4, 1)),
        "blur": GaussianBlur(SHAPE, (1.5, 0.8)),
        "blur-wide": GaussianBlur((10, 12), (4.0, 4.0)),  # kernel longer than the image
    }


@pytest.fixture(params=list(_operators(np.random.default_rng(0))))
def op(request):
    return _operators(np.random.default_rng(0))[request.param]


@pytest.fixture
def images(op):
    return np.random.default_rng(1).standard_normal((3, *op.shape)).astype(np.float32)


def test_v_is_orthogonal(op, images):
    c = op.vt(images)
    np.testing.assert_allclose(np.linalg.norm(c, axis=(-2, -1)), np.linalg.norm(images, axis=(-2, -1)), rtol=1e-5)
    np.testing.assert_allclose(op.v(c), images, atol=1e-5)


def test_u_is_orthogonal(op):
    y = np.random.default_rng(2).standard_normal((2, *op.measurement_shape)).astype(np.float32)
    spectral = op.ut(y)
    np.testing.assert_allclose(np.linalg.norm(spectral, axis=(-2, -1)), np.linalg.norm(y * _measured(op), axis=(-2, -1)), rtol=1e-5)
    np.testing.assert_allclose(op.u(spectral), y * _measured(op), atol=1e-5)


def _measured(op):
    """Inpainting measures only the observed pixels; its measurement space is the rest zeroed."""
    return op.observed().astype(np.float32) if isinstance(op, Inpainting) else 1.0


def test_svd_equals_direct_degradation(op, images):
    if isinstance(op, GaussianBlur):  # exactness needs every eigenvalue, however small
        op = GaussianBlur(op.shape, op.sigma, zero_threshold=0.0)
    np.testing.assert_allclose(op.u(op.singular_values * op.vt(images)), op.forward(images), atol=1e-5)


def test_pseudo_inverse_is_projection_onto_row_space(op, images):
    projection = op.v(op.vt(images) * op.observed())
    np.testing.assert_allclose(op.pinv(op.forward(images)), projection, atol=2e-3 if isinstance(op, GaussianBlur) else 1e-5)


def test_direct_degradations_match_their_definitions():
    g = np.random.default_rng(3).standard_normal(SHAPE).astype(np.float32)
    np.testing.assert_allclose(BlockMean(SHAPE, (3, 3)).forward(g), g.reshape(8, 3, 12, 3).mean(axis=(1, 3)), atol=1e-6)
    np.testing.assert_allclose(BlockMean(SHAPE, (4, 1)).forward(g), g.reshape(6, 4, 36).mean(axis=1), atol=1e-6)
    blur = scipy.ndimage.gaussian_filter(g.astype(np.float64), (1.5, 0.8), mode="reflect")
    exact = GaussianBlur(SHAPE, (1.5, 0.8), zero_threshold=0.0)
    np.testing.assert_allclose(exact.u(exact.singular_values * exact.vt(g)), blur, atol=1e-5)
    mask = np.zeros(SHAPE, bool)
    mask[3:9, 5:20] = True
    np.testing.assert_array_equal(Inpainting(mask).forward(g), np.where(mask, 0, g))


def test_blur_thresholds_tiny_eigenvalues_as_unobserved():
    op = GaussianBlur((64, 64), (3.0, 3.0))
    s = op.singular_values
    assert s[0, 0] == pytest.approx(1.0, abs=1e-6)
    assert 0 < (s == 0).mean() < 1
    assert s[s > 0].min() >= 1e-3


@pytest.mark.parametrize("shape, block", [((10, 12), (3, 3)), ((9, 8), (2, 1))])
def test_block_mean_rejects_partial_blocks(shape, block):
    with pytest.raises(ValueError, match="whole number"):
        BlockMean(shape, block)
