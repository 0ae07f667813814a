"""SynthPath rendering: a procedural H&E world whose labels are visible in the pixels.

Every tile is drawn as two stain concentration maps -- hematoxylin H (nuclei, mucin) and
eosin E (cytoplasm, collagen, muscle, necrosis) -- and turned into RGB with the Beer-Lambert
law of light absorption,

    I_c = I0_c * exp(-(H * h_c * a_h + E * e_c * a_e))      (c = R, G, B)

where h and e are the stains' optical-density vectors (Ruifrok & Johnston 2001) and a_h,
a_e their amounts. Each image gets its own jittered stain vectors, amounts, section
thickness and illuminant, then rotation/flip, blur and sensor noise, so the colour of a
tile says little about its class: morphology (nuclear size, shape, density, arrangement,
glands, fibres, vacuoles) does.

Geometry is in "units" of a 64 px reference tile covering 112 um (1 unit = 1.75 um), so a
larger --image_size shows the same field at a higher resolution. Usage:

    rng = np.random.default_rng(0)
    attrs = sample_attributes(rng, "TUM")
    rgb = render(np.random.default_rng(1), "TUM", attrs, size=64)   # (64, 64, 3) uint8
"""

import numpy as np
from PIL import Image, ImageFilter

CLASSES = ("ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM")
LEVELS = ("low", "moderate", "high")              # nuclear density
SIZES = ("small", "medium", "large")              # nuclear size
PLEO = ("mild", "moderate", "marked")             # nuclear pleomorphism
GLANDS = ("good", "moderate", "poor")             # tumour gland formation
MAX_MITOSES = 4

# Ruifrok & Johnston optical-density vectors (R, G, B), unit length
H_VEC = np.array([0.650, 0.704, 0.286])
E_VEC = np.array([0.072, 0.990, 0.105])
E_VEC = E_VEC / np.linalg.norm(E_VEC)


def tumour_grade(attrs):
    """The world's grading rule: high iff poor gland formation, marked pleomorphism or >= 3 mitoses."""
    high = attrs["gland_formation"] == "poor" or attrs["pleomorphism"] == "marked" or attrs["mitoses"] >= 3
    return "high" if high else "low"


# -----------------------------------------------------------------------------
# attributes

# fixed (class-typical) attributes of the non-tumour classes
_FIXED = {
    "ADI": dict(nuclear_density="low", nuclear_size="small", necrosis=False, mucin=False, glands=False),
    "BACK": dict(nuclear_density="low", nuclear_size="small", necrosis=False, mucin=False, glands=False),
    "DEB": dict(nuclear_density="moderate", nuclear_size="small", necrosis=True, mucin=False, glands=False),
    "LYM": dict(nuclear_density="high", nuclear_size="small", necrosis=False, mucin=False, glands=False),
    "MUC": dict(nuclear_density="low", nuclear_size="small", necrosis=False, mucin=True, glands=False),
    "MUS": dict(nuclear_density="moderate", nuclear_size="medium", necrosis=False, mucin=False, glands=False),
    "NORM": dict(nuclear_density="moderate", nuclear_size="small", necrosis=False, mucin=False, glands=True),
    "STR": dict(nuclear_density="low", nuclear_size="medium", necrosis=False, mucin=False, glands=False),
}


def sample_attributes(rng, cls):
    """Draw the graded attributes of one tile. Tumour attributes are drawn so that about half
    the tumours are high grade and each high-grade criterion also occurs on its own."""
    if cls != "TUM":
        return dict(_FIXED[cls], pleomorphism="none", mitoses=0, gland_formation="none", grade="none")
    attrs = dict(
        nuclear_density=LEVELS[rng.choice(3, p=[0.25, 0.4, 0.35])],
        nuclear_size=SIZES[rng.choice(3, p=[0.25, 0.4, 0.35])],
        pleomorphism=PLEO[rng.choice(3, p=[0.4, 0.4, 0.2])],
        gland_formation=GLANDS[rng.choice(3, p=[0.4, 0.4, 0.2])],
        mitoses=int(rng.choice(MAX_MITOSES + 1, p=[0.22, 0.24, 0.24, 0.16, 0.14])),
        necrosis=bool(rng.random() < 0.4),
        mucin=bool(rng.random() < 0.3),
    )
    attrs["glands"] = attrs["gland_formation"] != "poor"
    attrs["grade"] = tumour_grade(attrs)
    return attrs


