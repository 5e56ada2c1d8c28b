"""Composite scalar kernels, one Python source compiled for every backend.

``build(jit)`` compiles, with the given decorator, the leaf functions of ``_bspline1d`` and the
functions below that combine them: the mirror-extended cubic B-spline of an image at one point
(value, or value and index gradient), the trilinear value, the zero-extended taps of a B-spline
transform, its displacement and its Jacobian at one grid point. ``kernels/cpu.py`` builds them with ``numba.njit`` (cached on
disk like its kernels) and ``kernels/cuda_common.py`` with ``numba.cuda.jit(device=True)``, so the
CPU and the CUDA kernels evaluate the same arithmetic. The functions call each other through the
closure, which Numba resolves per target at compile time.

The inner loops are unrolled over the z taps with tuple elements read once into scalars: ~30%
(image) and ~10x (transform) faster than indexing tuples in the innermost loop on the CPU.
"""

import math
from types import SimpleNamespace

from . import _bspline1d as _b1


def build(jit) -> SimpleNamespace:
    """The scalar functions compiled by ``jit``: w4, dw4, mirror_taps, mirror_coord, clamp_taps
    (from ``_bspline1d``), finite3, axis_mirror, cubic_point, cubic_value, taps, eval_point, inside,
    linear_value, jac_component."""
    _w4 = jit(_b1.bspline3_weights)
    _dw4 = jit(_b1.bspline3_weights_d1)
    _mirror_taps = jit(_b1.mirror_taps)
    _mirror_coord = jit(_b1.mirror_coord)
    _clamp_taps = jit(_b1.clamp_taps)

    @jit
    def _finite3(x, y, z):
        # |v| < 1e15 is False for NaN and inf and keeps int(floor(v)) well defined.
        return abs(x) < 1e15 and abs(y) < 1e15 and abs(z) < 1e15

    @jit
    def _axis_mirror(x, n):
        """Mirror-extended cubic taps of one coordinate: (indices, weights, d weights / dx, dy/dx)."""
        x, s = _mirror_coord(x, n)
        fl = math.floor(x)
        f = x - fl
        return _mirror_taps(int(fl) - 1, n), _w4(f), _dw4(f), s

    @jit
    def _cubic_point(coef, x, y, z):
        """Value and index-gradient of the mirror-extended spline at one (finite or not) point."""
        nx, ny, nz = coef.shape
        if not _finite3(x, y, z):
            return math.nan, math.nan, math.nan, math.nan
        ix, wx, dwx, sx = _axis_mirror(x, nx)
        iy, wy, dwy, sy = _axis_mirror(y, ny)
        iz, wz, dwz, sz = _axis_mirror(z, nz)
        # The z taps are unrolled by hand and tuple elements read once into scalars: ~30% faster
        # than indexing tuples inside the innermost loop.
        k0, k1, k2, k3 = iz
        wz0, wz1, wz2, wz3 = wz
        dz0, dz1, dz2, dz3 = dwz
        val = 0.0
        gx = 0.0
        gy = 0.0
        gz = 0.0
        for a in range(4):
            i = ix[a]
            sb = 0.0
            sby = 0.0
            sbz = 0.0
            for b in range(4):
                j = iy[b]
                v0 = float(coef[i, j, k0])
                v1 = float(coef[i, j, k1])
                v2 = float(coef[i, j, k2])
                v3 = float(coef[i, j, k3])
                sc = wz0 * v0 + wz1 * v1 + wz2 * v2 + wz3 * v3
                scz = dz0 * v0 + dz1 * v1 + dz2 * v2 + dz3 * v3
                sb += wy[b] * sc
                sby += dwy[b] * sc
                sbz += wy[b] * scz
            val += wx[a] * sb
            gx += dwx[a] * sb
            gy += wx[a] * sby
            gz += wx[a] * sbz
        return val, gx * sx, gy * sy, gz * sz

    @jit
    def _cubic_value(coef, x, y, z):
        """Value only of the mirror-extended spline at a finite point."""
        nx, ny, nz = coef.shape
        x, _ = _mirror_coord(x, nx)
        y, _ = _mirror_coord(y, ny)
        z, _ = _mirror_coord(z, nz)
        fx = math.floor(x)
        fy = math.floor(y)
        fz = math.floor(z)
        ix = _mirror_taps(int(fx) - 1, nx)
        iy = _mirror_taps(int(fy) - 1, ny)
        iz = _mirror_taps(int(fz) - 1, nz)
        wx = _w4(x - fx)
        wy = _w4(y - fy)
        wz = _w4(z - fz)
        k0, k1, k2, k3 = iz
        wz0, wz1, wz2, wz3 = wz
        val = 0.0
        for a in range(4):
            i = ix[a]
            sb = 0.0
            for b in range(4):
                j = iy[b]
                sc = (
                    wz0 * float(coef[i, j, k0])
                    + wz1 * float(coef[i, j, k1])
                    + wz2 * float(coef[i, j, k2])
                    + wz3 * float(coef[i, j, k3])
                )
                sb += wy[b] * sc
            val += wx[a] * sb
        return val

    @jit
    def _taps(t, g):
        """Zero-extended taps of one coordinate: (indices, weights, d weights)."""
        fl = math.floor(t)
        f = t - fl
        base = int(fl) - 1
        idx, w = _clamp_taps(base, g, _w4(f))
        _, dw = _clamp_taps(base, g, _dw4(f))
        return idx, w, dw

    @jit
    def _eval_point(coef, x, y, z):
        """Displacement (3 floats) at grid index (x, y, z); zero for unusable coordinates."""
        gx, gy, gz, _ = coef.shape
        u0 = 0.0
        u1 = 0.0
        u2 = 0.0
        if _finite3(x, y, z):
            ix, wx, _ = _taps(x, gx)
            iy, wy, _ = _taps(y, gy)
            iz, wz, _ = _taps(z, gz)
            # Tuple elements are read once into scalars and the z taps unrolled: indexing the array
            # with ix[a] etc. inside the innermost loop is ~10x slower in Numba.
            k0, k1, k2, k3 = iz
            wz0, wz1, wz2, wz3 = wz
            for a in range(4):
                i = ix[a]
                for b in range(4):
                    j = iy[b]
                    w = wx[a] * wy[b]
                    u0 += w * (
                        wz0 * coef[i, j, k0, 0] + wz1 * coef[i, j, k1, 0]
                        + wz2 * coef[i, j, k2, 0] + wz3 * coef[i, j, k3, 0]
                    )
                    u1 += w * (
                        wz0 * coef[i, j, k0, 1] + wz1 * coef[i, j, k1, 1]
                        + wz2 * coef[i, j, k2, 1] + wz3 * coef[i, j, k3, 1]
                    )
                    u2 += w * (
                        wz0 * coef[i, j, k0, 2] + wz1 * coef[i, j, k1, 2]
                        + wz2 * coef[i, j, k2, 2] + wz3 * coef[i, j, k3, 2]
                    )
        return u0, u1, u2

    @jit
    def _inside(x, y, z, nx, ny, nz):
        # NaN fails every comparison, so it counts as outside.
        return (
            x >= -0.5 and x <= nx - 0.5 and y >= -0.5 and y <= ny - 0.5 and z >= -0.5 and z <= nz - 0.5
        )

    @jit
    def _linear_value(img, x, y, z):
        """Trilinear value of a 3-D image at a point inside it (see _inside); neighbours clamped into
        the volume, so the half-voxel border takes edge values."""
        nx, ny, nz = img.shape
        fx = math.floor(x)
        fy = math.floor(y)
        fz = math.floor(z)
        tx = x - fx
        ty = y - fy
        tz = z - fz
        i0 = min(max(int(fx), 0), nx - 1)
        j0 = min(max(int(fy), 0), ny - 1)
        k0 = min(max(int(fz), 0), nz - 1)
        i1 = min(max(int(fx) + 1, 0), nx - 1)
        j1 = min(max(int(fy) + 1, 0), ny - 1)
        k1 = min(max(int(fz) + 1, 0), nz - 1)
        c00 = (1.0 - tz) * float(img[i0, j0, k0]) + tz * float(img[i0, j0, k1])
        c01 = (1.0 - tz) * float(img[i0, j1, k0]) + tz * float(img[i0, j1, k1])
        c10 = (1.0 - tz) * float(img[i1, j0, k0]) + tz * float(img[i1, j0, k1])
        c11 = (1.0 - tz) * float(img[i1, j1, k0]) + tz * float(img[i1, j1, k1])
        c0 = (1.0 - ty) * c00 + ty * c01
        c1 = (1.0 - ty) * c10 + ty * c11
        return (1.0 - tx) * c0 + tx * c1

    @jit
    def _jac_component(coef, cc, ix, iy, iz, wx, wy, wz, dwx, dwy, dwz):
        """(d u_cc/dt_x, d u_cc/dt_y, d u_cc/dt_z) from zero-extended taps (z taps unrolled)."""
        k0, k1, k2, k3 = iz
        wz0, wz1, wz2, wz3 = wz
        dz0, dz1, dz2, dz3 = dwz
        jx = 0.0
        jy = 0.0
        jz = 0.0
        for a in range(4):
            i = ix[a]
            sb = 0.0
            sby = 0.0
            sbz = 0.0
            for b in range(4):
                j = iy[b]
                v0 = coef[i, j, k0, cc]
                v1 = coef[i, j, k1, cc]
                v2 = coef[i, j, k2, cc]
                v3 = coef[i, j, k3, cc]
                sc = wz0 * v0 + wz1 * v1 + wz2 * v2 + wz3 * v3
                scz = dz0 * v0 + dz1 * v1 + dz2 * v2 + dz3 * v3
                sb += wy[b] * sc
                sby += dwy[b] * sc
                sbz += wy[b] * scz
            jx += dwx[a] * sb
            jy += wx[a] * sby
            jz += wx[a] * sbz
        return jx, jy, jz

    return SimpleNamespace(w4=_w4, dw4=_dw4, mirror_taps=_mirror_taps, mirror_coord=_mirror_coord,
                           clamp_taps=_clamp_taps, finite3=_finite3, axis_mirror=_axis_mirror,
                           cubic_point=_cubic_point, cubic_value=_cubic_value, taps=_taps, eval_point=_eval_point,
                           inside=_inside, linear_value=_linear_value, jac_component=_jac_component)
