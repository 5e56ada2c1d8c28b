"""Cubic B-spline free-form deformation on a control grid in physical space.

The control grid is aligned with the fixed image's voxel axes (same direction cosines) and
covers the box of the fixed image's voxel centres, index ``[0, n-1]`` per axis. Along an axis
with image spacing ``s`` (mm) and ``n`` voxels, a grid of spacing ``h`` (mm) has
``floor((n-1) s / h) + 4`` nodes and its node 0 lies one grid spacing before the first voxel
centre, so the continuous grid index of fixed voxel index ``i`` is ``t = i s / h + 1``.

The deformation is ``u(x) = sum_k c_k beta3(t(x) - k)`` with coefficients ``c`` of shape
``(gx, gy, gz, 3)`` holding displacement vectors in world (RAS) mm. ``dT/dc`` at a point is the
64 tensor-product weights times the 3x3 identity, so gradients are scattered sparsely.

Halving the grid spacing refines the coefficients exactly (two-scale relation of the cubic
B-spline): the deformation on the image domain is unchanged to round-off.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError

# Two-scale relation of the centred cubic B-spline: beta3(t) = sum_k S[k] beta3(2t - k), k=-2..2.
_SUBDIV_EVEN = np.array([1.0, 6.0, 1.0]) / 8.0  # applies to c[j-1], c[j], c[j+1]
_SUBDIV_ODD = np.array([0.5, 0.5])  # applies to c[j], c[j+1]


@dataclass
class BSplineGrid:
    """Geometry of a control grid aligned with a fixed image.

    Attributes
    ----------
    shape : (gx, gy, gz) number of control points per axis.
    spacing : (3,) control-point spacing in mm along the image axes.
    image_affine : 4x4 affine (voxel index -> world RAS mm) of the full-resolution fixed image
        that defines the grid's axes and domain.
    """

    shape: tuple
    spacing: np.ndarray
    image_affine: np.ndarray

    @classmethod
    def for_image(cls, image_shape, image_affine, spacing_mm) -> "BSplineGrid":
        affine = np.asarray(image_affine, dtype=np.float64)
        img_sp = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
        sp = np.broadcast_to(np.asarray(spacing_mm, dtype=np.float64), (3,)).copy()
        if not np.all(np.isfinite(sp)) or np.any(sp <= 0):
            raise ConfigError(
                f"grid spacing {spacing_mm!r} mm is invalid: it must be a positive number of mm "
                "(e.g. --grid-spacing 8)"
            )
        extent = (np.asarray(image_shape, dtype=np.float64) - 1.0) * img_sp
        shape = tuple(int(np.floor(e / h + 1e-9)) + 4 for e, h in zip(extent, sp))
        return cls(shape=shape, spacing=sp, image_affine=affine)

    @property
    def image_spacing(self) -> np.ndarray:
        return np.sqrt((self.image_affine[:3, :3] ** 2).sum(axis=0))

    def index_to_grid(self, image_affine=None) -> np.ndarray:
        """4x4 matrix mapping voxel indices of an image on the same axes to grid indices.

        ``image_affine`` defaults to the grid's own full-resolution image; a pyramid level's
        affine (same axes, other spacing/origin) gives that level's mapping. The linear part is
        diagonal because the grid shares the image axes.
        """
        world_to_grid = self.world_to_grid()
        aff = self.image_affine if image_affine is None else np.asarray(image_affine, float)
        return world_to_grid @ aff

    def world_to_grid(self) -> np.ndarray:
        """4x4 matrix mapping world RAS mm to continuous grid indices."""
        # grid index t = i * s / h + 1 with i the full-resolution voxel index.
        scale = np.diag(np.r_[self.image_spacing / self.spacing, 1.0])
        scale[:3, 3] = 1.0
        return scale @ np.linalg.inv(self.image_affine)

    def grid_to_world(self) -> np.ndarray:
        return np.linalg.inv(self.world_to_grid())


def refine_coefficients(coef: np.ndarray, fine_shape) -> np.ndarray:
    """Exact refinement of coefficients from spacing h to h/2.

    ``coef`` has shape (gx, gy, gz, C) on a grid with node 0 one coarse spacing before the
    first voxel centre; the fine grid (node 0 half a coarse spacing before it) has
    ``fine_shape``. Fine node m sits at coarse-relative half-index p = m + 1; even p = 2j takes
    (c[j-1] + 6 c[j] + c[j+1]) / 8, odd p = 2j + 1 takes (c[j] + c[j+1]) / 2; coefficients
    outside the coarse grid count as zero (they only reach outside the image domain).
    """
    out = np.asarray(coef, dtype=np.float64)
    for axis in range(3):
        out = _refine_axis(out, axis, fine_shape[axis])
    return out


def _refine_axis(c: np.ndarray, axis: int, n_fine: int) -> np.ndarray:
    c = np.moveaxis(c, axis, 0)
    n = c.shape[0]
    padded = np.zeros((n + 4,) + c.shape[1:], dtype=c.dtype)
    padded[2 : n + 2] = c  # padded[j + 2] = c[j]

    def at(j):
        return padded[np.asarray(j) + 2]

    out = np.empty((n_fine,) + c.shape[1:], dtype=c.dtype)
    m = np.arange(n_fine)
    p = m + 1
    j = p // 2
    even = p % 2 == 0
    je, jo = j[even], j[~even]
    # With the grid-size rule of BSplineGrid, j - 1 >= 0 and j + 1 <= n - 1 always hold; the
    # zero padding keeps other shapes (callers' own grids) well defined.
    je = np.clip(je, -1, n)
    jo = np.clip(jo, -2, n)
    out[even] = (
        _SUBDIV_EVEN[0] * at(je - 1) + _SUBDIV_EVEN[1] * at(je) + _SUBDIV_EVEN[2] * at(je + 1)
    )
    out[~even] = _SUBDIV_ODD[0] * at(jo) + _SUBDIV_ODD[1] * at(jo + 1)
    return np.moveaxis(out, 0, axis)


def _bspline3_derivative(t: np.ndarray, order: int) -> np.ndarray:
    """Centred cubic B-spline (order 0) or its first/second derivative at ``t``."""
    a = np.abs(t)
    out = np.zeros_like(a)
    inner = a < 1.0
    outer = (a >= 1.0) & (a < 2.0)
    if order == 0:
        out[inner] = 2.0 / 3.0 - a[inner] ** 2 + 0.5 * a[inner] ** 3
        out[outer] = (2.0 - a[outer]) ** 3 / 6.0
    elif order == 1:
        s = np.sign(t)
        out[inner] = (-2.0 * a[inner] + 1.5 * a[inner] ** 2) * s[inner]
        out[outer] = -0.5 * (2.0 - a[outer]) ** 2 * s[outer]
    elif order == 2:
        out[inner] = -2.0 + 3.0 * a[inner]
        out[outer] = 2.0 - a[outer]
    else:  # pragma: no cover - internal use only
        raise ValueError(order)
    return out


def gram_matrix(n: int, t_lo: float, t_hi: float, order_a: int, order_b: int) -> np.ndarray:
    """G[k, l] = integral over t in [t_lo, t_hi] of beta3^(a)(t - k) beta3^(b)(t - l) dt.

    Exact: the integrand is piecewise polynomial of degree <= 6 between integer knots, and each
    piece is integrated with 4-point Gauss-Legendre quadrature.
    """
    x, w = np.polynomial.legendre.leggauss(4)
    knots = np.arange(np.ceil(t_lo), np.floor(t_hi) + 1.0)
    edges = np.unique(np.r_[t_lo, knots, t_hi])
    lo, hi = edges[:-1], edges[1:]
    pts = (0.5 * (hi - lo)[:, None] * x[None, :] + 0.5 * (hi + lo)[:, None]).ravel()
    wts = (0.5 * (hi - lo)[:, None] * w[None, :]).ravel()
    k = np.arange(n)
    ba = _bspline3_derivative(pts[None, :] - k[:, None], order_a)
    bb = _bspline3_derivative(pts[None, :] - k[:, None], order_b)
    return (ba * wts[None, :]) @ bb.T


class BendingEnergy:
    """Exact bending energy of the B-spline deformation, averaged over the image box.

    ``BE = (1/V) int_box sum_c [ sum_i (d_ii u_c)^2 + 2 sum_{i<j} (d_ij u_c)^2 ] dx`` in
    mm^-2 * mm^2 = dimensionless units, where the box spans the fixed image's voxel centres
    (volume V). For a tensor-product B-spline this is a quadratic form ``c^T K c`` whose
    operator is a sum of Kronecker products of 1-D Gram matrices, so value and gradient
    ``2 K c`` are exact and cost a few small tensor contractions (no sampling).
    """

    def __init__(self, grid: BSplineGrid, image_shape):
        extent_vox = np.asarray(image_shape, dtype=np.float64) - 1.0
        length = extent_vox * grid.image_spacing / grid.spacing  # box length in grid units
        h = grid.spacing
        self._terms = []
        grams = []
        for ax in range(3):
            n = grid.shape[ax]
            lo, hi = 1.0, 1.0 + length[ax]
            grams.append({(a, b): gram_matrix(n, lo, hi, a, b) for a, b in ((0, 0), (1, 1), (2, 2))})
        norm = 1.0 / max(float(np.prod(length)), 1e-12)
        for i in range(3):
            orders = [0, 0, 0]
            orders[i] = 2
            mats = [grams[ax][(o, o)] for ax, o in enumerate(orders)]
            self._terms.append((norm / h[i] ** 4, mats))
        for i in range(3):
            for j in range(i + 1, 3):
                orders = [0, 0, 0]
                orders[i] = orders[j] = 1
                mats = [grams[ax][(o, o)] for ax, o in enumerate(orders)]
                self._terms.append((2.0 * norm / (h[i] ** 2 * h[j] ** 2), mats))

    def _apply(self, coef: np.ndarray) -> np.ndarray:
        out = np.zeros_like(coef, dtype=np.float64)
        for scale, (gx, gy, gz) in self._terms:
            y = np.einsum("ia,abcd->ibcd", gx, coef, optimize=True)
            y = np.einsum("jb,ibcd->ijcd", gy, y, optimize=True)
            y = np.einsum("kc,ijcd->ijkd", gz, y, optimize=True)
            out += scale * y
        return out

    def value_and_gradient(self, coef: np.ndarray):
        """Return (BE, dBE/dcoef) for coefficients of shape (gx, gy, gz, 3) in mm."""
        kc = self._apply(coef)
        return float(np.vdot(coef, kc)), 2.0 * kc