# -----------------------------------------------------------------------------
# drawing primitives (all vectorised over pixels and over shapes)

def smooth_noise(rng, size, cell):
    """Zero-mean unit-variance noise with features about `cell` px wide, (size, size)."""
    n = int(np.ceil(size / cell)) + 3
    grid = rng.standard_normal((n, n)).astype(np.float32)
    img = Image.fromarray(grid).resize((size, size), Image.Resampling.BICUBIC, box=(1, 1, n - 2, n - 2))
    a = np.asarray(img, dtype=np.float32)
    return (a - a.mean()) / (a.std() + 1e-6)


def blob_mask(rng, size, cell, frac, soft=1.5):
    """Soft random region covering about `frac` of the tile, values in [0, 1]."""
    z = smooth_noise(rng, size, cell)
    thr = np.quantile(z, 1.0 - frac)
    return 1.0 / (1.0 + np.exp(-(z - thr) * soft * 4.0))


def stamp(canvas, cy, cx, a, b, theta, amp, irr=None, rim=0.0, rng=None):
    """Draw N soft ellipses into canvas (S, S) with a per-pixel max.

    cy, cx, a, b, theta, amp: (N,) centre, semi-axes (px), angle, darkness.
    irr: (N,) contour irregularity (pleomorphism); rim: >0 makes centres paler (vesicular chromatin).
    """
    if len(cy) == 0:
        return canvas
    S = canvas.shape[0]
    K = int(np.ceil(max(a.max(), b.max()) * (1.0 + (0 if irr is None else irr.max())))) + 2
    off = np.arange(-K, K + 1)
    iy = np.floor(cy).astype(np.int64)[:, None, None] + off[None, :, None]      # (N, W, 1)
    ix = np.floor(cx).astype(np.int64)[:, None, None] + off[None, None, :]      # (N, 1, W)
    dy = iy + 0.5 - cy[:, None, None]
    dx = ix + 0.5 - cx[:, None, None]
    c, s = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    u, v = dx * c + dy * s, -dx * s + dy * c                                    # (N, W, W)
    r = np.sqrt((u / a[:, None, None]) ** 2 + (v / b[:, None, None]) ** 2)
    if irr is not None:                 # lumpy contour: r / (1 + irr * sum of two harmonics)
        phase = rng.uniform(0, 2 * np.pi, (2, len(cy)))[:, :, None, None]
        phi = np.arctan2(v, u)
        r = r / (1.0 + irr[:, None, None] * 0.5 * (np.sin(2 * phi + phase[0]) + np.sin(3 * phi + phase[1])))
    radius = np.sqrt(a * b)[:, None, None]
    val = np.clip((1.0 - r) * radius + 0.5, 0.0, 1.0)                           # ~1 px soft edge
    if rim:
        val = val * (1.0 - rim * np.clip(1.0 - r, 0.0, 1.0))
    val = val * amp[:, None, None]
    iy, ix = np.broadcast_to(iy, val.shape), np.broadcast_to(ix, val.shape)
    ok = (iy >= 0) & (iy < S) & (ix >= 0) & (ix < S) & (val > 0)
    np.maximum.at(canvas.reshape(-1), iy[ok] * S + ix[ok], val[ok])
    return canvas


def scatter_in(rng, weight, n):
    """n points (y, x) drawn with probability proportional to weight (S, S)."""
    S = weight.shape[0]
    w = weight.reshape(-1).astype(np.float64)
    if n <= 0 or w.sum() <= 0:
        return np.zeros(0), np.zeros(0)
    idx = rng.choice(S * S, size=n, p=w / w.sum())
    return idx // S + rng.random(n), idx % S + rng.random(n)


