"""Procedural renderer of the toy world: exact labels, numpy only, vectorised over a batch.

Every image is 64x64 RGB: one object (a silhouette) on a light neutral background, filled with one
of the styles (a texture program that alternates two tones of the object's *own* colour, so the
silhouette stays readable), in one of the colours, at a random position, scale and rotation.  On a
fraction of the images a small watermark glyph is drawn at one of a few fixed locations; captions
never mention it (see :mod:`.captions`).

``render_batch(n, seed)`` samples labels and renders them; ``render_labels(labels)`` renders given
labels deterministically (same labels -> same pixels).
"""

from __future__ import annotations

import numpy as np

SIZE = 64

OBJECTS = ["circle", "square", "triangle", "star", "cross", "ring", "heart", "crescent"]
STYLES = ["flat", "stripes", "checker", "dots", "gradient", "outline"]
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]

COLOUR_RGB = np.array(
    [
        [0.86, 0.14, 0.13],  # red
        [0.15, 0.62, 0.20],  # green
        [0.14, 0.30, 0.86],  # blue
        [0.95, 0.80, 0.08],  # yellow
        [0.58, 0.20, 0.74],  # purple
        [0.97, 0.50, 0.06],  # orange
    ],
    dtype=np.float32,
)

# The watermark: a 10x10 dark glyph (a box with a diagonal cross), at one of three fixed places.
WM_SIZE = 10
WM_LOCATIONS = [(52, 52), (2, 2), (2, 52)]  # (x0, y0): bottom-right, top-left, bottom-left
WM_RATE = 0.25
WM_TONE = 0.12


def _make_glyph() -> np.ndarray:
    g = np.zeros((WM_SIZE, WM_SIZE), np.float32)
    g[0, :] = g[-1, :] = g[:, 0] = g[:, -1] = 1.0
    for i in range(2, WM_SIZE - 2):
        g[i, i] = g[i, WM_SIZE - 1 - i] = 1.0
    return g


WM_GLYPH = _make_glyph()

_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5


# ----------------------------------------------------------------------------------------- shapes
# Signed distance (approximately) in units of the object's radius; negative inside.


def _circle(u, v, cx, cy, r):
    return np.sqrt((u - cx) ** 2 + (v - cy) ** 2) - r


def _convex(u, v, verts):
    """Max over edges of the signed distance to the edge line (exact inside, fine for antialiasing)."""
    verts = np.asarray(verts, np.float32)
    # orientation: make normals point outwards
    area = 0.0
    for i in range(len(verts)):
        x0, y0 = verts[i]
        x1, y1 = verts[(i + 1) % len(verts)]
        area += x0 * y1 - x1 * y0
    sign = 1.0 if area > 0 else -1.0
    d = None
    for i in range(len(verts)):
        x0, y0 = verts[i]
        x1, y1 = verts[(i + 1) % len(verts)]
        ex, ey = x1 - x0, y1 - y0
        n = np.hypot(ex, ey)
        nx, ny = sign * ey / n, -sign * ex / n
        di = (u - x0) * nx + (v - y0) * ny
        d = di if d is None else np.maximum(d, di)
    return d


