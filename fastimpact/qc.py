"""Quality-control pictures of a registration (PNG, drawn with Pillow) and a one-page HTML report.

Every picture shows three orthogonal planes of the fixed grid side by side: sagittal, coronal,
axial, in the neurological convention (the subject's right on the right of coronal and axial
planes, anterior on the right of the sagittal plane, superior / anterior up). Pixels are square in
mm (anisotropic voxels are stretched accordingly); oblique grids are shown along the voxel axes
closest to the world axes.

* ``checkerboard.png``: tiles alternating between the fixed and the warped image; seams across tile
  borders show misalignment.
* ``edges.png``: the fixed image (dimmed) with the fixed image's edges in green and the warped
  image's in magenta: where they coincide they turn white.
* ``grid.png``: a regular grid of the fixed space moved by the in-plane part of x -> x + u(x)
  (affine part included); segments over folded voxels are red.
* ``jacobian.png``: det(I + du/dx): blue < 1 (compression), white = 1, red > 1 (expansion), on a
  log scale from 1/4 to 4; folds (det <= 0) in solid green. Its planes (and the grid's) pass through
  the most folded voxel when there is a fold.
* ``report.html``: the figures (Jacobian, displacement, stages, warnings, evaluation) and the pictures.
"""

from __future__ import annotations

import html
import itertools
import json
from pathlib import Path

import numpy as np

from .image import Image, to_numpy

QC_FILES = ("checkerboard.png", "edges.png", "grid.png", "jacobian.png", "report.html")
PLANES = (("sagittal", 0, 1, 2), ("coronal", 1, 0, 2), ("axial", 2, 0, 1))  # name, normal, horizontal, vertical (world axes)
PANEL_PX = 288  # the largest extent of the three planes, in pixels
FOLD_RGB = (0, 230, 0)


# --------------------------------------------------------------------------------------------
# geometry of the planes
# --------------------------------------------------------------------------------------------
class _Planes:
    """Which voxel axis shows which world axis, and the display size of each plane."""

    def __init__(self, shape, affine, panel_px: int = PANEL_PX):
        self.shape = tuple(int(n) for n in shape)
        a = np.asarray(affine, dtype=np.float64)
        lin = a[:3, :3]
        self.spacing = np.linalg.norm(lin, axis=0)
        d = np.abs(lin / self.spacing)  # d[world, voxel]
        perm = max(itertools.permutations(range(3)), key=lambda p: sum(d[w, p[w]] for w in range(3)))
        self.vox = list(perm)  # voxel axis showing world axis w
        self.sign = [1 if lin[w, perm[w]] >= 0 else -1 for w in range(3)]
        extent = np.asarray(self.shape) * self.spacing
        self.mm_per_px = float(extent.max()) / panel_px
        self.inv_lin = np.linalg.inv(lin)

    def size(self, plane) -> tuple[int, int]:
        _, _, wh, wv = plane
        h, v = self.vox[wh], self.vox[wv]
        return (max(1, round(self.shape[h] * self.spacing[h] / self.mm_per_px)),
                max(1, round(self.shape[v] * self.spacing[v] / self.mm_per_px)))

    def slice2d(self, vol, plane, center) -> np.ndarray:
        """(rows, cols[, C]) of ``vol`` (X, Y, Z[, C]) through ``center``: row 0 at the top."""
        _, wn, wh, wv = plane
        n, h, v = self.vox[wn], self.vox[wh], self.vox[wv]
        s = np.take(vol, int(center[n]), axis=n)
        rest = [a for a in range(3) if a != n]
        if rest.index(h) == 0:
            s = np.swapaxes(s, 0, 1)  # now (v, h)
        if self.sign[wh] < 0:
            s = s[:, ::-1]
        if self.sign[wv] > 0:
            s = s[::-1]
        return np.ascontiguousarray(s)

    def scales(self, plane) -> tuple[float, float]:
        """Display pixels per voxel along the horizontal and vertical axes."""
        _, _, wh, wv = plane
        w, hgt = self.size(plane)
        return w / self.shape[self.vox[wh]], hgt / self.shape[self.vox[wv]]


def _resize(a2d: np.ndarray, size, nearest=False) -> np.ndarray:
    from PIL import Image as PILImage

    res = PILImage.Resampling.NEAREST if nearest else PILImage.Resampling.BILINEAR
    return np.asarray(PILImage.fromarray(np.ascontiguousarray(a2d, dtype=np.float32)).resize(size, res), dtype=np.float32)