def grid_in(rng, mask, spacing, jitter=0.25):
    """Evenly spaced points (y, x) inside a boolean mask (S, S): a jittered grid, masked."""
    S = mask.shape[0]
    y, x = jittered_grid(rng, S, spacing, jitter)
    ok = (y >= 0) & (y < S) & (x >= 0) & (x < S)
    y, x = y[ok], x[ok]
    inside = mask[y.astype(np.int64), x.astype(np.int64)]
    return y[inside], x[inside]


def jittered_grid(rng, size, spacing, jitter=0.35, keep=1.0):
    """Roughly evenly packed points (y, x) on a jittered square grid."""
    g = np.arange(spacing / 2, size, spacing)
    y, x = np.meshgrid(g, g, indexing="ij")
    y = y.ravel() + rng.normal(0, jitter * spacing, y.size)
    x = x.ravel() + rng.normal(0, jitter * spacing, x.size)
    m = rng.random(y.size) < keep
    return y[m], x[m]


def nuclei(rng, canvas, y, x, radius, elong=1.0, theta=None, amp=0.9, cv=0.08, irr=0.05, rim=0.0):
    """Draw nuclei at (y, x): mean radius (px), size variation cv, contour irregularity irr."""
    n = len(y)
    if n == 0:
        return canvas
    r = radius * np.exp(rng.normal(0, cv, n))
    e = elong * np.exp(rng.normal(0, 0.1 + cv * 0.5, n))
    th = rng.uniform(0, np.pi, n) if theta is None else theta
    am = np.clip(amp * np.exp(rng.normal(0, 0.05 + cv * 0.4, n)), 0.2, 1.15)
    ir = np.clip(irr * (1 + rng.normal(0, 0.3, n)), 0.0, 0.45)
    return stamp(canvas, y, x, r * np.sqrt(e), r / np.sqrt(e), th, am, irr=ir, rim=rim, rng=rng)