def _sdf(obj: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    name = OBJECTS[obj]
    if name == "circle":
        return np.sqrt(u * u + v * v) - 0.9
    if name == "square":
        return np.maximum(np.abs(u), np.abs(v)) - 0.76
    if name == "triangle":
        a = np.deg2rad([-90.0, 30.0, 150.0])
        return _convex(u, v - 0.12, np.stack([1.08 * np.cos(a), 1.08 * np.sin(a)], 1))
    if name == "star":
        ro, ri = 1.0, 0.42
        r = np.sqrt(u * u + v * v)
        th = np.arctan2(u, -v)  # 0 = pointing up
        sector = 2 * np.pi / 5
        a = np.abs(np.mod(th + sector / 2, sector) - sector / 2)  # folded angle in [0, pi/5]
        px, py = r * np.cos(a), r * np.sin(a)
        ax, ay = ro, 0.0
        bx, by = ri * np.cos(sector / 2), ri * np.sin(sector / 2)
        ex, ey = bx - ax, by - ay
        n = np.hypot(ex, ey)
        nx, ny = ey / n, -ex / n  # outward normal of the edge A->B
        if ax * nx + ay * ny - (0 * nx + 0 * ny) < 0:
            nx, ny = -nx, -ny
        return (px - ax) * nx + (py - ay) * ny
    if name == "cross":
        w, length = 0.3, 0.95
        au, av = np.abs(u), np.abs(v)
        return np.minimum(np.maximum(au - w, av - length), np.maximum(au - length, av - w))
    if name == "ring":
        return np.abs(np.sqrt(u * u + v * v) - 0.66) - 0.29
    if name == "heart":
        c1 = _circle(u, v, -0.43, -0.3, 0.5)
        c2 = _circle(u, v, 0.43, -0.3, 0.5)
        tri = _convex(u, v, [(-0.9, -0.18), (0.9, -0.18), (0.0, 0.92)])
        return np.minimum(np.minimum(c1, c2), tri)
    if name == "crescent":
        return np.maximum(_circle(u, v, 0.0, 0.0, 0.92), -_circle(u, v, 0.42, -0.18, 0.74))
    raise ValueError(name)


# ------------------------------------------------------------------------------------------ labels


def sample_labels(
    n: int,
    rng: np.random.Generator | int | None = None,
    *,
    objects=None,
    styles=None,
    colours=None,
    watermark_rate: float = WM_RATE,
    exclude_pairs=(),
) -> dict:
    """Sample ``n`` label sets.  ``objects``/``styles``/``colours`` restrict (or fix, when given an
    int or a list of length n) the classes; ``exclude_pairs`` is a set of (object, style) index pairs
    that are re-drawn (used to hold out pairs from training)."""
    rng = np.random.default_rng(rng)

    def allowed(spec, k):
        if spec is None:
            return np.arange(k)
        spec = np.atleast_1d(np.asarray(spec, np.int64))
        return None if (len(spec) == n and n > 1) else spec  # None: one value per item, given

    def pick(spec, k):
        a = allowed(spec, k)
        return np.asarray(spec, np.int64).copy() if a is None else rng.choice(a, n)

    obj = pick(objects, len(OBJECTS))
    sty = pick(styles, len(STYLES))
    col = pick(colours, len(COLOURS))
    if exclude_pairs:
        ex = np.zeros((len(OBJECTS), len(STYLES)), bool)
        for o, s in exclude_pairs:
            ex[o, s] = True
        a_sty, a_obj = allowed(styles, len(STYLES)), allowed(objects, len(OBJECTS))
        for _ in range(200):
            bad = ex[obj, sty]
            if not bad.any():
                break
            m = int(bad.sum())
            # re-draw a free attribute within its allowed set
            if a_sty is not None and len(a_sty) > 1:
                sty[bad] = rng.choice(a_sty, m)
            elif a_obj is not None and len(a_obj) > 1:
                obj[bad] = rng.choice(a_obj, m)
            else:
                break
    wm = rng.random(n) < watermark_rate
    wm_loc = np.where(wm, rng.integers(0, len(WM_LOCATIONS), n), -1)
    return {
        "object": obj.astype(np.int64),
        "style": sty.astype(np.int64),
        "colour": col.astype(np.int64),
        "cx": rng.uniform(21, 43, n).astype(np.float32),
        "cy": rng.uniform(21, 43, n).astype(np.float32),
        "scale": rng.uniform(13.0, 19.0, n).astype(np.float32),
        "angle": rng.uniform(-35, 35, n).astype(np.float32),
        "phase": rng.integers(0, 64, (n, 2)).astype(np.float32),
        "bg": rng.uniform(0.86, 0.96, n).astype(np.float32),
        "tint": rng.uniform(-0.04, 0.04, (n, 3)).astype(np.float32),
        "watermark": wm,
        "wm_loc": wm_loc.astype(np.int64),
    }


def wm_boxes(labels: dict) -> np.ndarray:
    """Watermark boxes (x0, y0, x1, y1) in pixels, exclusive end; -1 where there is none."""
    loc = np.asarray(labels["wm_loc"])
    out = np.full((len(loc), 4), -1, np.int64)
    for i, l in enumerate(loc):
        if l >= 0:
            x0, y0 = WM_LOCATIONS[l]
            out[i] = (x0, y0, x0 + WM_SIZE, y0 + WM_SIZE)
    return out


# ----------------------------------------------------------------------------------------- render


def render_labels(labels: dict) -> np.ndarray:
    """Render label sets to uint8 images of shape (n, 64, 64, 3).  Deterministic."""
    obj = labels["object"]
    n = len(obj)
    cx = labels["cx"][:, None, None]
    cy = labels["cy"][:, None, None]
    sc = labels["scale"][:, None, None]
    ang = np.deg2rad(labels["angle"])[:, None, None]
    ca, sa = np.cos(ang), np.sin(ang)
    dx, dy = _XX[None] - cx, _YY[None] - cy
    u = (dx * ca + dy * sa) / sc
    v = (-dx * sa + dy * ca) / sc
    sdf = np.empty((n, SIZE, SIZE), np.float32)
    for k in range(len(OBJECTS)):
        idx = np.nonzero(obj == k)[0]
        if len(idx):
            sdf[idx] = _sdf(k, u[idx], v[idx])
    sdf_px = sdf * sc  # signed distance in pixels
    alpha = np.clip(0.5 - sdf_px, 0.0, 1.0)

    base = np.clip(COLOUR_RGB[labels["colour"]] + labels["tint"], 0, 1)[:, None, None, :]  # n,1,1,3
    dark = base * 0.58
    light = base + (1.0 - base) * 0.5
    # t in [0,1]: 0 -> light tone, 1 -> dark tone; -1 (flat) -> base colour
    t = np.zeros((n, SIZE, SIZE), np.float32)
    sty = labels["style"]
    px = labels["phase"][:, 0][:, None, None]
    py = labels["phase"][:, 1][:, None, None]
    X, Y = _XX[None] - 0.5, _YY[None] - 0.5
    for s, name in enumerate(STYLES):
        idx = np.nonzero(sty == s)[0]
        if not len(idx):
            continue
        if name == "flat":
            t[idx] = -1.0
        elif name == "stripes":
            t[idx] = (np.floor((Y + py[idx]) / 4.0) % 2).astype(np.float32)
        elif name == "checker":
            t[idx] = ((np.floor((X + px[idx]) / 5.0) + np.floor((Y + py[idx]) / 5.0)) % 2).astype(np.float32)
        elif name == "dots":
            gx = np.mod(X + px[idx], 8.0) - 4.0
            gy = np.mod(Y + py[idx], 8.0) - 4.0
            t[idx] = np.clip(2.6 - np.sqrt(gx * gx + gy * gy) + 0.5, 0, 1)
        elif name == "gradient":
            r = np.sqrt(u[idx] ** 2 + v[idx] ** 2)
            t[idx] = np.clip(r, 0, 1)
        elif name == "outline":
            t[idx] = np.clip(sdf_px[idx] + 3.5 + 0.5, 0, 1)  # dark within ~3.5 px of the edge
    flat = (t < 0)[..., None]
    tt = np.clip(t, 0, 1)[..., None]
    fill = np.where(flat, base, light * (1 - tt) + dark * tt)
    bg = labels["bg"][:, None, None, None]
    img = bg * (1 - alpha[..., None]) + fill * alpha[..., None]

    wl = labels["wm_loc"]
    for i in np.nonzero(wl >= 0)[0]:
        x0, y0 = WM_LOCATIONS[wl[i]]
        region = img[i, y0 : y0 + WM_SIZE, x0 : x0 + WM_SIZE]
        a = WM_GLYPH[..., None] * 0.9
        img[i, y0 : y0 + WM_SIZE, x0 : x0 + WM_SIZE] = region * (1 - a) + WM_TONE * a
    return (np.clip(img, 0, 1) * 255.0 + 0.5).astype(np.uint8)


def render_batch(n: int, seed=None, **kw) -> tuple[np.ndarray, dict]:
    """Sample ``n`` labels (see :func:`sample_labels`) and render them."""
    labels = sample_labels(n, seed, **kw)
    labels["wm_box"] = wm_boxes(labels)
    return render_labels(labels), labels


def to_tensor(images: np.ndarray):
    """uint8 (n,H,W,3) -> float tensor (n,3,H,W) in [0,1]."""
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)


def save_grid(images: np.ndarray, path: str, ncol: int = 8) -> None:
    from PIL import Image

    n = len(images)
    nrow = (n + ncol - 1) // ncol
    grid = np.full((nrow * SIZE, ncol * SIZE, 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, ncol)
        grid[r * SIZE : (r + 1) * SIZE, c * SIZE : (c + 1) * SIZE] = im
    Image.fromarray(grid).save(path)