def _window(vol) -> tuple[float, float]:
    v = np.asarray(to_numpy(vol), dtype=np.float32).ravel()
    v = v[:: max(1, v.size // 1_000_000)]
    v = v[np.isfinite(v)]
    if v.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(v, [0.5, 99.5])
    if not hi > lo:
        lo, hi = float(v.min()), float(v.max())
    return float(lo), float(hi) if hi > lo else float(lo) + 1.0


def _grey(a: np.ndarray, win) -> np.ndarray:
    lo, hi = win
    return (np.clip((a - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def _rgb(g: np.ndarray) -> np.ndarray:
    return np.repeat(g[..., None], 3, axis=2)


def _edges(a: np.ndarray) -> np.ndarray:
    """Thin edges of a 2-D float image: Sobel magnitude above a fifth of its 99.5th percentile,
    kept only where it is a maximum across the edge (four quantised directions)."""
    from scipy import ndimage

    gx = ndimage.sobel(a, axis=1, mode="nearest")
    gy = ndimage.sobel(a, axis=0, mode="nearest")
    mag = np.hypot(gx, gy)
    thr = 0.2 * np.percentile(mag, 99.5)
    if not thr > 0:
        return np.zeros(a.shape, bool)
    ang = (np.rad2deg(np.arctan2(gy, gx)) + 180.0) % 180.0
    p = np.pad(mag, 1, mode="edge")
    H, W = a.shape

    def sh(dy, dx):
        return p[1 + dy:1 + dy + H, 1 + dx:1 + dx + W]

    keep = np.zeros(a.shape, bool)
    for lo, hi, (dy, dx) in ((0, 22.5, (0, 1)), (157.5, 180.1, (0, 1)), (22.5, 67.5, (1, 1)),
                             (67.5, 112.5, (1, 0)), (112.5, 157.5, (1, -1))):
        sel = (ang >= lo) & (ang < hi)
        keep |= sel & (mag >= sh(dy, dx)) & (mag >= sh(-dy, -dx))
    return keep & (mag > thr)


# --------------------------------------------------------------------------------------------
# composing a picture
# --------------------------------------------------------------------------------------------
def _compose(panels, names, footer=None):
    from PIL import Image as PILImage
    from PIL import ImageDraw, ImageFont

    gap, top = 6, 14
    H = max(p.shape[0] for p in panels)
    W = sum(p.shape[1] for p in panels) + gap * (len(panels) + 1)
    fh = 0 if footer is None else footer.shape[0] + gap
    canvas = np.zeros((H + top + gap + fh, W, 3), np.uint8)
    x = gap
    for p in panels:
        canvas[top:top + p.shape[0], x:x + p.shape[1]] = p
        x += p.shape[1] + gap
    if footer is not None:
        canvas[top + H + gap:top + H + gap + footer.shape[0], gap:gap + footer.shape[1]] = footer[:, :W - gap]
    img = PILImage.fromarray(canvas)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    x = gap
    for p, name in zip(panels, names):
        draw.text((x, 1), name, fill=(255, 255, 255), font=font)
        x += p.shape[1] + gap
    return img


def _jacobian_rgb(det2d: np.ndarray, base: np.ndarray | None) -> np.ndarray:
    t = np.clip(np.log2(np.clip(det2d, 1e-6, None)), -2, 2) / 2.0
    rgb = np.empty(det2d.shape + (3,), np.float32)
    neg = np.minimum(t, 0) + 1.0  # 1 at t >= 0, 0 at t = -1
    pos = 1.0 - np.maximum(t, 0)  # 1 at t <= 0, 0 at t = 1
    rgb[..., 0] = 255 * neg
    rgb[..., 1] = 255 * neg * pos
    rgb[..., 2] = 255 * pos
    if base is not None:
        rgb = 0.3 * base[..., None].astype(np.float32) + 0.7 * rgb
    rgb = rgb.astype(np.uint8)
    rgb[det2d <= 0] = FOLD_RGB
    return rgb


def _jacobian_bar(width: int):
    """A colour bar (log scale 1/4 .. 4) with labels and the fold colour."""
    from PIL import Image as PILImage
    from PIL import ImageDraw, ImageFont

    bw = max(120, min(width - 120, 360))
    vals = 2.0 ** np.linspace(-2, 2, bw)
    bar = _jacobian_rgb(np.tile(vals, (10, 1)), None)
    img = PILImage.new("RGB", (max(width, bw + 130), 24))
    img.paste(PILImage.fromarray(bar), (0, 0))
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    for v, txt in ((0.25, "1/4"), (1.0, "1"), (4.0, "4")):
        x = int(round((np.log2(v) + 2) / 4 * (bw - 1)))
        d.text((max(0, min(x - 6, bw - 14)), 11), txt, fill=(255, 255, 255), font=font)
    d.rectangle((bw + 10, 0, bw + 20, 9), fill=FOLD_RGB)
    d.text((bw + 24, 0), "fold (det <= 0)", fill=(255, 255, 255), font=font)
    return np.asarray(img)


# --------------------------------------------------------------------------------------------
# the pictures
# --------------------------------------------------------------------------------------------
def _center(shape, mask) -> np.ndarray:
    if mask is not None and np.any(mask):
        idx = np.argwhere(mask)
        return np.round((idx.min(axis=0) + idx.max(axis=0)) / 2).astype(int)
    return (np.asarray(shape) - 1) // 2


def checkerboard(planes: _Planes, fixed, warped, center, tiles: int = 8):
    fw, ww = _window(fixed), _window(warped)
    panels = []
    for pl in PLANES:
        size = planes.size(pl)
        f = _grey(_resize(planes.slice2d(fixed, pl, center), size), fw)
        w = _grey(_resize(planes.slice2d(warped, pl, center), size), ww)
        tile = max(4, round(max(size) / tiles))
        yy, xx = np.mgrid[0:size[1], 0:size[0]]
        panels.append(_rgb(np.where(((yy // tile) + (xx // tile)) % 2 == 0, f, w)))
    return _compose(panels, [p[0] for p in PLANES])


def edge_overlay(planes: _Planes, fixed, warped, center):
    fw = _window(fixed)
    panels = []
    for pl in PLANES:
        size = planes.size(pl)
        f = _resize(planes.slice2d(fixed, pl, center), size)
        w = _resize(planes.slice2d(warped, pl, center), size)
        out = _rgb((_grey(f, fw) * 0.6).astype(np.uint8))
        ef, ew = _edges(f), _edges(w)
        out[..., 1][ef] = 255
        out[..., 0][ew] = 255
        out[..., 2][ew] = 255
        panels.append(out)
    return _compose(panels, [p[0] for p in PLANES])


def deformed_grid(planes: _Planes, fixed, displacement, center, det=None, lines: int = 24):
    from PIL import Image as PILImage
    from PIL import ImageDraw

    fw = _window(fixed)
    u = to_numpy(displacement)
    pics, names = [], []
    for pl in PLANES:
        size = planes.size(pl)
        _, _, wh, wv = pl
        h, v = planes.vox[wh], planes.vox[wv]
        u2 = planes.slice2d(u, pl, center).astype(np.float64)  # (rows, cols, 3) world mm
        uidx = u2 @ planes.inv_lin.T  # index displacement
        sh_, sv_ = planes.scales(pl)
        dcol = _resize(uidx[..., h], size) * sh_ * planes.sign[wh]
        drow = -_resize(uidx[..., v], size) * sv_ * planes.sign[wv]
        fold = None
        if det is not None:
            fold = _resize(planes.slice2d(det, pl, center), size, nearest=True) <= 0
        bg = _rgb((_grey(_resize(planes.slice2d(fixed, pl, center), size), fw) * 0.45).astype(np.uint8))
        img = PILImage.fromarray(bg)
        draw = ImageDraw.Draw(img)
        W, H = size
        step = max(4, round(max(size) / lines))

        def poly(rr, cc):
            xs = cc + dcol[rr, cc]
            ys = rr + drow[rr, cc]
            bad = fold[rr, cc] if fold is not None else np.zeros(len(rr), bool)
            for n in range(len(rr) - 1):
                col = (255, 40, 40) if (bad[n] or bad[n + 1]) else (255, 215, 0)
                draw.line([(float(xs[n]), float(ys[n])), (float(xs[n + 1]), float(ys[n + 1]))], fill=col, width=1)

        for r in range(step // 2, H, step):
            cc = np.arange(W)
            poly(np.full(W, r), cc)
        for c in range(step // 2, W, step):
            rr = np.arange(H)
            poly(rr, np.full(H, c))
        pics.append(np.asarray(img))
        names.append(pl[0])
    return _compose(pics, names)


def jacobian_map(planes: _Planes, fixed, det, center):
    fw = _window(fixed)
    panels = []
    for pl in PLANES:
        size = planes.size(pl)
        d = _resize(planes.slice2d(det, pl, center), size, nearest=True)
        base = _grey(_resize(planes.slice2d(fixed, pl, center), size), fw)
        panels.append(_jacobian_rgb(d, base))
    width = sum(p.shape[1] for p in panels) + 6 * 4
    return _compose(panels, [p[0] for p in PLANES], footer=_jacobian_bar(width))


# --------------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------------
def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        if v != v:
            return "nan"
        return f"{v:.4g}"
    return html.escape(str(v))


def _table(obj, depth=0) -> str:
    """A nested HTML table of a JSON-like object (dicts of scalars, dicts, lists of dicts)."""
    if isinstance(obj, dict):
        rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{_table(v, depth + 1)}</td></tr>" for k, v in obj.items())
        return f"<table>{rows}</table>"
    if isinstance(obj, (list, tuple)):
        if obj and all(isinstance(r, dict) for r in obj):
            keys = list(dict.fromkeys(k for r in obj for k in r if not isinstance(r[k], (dict, list))))
            head = "".join(f"<th>{html.escape(str(k))}</th>" for k in keys)
            body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(k))}</td>" for k in keys) + "</tr>" for r in obj)
            return f"<table><tr>{head}</tr>{body}</table>"
        if len(obj) > 12:
            return _fmt(f"{len(obj)} values")
        return ", ".join(_fmt(v) for v in obj)
    return _fmt(obj)


def _jacobian_rows(jac: dict) -> str:
    rows = []
    for key in ("inside", "outside", "all"):
        s = jac.get(key)
        if not s:
            continue
        name = {"inside": f"inside the {jac.get('region')}", "outside": f"outside the {jac.get('region')}",
                "all": "whole grid"}[key]
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{s['n_voxels']}</td><td>{_fmt(s['min'])}</td>"
                    f"<td>{_fmt(s['max'])}</td><td>{_fmt(s['std_log_jacobian'])}</td><td>{s['folded_voxels']}</td>"
                    f"<td>{100 * s['folding_fraction']:.4g}%</td></tr>")
    return ("<table><tr><th>region</th><th>voxels</th><th>min det</th><th>max det</th><th>std log det</th>"
            "<th>folded voxels</th><th>folding</th></tr>" + "".join(rows) + "</table>")


CAPTIONS = {
    "checkerboard.png": "Checkerboard: tiles alternate between the fixed and the warped image; seams at tile borders show misalignment.",
    "edges.png": "Edges: fixed image dimmed; fixed edges green, warped edges magenta, white where they coincide.",
    "grid.png": "Deformed grid: a regular grid of the fixed space moved by the in-plane part of x -> x + u(x) (affine part included); red over folded voxels.",
    "jacobian.png": "Jacobian determinant det(I + du/dx): blue < 1 (compression), white 1, red > 1 (expansion), log scale 1/4..4; folds (det <= 0) in green.",
}


def write_html(path, figures: dict, pictures: dict, *, title: str, links: dict | None = None) -> None:
    """One page: warnings, Jacobian figures, stages, any other figures, the pictures."""
    warnings = figures.get("warnings") or []
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
             "body{font-family:sans-serif;margin:1.5em;max-width:1100px}table{border-collapse:collapse;margin:.3em 0}"
             "th,td{border:1px solid #ccc;padding:2px 6px;text-align:left;font-size:90%;vertical-align:top}"
             ".warn{background:#fff3cd;border:1px solid #e0b000;padding:.5em 1em}.ok{background:#e6f4ea;padding:.5em 1em}"
             "figure{margin:1em 0}img{max-width:100%}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    if warnings:
        parts.append("<div class='warn'><b>This result looks unreliable:</b><ul>"
                     + "".join(f"<li>{html.escape(w)}</li>" for w in warnings) + "</ul></div>")
    else:
        parts.append("<p class='ok'>No warning: no fold beyond the thresholds, no level whose metric rose, few clipped steps.</p>")
    q = figures.get("quality") or {}
    if q.get("jacobian"):
        parts.append("<h2>Jacobian determinant</h2>" + _jacobian_rows(q["jacobian"]))
    if q.get("displacement") or q.get("affine_determinant") is not None:
        parts.append("<h2>Displacement</h2>" + _table({**(q.get("displacement") or {}),
                                                        "affine_determinant": q.get("affine_determinant")}))
    if figures.get("stages"):
        keep = ("stage", "level", "iterations", "metric_start", "metric_end", "metric_end_mean10", "clipped_steps", "time_s")
        parts.append("<h2>Optimisation</h2>" + _table([{k: s.get(k) for k in keep} for s in figures["stages"]]))
    for key, val in figures.items():
        if key in ("warnings", "quality", "stages") or val is None:
            continue
        parts.append(f"<h2>{html.escape(key.replace('_', ' '))}</h2>" + _table(val))
    parts.append("<h2>Pictures</h2>")
    for name, caption in pictures.items():
        parts.append(f"<figure><img src='{html.escape(name)}' alt='{html.escape(name)}'>"
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    if links:
        parts.append("<p>" + " | ".join(f"<a href='{html.escape(href)}'>{html.escape(text)}</a>" for text, href in links.items()) + "</p>")
    parts.append("</body></html>\n")
    Path(path).write_text("\n".join(parts))


def write_qc(folder, fixed: Image, warped, displacement, *, det=None, mask=None, figures: dict | None = None,
             title: str = "fastimpact registration QC", links: dict | None = None) -> dict:
    """Write the four PNGs and report.html into ``folder`` (which must exist); return {name: path}.

    fixed : Image (its grid is the picture's grid); warped : Image or (X, Y, Z) array on that grid;
    displacement : (X, Y, Z, 3) mm on that grid; det : its Jacobian determinant (computed when None);
    mask : (X, Y, Z) bool, centres the planes; figures : report figures for the HTML page
    ('quality', 'stages', 'warnings', anything else shown as tables); links : {text: href}.
    """
    from .evaluation import jacobian_determinant

    folder = Path(folder)
    f = np.asarray(to_numpy(fixed.data), dtype=np.float32)
    w = np.asarray(to_numpy(warped.data if isinstance(warped, Image) else warped), dtype=np.float32)
    u = to_numpy(displacement)
    if w.shape != f.shape or u.shape[:3] != f.shape:
        from .errors import ImageError

        raise ImageError(f"QC needs the warped image {w.shape} and the field {u.shape[:3]} on the fixed grid {f.shape}")
    if det is None:
        det = jacobian_determinant(u, fixed.affine)
    planes = _Planes(f.shape, fixed.affine)
    c = _center(f.shape, mask)
    folds = det <= 0
    cj = np.asarray(np.unravel_index(int(np.argmin(det)), det.shape)) if folds.any() else c

    def where(ci):
        x = fixed.index_to_world(ci)
        return f"planes through voxel {tuple(int(v) for v in ci)} (RAS {x[0]:.1f}, {x[1]:.1f}, {x[2]:.1f} mm)"

    pictures = {
        "checkerboard.png": checkerboard(planes, f, w, c),
        "edges.png": edge_overlay(planes, f, w, c),
        "grid.png": deformed_grid(planes, f, u, cj, det),
        "jacobian.png": jacobian_map(planes, f, det, cj),
    }
    paths, captions = {}, {}
    for name, img in pictures.items():
        img.save(folder / name, format="PNG", optimize=False)
        paths[name.split(".")[0]] = str(folder / name)
        centre = cj if name in ("grid.png", "jacobian.png") else c
        extra = " The most folded voxel is at the planes' crossing." if centre is cj and folds.any() else ""
        captions[name] = f"{CAPTIONS[name]} {where(centre)}.{extra}"
    write_html(folder / "report.html", figures or {}, captions, title=title, links=links)
    paths["report"] = str(folder / "report.html")
    return paths


def figures_json(obj) -> dict:
    """A JSON round trip (numpy scalars to floats) of a figures dict for the HTML page."""
    return json.loads(json.dumps(obj, default=lambda o: o.item() if isinstance(o, np.generic) else str(o)))