def fibres(rng, size, U, wavelength, waviness, theta0):
    """Wavy parallel fibre pattern in [0, 1] (collagen / muscle), oriented at theta0."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    warp = smooth_noise(rng, size, 18 * U) * waviness * wavelength
    coord = -xx * np.sin(theta0) + yy * np.cos(theta0) + warp
    return 0.5 + 0.5 * np.sin(2 * np.pi * coord / wavelength + 0.8 * smooth_noise(rng, size, 6 * U))


def wisps(rng, size, U, cell, width):
    """Thin meandering strands (mucin, fibrin): contour lines of smooth noise, in [0, 1]."""
    z = smooth_noise(rng, size, cell * U)
    return np.exp(-(z / width) ** 2)


def karyorrhexis(rng, H, weight, n, U):
    """Nuclear dust: many tiny dark fragments."""
    y, x = scatter_in(rng, weight, n)
    r = rng.uniform(0.35, 0.85, len(y)) * U
    return stamp(H, y, x, r, r * rng.uniform(0.6, 1.0, len(y)), rng.uniform(0, np.pi, len(y)),
                 rng.uniform(0.7, 1.1, len(y)))


# -----------------------------------------------------------------------------
# tissue classes: each returns hematoxylin and eosin concentration maps H, E (S, S)

def _lymphocytes(rng, H, weight, n, U):
    y, x = scatter_in(rng, weight, n)
    return nuclei(rng, H, y, x, 1.8 * U, amp=1.0, cv=0.07, irr=0.03)


def draw_adipose(rng, S, U, attrs):
    """Large empty polygonal fat cells (Voronoi) with thin eosinophilic membranes."""
    cell = rng.uniform(16, 30) * U
    sy, sx = jittered_grid(rng, S + 2 * cell, cell, jitter=0.3)
    sy, sx = sy - cell, sx - cell
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)
    d = np.sqrt((yy.reshape(-1, 1) - sy) ** 2 + (xx.reshape(-1, 1) - sx) ** 2)   # (S*S, M)
    d.sort(axis=1)
    gap = (d[:, 1] - d[:, 0]).reshape(S, S)
    width = rng.uniform(0.5, 1.0) * U
    membrane = np.exp(-(gap / (2 * width)) ** 2)
    E = membrane * rng.uniform(0.45, 0.7) + 0.02
    H = np.zeros((S, S), np.float32)
    y, x = scatter_in(rng, membrane ** 4, int(rng.integers(1, 6)))
    nuclei(rng, H, y, x, 1.5 * U, elong=3.0, amp=0.8)
    if rng.random() < 0.4:   # a small vessel or septum fragment
        sept = blob_mask(rng, S, 10 * U, rng.uniform(0.03, 0.12))
        E = np.maximum(E, sept * 0.45 * fibres(rng, S, U, 3 * U, 0.3, rng.uniform(0, np.pi)))
        _lymphocytes(rng, H, sept, int(rng.integers(0, 6)), U)
    return H, E


def draw_background(rng, S, U, attrs):
    """Bare glass: faint haze, dust, sometimes a torn edge of tissue or fibrin strands."""
    H = np.clip(smooth_noise(rng, S, 20 * U), 0, None) * rng.uniform(0.0, 0.06)
    E = np.clip(smooth_noise(rng, S, 20 * U), 0, None) * rng.uniform(0.0, 0.1)
    u = rng.random()
    if u < 0.35:             # torn tissue edge
        frag = blob_mask(rng, S, 14 * U, rng.uniform(0.05, 0.3), soft=3.0)
        E = E + frag * rng.uniform(0.2, 0.6) * (0.6 + 0.4 * fibres(rng, S, U, 3 * U, 0.5, rng.uniform(0, np.pi)))
        H = H + frag * rng.uniform(0.05, 0.15)
    elif u < 0.6:            # fibrin strands / floaters
        E = E + wisps(rng, S, U, 14, 0.12) * rng.uniform(0.15, 0.4)
    y, x = scatter_in(rng, np.ones((S, S)), int(rng.integers(0, 8)))
    stamp(H, y, x, rng.uniform(0.4, 1.2, len(y)) * U, rng.uniform(0.3, 0.8, len(y)) * U,
          rng.uniform(0, np.pi, len(y)), rng.uniform(0.3, 1.0, len(y)))
    return H, E


def draw_debris(rng, S, U, attrs):
    """Necrotic debris: granular eosinophilic material, nuclear dust, ghost cells, clefts."""
    solid = 1.0 - blob_mask(rng, S, 12 * U, rng.uniform(0.05, 0.3))
    grain = 0.75 + 0.25 * smooth_noise(rng, S, 1.5 * U)
    E = solid * grain * rng.uniform(0.35, 0.75)
    gy, gx = jittered_grid(rng, S, rng.uniform(5, 8) * U, keep=0.5)   # ghost cells: pale holes
    ghost = stamp(np.zeros((S, S), np.float32), gy, gx, np.full(len(gy), 2.2 * U),
                  np.full(len(gy), 2.0 * U), rng.uniform(0, np.pi, len(gy)), np.full(len(gy), 0.35))
    E = np.clip(E - ghost * E, 0, None)
    H = solid * np.clip(smooth_noise(rng, S, 3 * U), 0, None) * 0.12
    karyorrhexis(rng, H, solid, int(rng.integers(40, 130) * U * U), U)
    y, x = scatter_in(rng, solid, int(rng.integers(3, 15) * U * U))    # pyknotic nuclei
    nuclei(rng, H, y, x, 1.2 * U, amp=1.1, cv=0.2, irr=0.15)
    return H, E


def draw_lymphocytes(rng, S, U, attrs):
    """Sheets of small, round, uniform, very dark lymphocyte nuclei with scant cytoplasm."""
    spacing = rng.uniform(3.8, 5.0) * U
    y, x = jittered_grid(rng, S, spacing, jitter=0.3, keep=rng.uniform(0.7, 0.95))
    H = nuclei(rng, np.zeros((S, S), np.float32), y, x, rng.uniform(1.5, 1.9) * U, amp=1.0, cv=0.08, irr=0.04)
    E = 0.12 + 0.08 * smooth_noise(rng, S, 6 * U).clip(-1, 1)
    if rng.random() < 0.3:   # a few larger blasts / plasma cells
        y, x = scatter_in(rng, np.ones((S, S)), int(rng.integers(2, 8)))
        nuclei(rng, H, y, x, 2.5 * U, amp=0.8, rim=0.3)
    return H, E


def draw_mucus(rng, S, U, attrs):
    """Pools of pale bluish extracellular mucin with wispy strands and few floating cells."""
    base = 0.08 + 0.06 * smooth_noise(rng, S, 16 * U).clip(-1, 1)
    strands = wisps(rng, S, U, rng.uniform(8, 16), rng.uniform(0.08, 0.2))
    strands = np.maximum(strands, 0.6 * wisps(rng, S, U, 5, 0.1))
    H = base * 0.8 + strands * rng.uniform(0.12, 0.3)
    E = base + strands * rng.uniform(0.1, 0.3)
    y, x = scatter_in(rng, strands, int(rng.integers(0, 6)))
    nuclei(rng, H, y, x, 1.7 * U, amp=0.8, cv=0.15)
    return H, E


def draw_muscle(rng, S, U, attrs):
    """Smooth muscle fascicles: dense eosinophilic fibres, aligned blunt cigar-shaped nuclei."""
    theta = rng.uniform(0, np.pi)
    fib = fibres(rng, S, U, rng.uniform(2.0, 3.0) * U, 0.15, theta)
    E = rng.uniform(0.5, 0.8) * (0.8 + 0.2 * fib)
    clefts = wisps(rng, S, U, 20, 0.05)
    E = E * (1.0 - 0.7 * clefts)
    y, x = jittered_grid(rng, S, rng.uniform(6, 8) * U, jitter=0.45, keep=0.8)
    th = np.full(len(y), theta + np.pi / 2) + rng.normal(0, 0.12, len(y))
    H = nuclei(rng, np.zeros((S, S), np.float32), y, x, 1.6 * U, elong=rng.uniform(5, 7), theta=th, amp=0.75, cv=0.1)
    if rng.random() < 0.35:  # a fascicle cut across: round nuclei
        cross = blob_mask(rng, S, 16 * U, 0.35, soft=3.0)
        y, x = scatter_in(rng, cross, int(12 * U * U))
        Hc = nuclei(rng, np.zeros((S, S), np.float32), y, x, 1.3 * U, amp=0.75)
        H = H * (1 - cross) + Hc * cross
    return H, E + 0.03


def draw_stroma(rng, S, U, attrs):
    """Cancer-associated stroma: loose wavy collagen bundles, sparse thin spindle fibroblasts."""
    theta = rng.uniform(0, np.pi)
    fib = fibres(rng, S, U, rng.uniform(3.0, 5.0) * U, rng.uniform(0.3, 0.7), theta)
    E = rng.uniform(0.3, 0.6) * np.clip(fib * 1.4 - 0.2, 0, 1) * (0.8 + 0.2 * smooth_noise(rng, S, 10 * U).clip(-1, 1))
    y, x = jittered_grid(rng, S, rng.uniform(8, 12) * U, jitter=0.45, keep=0.8)
    th = np.full(len(y), theta + np.pi / 2) + rng.normal(0, 0.35, len(y))
    H = nuclei(rng, np.zeros((S, S), np.float32), y, x, 1.2 * U, elong=rng.uniform(6, 9), theta=th, amp=0.8, cv=0.12)
    _lymphocytes(rng, H, np.ones((S, S)), int(rng.integers(0, 8)), U)
    return H, E + 0.02


def _gland_field(rng, S, U, centres, radii, irr):
    """Normalised radius map rho (S, S): rho < 1 inside the nearest gland (irregular outline)."""
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)
    dy = yy[..., None] - centres[:, 0]
    dx = xx[..., None] - centres[:, 1]                                  # (S, S, G)
    phi = np.arctan2(dy, dx)
    ph = rng.uniform(0, 2 * np.pi, (3, len(radii)))
    shape = 1 + irr * (0.5 * np.sin(2 * phi + ph[0]) + 0.35 * np.sin(3 * phi + ph[1]) + 0.25 * np.sin(5 * phi + ph[2]))
    rho = np.sqrt(dy ** 2 + dx ** 2) / (radii * shape)
    g = rho.argmin(axis=-1)
    return rho.min(axis=-1), g


def draw_normal(rng, S, U, attrs):
    """Normal colonic mucosa: round regular crypts, goblet cells, one layer of small basal nuclei."""
    spacing = rng.uniform(30, 40) * U
    cy, cx = jittered_grid(rng, S + spacing, spacing, jitter=0.12)
    radii = rng.uniform(0.4, 0.46) * spacing * np.ones(len(cy))
    rho, _ = _gland_field(rng, S, U, np.stack([cy - spacing / 2, cx - spacing / 2], 1), radii, 0.06)
    lumen = rng.uniform(0.15, 0.25)
    epi = (rho < 1.0) & (rho > lumen)
    lp = rho >= 1.0                                                     # lamina propria
    E = np.where(epi, 0.35, 0.0) + lp * (0.18 + 0.08 * smooth_noise(rng, S, 4 * U).clip(-1, 1))
    gy, gx = grid_in(rng, (rho > lumen + 0.08) & (rho < 0.78), 3.6 * U)
    goblet = stamp(np.zeros((S, S), np.float32), gy, gx, np.full(len(gy), 1.7 * U), np.full(len(gy), 1.4 * U),
                   rng.uniform(0, np.pi, len(gy)), np.ones(len(gy)))
    E = E * (1 - 0.9 * goblet)
    H = goblet * 0.06
    ny, nx = grid_in(rng, (rho > 0.86) & (rho < 0.96), 1.9 * U, jitter=0.15)
    centre = np.stack([ny, nx], 1)
    dyx = centre[:, None, :] - np.stack([cy - spacing / 2, cx - spacing / 2], 1)[None]
    nearest = np.argmin((dyx ** 2).sum(-1), axis=1)
    radial = np.arctan2(dyx[np.arange(len(ny)), nearest, 0], dyx[np.arange(len(ny)), nearest, 1])
    nuclei(rng, H, ny, nx, 1.1 * U, elong=2.2, theta=radial, amp=0.9, cv=0.06, irr=0.03)
    _lymphocytes(rng, H, lp, int(lp.sum() / (70 * U * U)), U)
    return H, E


_TUM_SPACING = {"low": 4.4, "moderate": 3.5, "high": 2.9}          # nucleus spacing, units
_TUM_RADIUS = {"small": 1.4, "medium": 1.85, "large": 2.4}         # nuclear radius, units
_TUM_PLEO = {"mild": (0.05, 0.03, 1.1), "moderate": (0.18, 0.13, 1.25), "marked": (0.3, 0.25, 1.45)}  # cv, irr, elong
_TUM_GIANT = {"mild": 0.0, "moderate": 0.05, "marked": 0.16}       # share of nuclei drawn twice as large and darker


def _tumour_architecture(rng, S, U, gland_formation):
    """Boolean epithelium and lumen masks for good / moderate / poor gland formation."""
    if gland_formation == "poor":     # solid sheets and nests, no lumens
        epi = blob_mask(rng, S, 14 * U, rng.uniform(0.6, 0.85)) > 0.5
        return epi, np.zeros_like(epi)
    good = gland_formation == "good"
    spacing = rng.uniform(24, 32) * U if good else rng.uniform(17, 23) * U
    cy, cx = jittered_grid(rng, S + spacing, spacing, jitter=0.15 if good else 0.3)
    centres = np.stack([cy - spacing / 2, cx - spacing / 2], 1)
    radii = spacing * rng.uniform(0.38, 0.46, len(cy))
    rho, _ = _gland_field(rng, S, U, centres, radii, 0.08 if good else 0.3)
    lumen_frac = rng.uniform(0.55, 0.7) if good else rng.uniform(0.3, 0.45)
    lumen = rho <= lumen_frac
    if not good:                     # cribriform: extra small punched-out lumens in the epithelium
        y, x = scatter_in(rng, (rho < 0.85) & (rho > lumen_frac + 0.15), int(rng.integers(2, 7)))
        holes = stamp(np.zeros((S, S), np.float32), y, x, rng.uniform(1.2, 2.0, len(y)) * U,
                      rng.uniform(1.0, 1.8, len(y)) * U, rng.uniform(0, np.pi, len(y)), np.ones(len(y)))
        lumen = lumen | ((holes > 0.5) & (rho < 1.0))
    return (rho < 1.0) & ~lumen, lumen


def _mitotic_figure(rng, H, y, x, U):
    """One condensed, near-black mitotic figure, about 6 units across: metaphase plate, anaphase pair or clump."""
    kind = rng.integers(3)
    th = rng.uniform(0, np.pi)
    if kind == 0:                    # metaphase: a dense bar with ragged spikes
        stamp(H, np.array([y]), np.array([x]), np.array([3.2 * U]), np.array([1.4 * U]), np.array([th]),
              np.array([2.6]))
        t = rng.uniform(-2.8, 2.8, 6) * U
        side = rng.choice([-1, 1], 6) * 1.6 * U
        r = np.full(6, 0.75 * U)
        stamp(H, y + t * np.sin(th) + side * np.cos(th), x + t * np.cos(th) - side * np.sin(th), r, r, np.zeros(6),
              np.full(6, 2.4))
    elif kind == 1:                  # anaphase: two parallel bars
        d = 2.0 * U
        ys = np.array([y + d * np.cos(th), y - d * np.cos(th)])
        xs = np.array([x - d * np.sin(th), x + d * np.sin(th)])
        stamp(H, ys, xs, np.full(2, 3.0 * U), np.full(2, 1.1 * U), np.full(2, th), np.full(2, 2.6))
    else:                            # prometaphase clump of condensed chromosomes
        n = int(rng.integers(7, 10))
        ang, rad = rng.uniform(0, 2 * np.pi, n), rng.uniform(0.5, 2.3, n) * U
        r = rng.uniform(0.9, 1.1, n) * U
        stamp(H, y + rad * np.sin(ang), x + rad * np.cos(ang), r, r * 0.75, ang, np.full(n, 2.6))
    return H


def _place_mitoses(rng, region, k, U):
    """k centres inside region, at least 12 units apart, away from the border."""
    inner = region.copy()
    m = int(5 * U) + 1
    inner[:m], inner[-m:], inner[:, :m], inner[:, -m:] = False, False, False, False
    y, x = scatter_in(rng, inner, 40)
    keep = []
    for i in range(len(y)):          # loop over <= 40 candidate points, not pixels
        if len(keep) < k and all((y[i] - y[j]) ** 2 + (x[i] - x[j]) ** 2 >= (12 * U) ** 2 for j in keep):
            keep.append(i)
    return y[keep], x[keep]


def draw_tumour(rng, S, U, attrs):
    """Adenocarcinoma: crowded atypical epithelium in glands / cribriform nests / solid sheets,
    pleomorphic nuclei, mitotic figures, optional dirty necrosis and extracellular mucin."""
    epi, lumen = _tumour_architecture(rng, S, U, attrs["gland_formation"])
    stroma = ~epi & ~lumen
    fib = fibres(rng, S, U, 3.5 * U, 0.5, rng.uniform(0, np.pi))
    E = epi * 0.42 + stroma * (0.2 + 0.25 * fib) + lumen * 0.02
    H = (epi * 0.08).astype(np.float32)
    blocked = np.zeros((S, S), bool)
    if attrs["mucin"]:               # extracellular mucin lake over stroma / lumens
        lake = (blob_mask(rng, S, 16 * U, rng.uniform(0.18, 0.3)) > 0.5) & ~epi
        strands = wisps(rng, S, U, 10, 0.15)
        E = np.where(lake, 0.07 + 0.2 * strands, E)
        H = np.where(lake, 0.08 + 0.22 * strands, H)
        blocked |= lake
    if attrs["necrosis"]:            # dirty necrosis: in lumens, or a patch of a solid sheet
        patch = blob_mask(rng, S, 10 * U, rng.uniform(0.12, 0.22)) > 0.5
        nec = (lumen | (patch & epi)) & ~blocked
        if attrs["gland_formation"] != "poor":
            nec = lumen & ~blocked
        E = np.where(nec, 0.45 + 0.15 * smooth_noise(rng, S, 1.5 * U).clip(-1, 1), E)
        karyorrhexis(rng, H, nec, int(nec.sum() / (5 * U * U)), U)
        blocked |= nec
    cv, irr, elong = _TUM_PLEO[attrs["pleomorphism"]]
    radius = _TUM_RADIUS[attrs["nuclear_size"]] * U
    spacing = max(_TUM_SPACING[attrs["nuclear_density"]] * U, 1.9 * radius)
    cells = epi & ~blocked
    my, mx = _place_mitoses(rng, cells, attrs["mitoses"], U)
    yy, xx = np.mgrid[0:S, 0:S]
    halo = np.zeros((S, S), bool)
    for y, x in zip(my, mx):         # loop over <= 4 figures
        halo |= (yy - y) ** 2 + (xx - x) ** 2 < (5.0 * U) ** 2
    ny, nx = grid_in(rng, cells & ~halo, spacing, jitter=0.3)
    amp = 0.75 + 0.2 * (attrs["pleomorphism"] == "marked")
    giant = rng.random(len(ny)) < _TUM_GIANT[attrs["pleomorphism"]]
    nuclei(rng, H, ny[~giant], nx[~giant], radius, elong=elong, amp=amp, cv=cv, irr=irr, rim=0.35)
    nuclei(rng, H, ny[giant], nx[giant], 2.0 * radius, elong=elong, amp=1.05, cv=cv, irr=irr + 0.1, rim=0.2)
    sy, sx = grid_in(rng, stroma & ~blocked, 10 * U, jitter=0.4)
    nuclei(rng, H, sy, sx, 0.9 * U, elong=6.0, amp=0.5)
    E = np.where(halo, E * 0.15, E)             # the mitotic cell's cleared cytoplasm
    H = np.where(halo, 0.0, H)
    for y, x in zip(my, mx):
        _mitotic_figure(rng, H, y, x, U)
    return H, E


RENDERERS = {"ADI": draw_adipose, "BACK": draw_background, "DEB": draw_debris, "LYM": draw_lymphocytes,
             "MUC": draw_mucus, "MUS": draw_muscle, "NORM": draw_normal, "STR": draw_stroma, "TUM": draw_tumour}


# -----------------------------------------------------------------------------
# stain model

STAIN_JITTER = dict(vector=0.09, amount=0.38, thickness=0.38, illuminant=(0.78, 1.0), tint=0.12)


def stain(rng, H, E):
    """Beer-Lambert H&E rendering with per-image stain jitter -> float RGB in [0, 255]."""
    j = STAIN_JITTER
    h = H_VEC + rng.normal(0, j["vector"], 3)
    e = E_VEC + rng.normal(0, j["vector"], 3)
    h, e = np.abs(h) / np.linalg.norm(h), np.abs(e) / np.linalg.norm(e)
    z = np.clip(rng.normal(0, 1, 3), -2, 2)                               # log-normal, clipped at 2 sigma
    thick = np.exp(z[0] * j["thickness"])
    a_h = 1.9 * thick * np.exp(z[1] * j["amount"])
    a_e = 1.2 * thick * np.exp(z[2] * j["amount"])
    tint = rng.uniform(0, j["tint"]) * (h if rng.random() < 0.5 else e)  # mounting medium / background stain
    i0 = 255.0 * rng.uniform(*j["illuminant"], 3)
    od = H[..., None] * (a_h * h) + E[..., None] * (a_e * e) + tint      # (S, S, 3) optical density
    return i0 * np.exp(-od)                                              # I = I0 * exp(-OD)


def render(rng, cls, attrs, size=64):
    """Draw one tile of class cls with the given attributes -> (size, size, 3) uint8."""
    U = size / 64.0
    H, E = RENDERERS[cls](rng, size, U, attrs)
    k = int(rng.integers(4))
    H, E = np.rot90(H, k), np.rot90(E, k)
    if rng.random() < 0.5:
        H, E = H[:, ::-1], E[:, ::-1]
    rgb = stain(rng, np.asarray(H, np.float32), np.asarray(E, np.float32))
    img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.15, 0.45) * U))
    noisy = np.asarray(img, np.float32) + rng.normal(0, rng.uniform(1.0, 4.0), (size, size, 3))
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
