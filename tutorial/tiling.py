"""The picture of tiling: which tiles of the causal score matrix the kernel computes.

    python -m tutorial.tiling [--out PATH] [--no-plot]

Flash attention never holds the (Nq, Nk) score matrix S. One program owns
BLOCK_M query rows and walks the keys BLOCK_N at a time, so S is visited as a
grid of (BLOCK_M, BLOCK_N) tiles. With a causal mask, query i sees key j only
when j <= i + (Nk - Nq) (bottom-right alignment), and each tile falls in one
of three kinds:

    full      every score in it is visible: computed with no mask at all
    masked    it straddles the diagonal: computed, then masked score by score
    skipped   no score in it is visible: its K and V are never loaded

For each query block the kernel gets the split from `_causal_key_range`:
key blocks before `full_end` are full, those in [full_end, end) are masked,
and the rest are skipped. This script asks `reference.tiled.causal_key_bounds`,
the same arithmetic in plain Python, rather than deriving it a third time.

Skipped tiles are where causal attention saves its work: about half the
FLOPs when Nq = Nk, less the coarser the tiles, because the masked tiles on
the diagonal are computed in full and half thrown away. When Nq < Nk (a
chunk of new queries over a longer KV cache) the triangle slides to the right
edge: most tiles are full and few are skipped.

It prints the tile grid and the counts for two shapes, and draws both into
tutorial/figures/causal_tiling.png (matplotlib, needed for the figure only).
"""
import argparse
import os

from reference.tiled import causal_key_bounds

FULL, MASKED, SKIPPED = "full", "masked", "skipped"
LABELS = {
    FULL: "full, no mask",
    MASKED: "on the diagonal, masked",
    SKIPPED: "skipped: never loaded",
}
SYMBOLS = {FULL: "#", MASKED: "/", SKIPPED: "."}
COLOURS = {FULL: "#3b6fb6", MASKED: "#f0a030", SKIPPED: "#e8e8e8"}

# The tiles of the GPU forward kernel's first candidate (kernels/configs.py, FWD_CANDIDATES): an H100's default.
BLOCK_M, BLOCK_N = 128, 64
# (title, Nq, Nk): a square prefill, and new queries over a longer KV cache.
PANELS = [
    ("prefill, Nq = Nk", 512, 512),
    ("decode-like: new queries over a KV cache, Nq < Nk", 256, 512),
]
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "figures", "causal_tiling.png")


def cdiv(a, b):
    return -(-a // b)


def classify_tiles(n_q, n_k, block_m, block_n):
    """The kind of every tile: a list with one row per query block, one entry per key block."""
    grid = []
    for start_m in range(0, n_q, block_m):
        full_end, end = causal_key_bounds(start_m, block_m, block_n, n_q, n_k)
        row = []
        for start_n in range(0, n_k, block_n):
            row.append(FULL if start_n < full_end else MASKED if start_n < end else SKIPPED)
        grid.append(row)
    return grid


def count_tiles(grid, n_q, n_k, block_m, block_n):
    """Tile counts, and the share of the Nq x Nk scores that the skipped tiles spare.

    Tiles at a ragged edge are counted by the scores they actually cover.
    `invisible` is the share of scores the mask hides: what an infinitely
    fine tiling would skip.
    """
    kinds = [kind for row in grid for kind in row]
    skipped_scores = 0
    for i, row in enumerate(grid):
        rows = min(block_m, n_q - i * block_m)
        for j, kind in enumerate(row):
            if kind == SKIPPED:
                skipped_scores += rows * min(block_n, n_k - j * block_n)
    offset = n_k - n_q
    # Query i sees keys 0 .. i + offset: min(n_k, max(0, i + offset + 1)) of them.
    visible = sum(min(n_k, max(0, i + offset + 1)) for i in range(n_q))
    return {
        "total": len(kinds),
        "visited": kinds.count(FULL) + kinds.count(MASKED),
        FULL: kinds.count(FULL),
        MASKED: kinds.count(MASKED),
        SKIPPED: kinds.count(SKIPPED),
        "flops_skipped": skipped_scores / (n_q * n_k),
        "invisible": 1 - visible / (n_q * n_k),
    }


def describe(title, n_q, n_k, block_m, block_n):
    """Print one shape: the tile grid as text, then its counts. Returns (grid, counts)."""
    grid = classify_tiles(n_q, n_k, block_m, block_n)
    counts = count_tiles(grid, n_q, n_k, block_m, block_n)
    print(f"Nq={n_q}, Nk={n_k}: {title}")
    print("  query block   key blocks ->")
    for i, row in enumerate(grid):
        print(f"  {i * block_m:>5}-{min(n_q, (i + 1) * block_m) - 1:<5}   " + " ".join(SYMBOLS[kind] for kind in row))
    print(f"  tiles: {counts['total']} total, {counts['visited']} visited "
          f"({counts[FULL]} full + {counts[MASKED]} masked), {counts[SKIPPED]} skipped")
    print(f"  FLOPs skipped: {100 * counts['flops_skipped']:.1f}% of the Nq x Nk scores "
          f"(the mask hides {100 * counts['invisible']:.1f}%; the rest is computed in diagonal tiles, then masked)")
    print()
    return grid, counts


def draw_panel(ax, title, n_q, n_k, block_m, block_n, grid, counts):
    """Tiles as coloured rectangles, keys across, queries down, and the mask's diagonal on top."""
    from matplotlib.patches import Rectangle

    for i, row in enumerate(grid):
        for j, kind in enumerate(row):
            x, y = j * block_n, i * block_m
            ax.add_patch(Rectangle((x, y), min(block_n, n_k - x), min(block_m, n_q - y),
                                   facecolor=COLOURS[kind], edgecolor="white", linewidth=1.5,
                                   hatch="//" if kind == MASKED else None))
    # Query i sees keys j <= i + offset: the boundary of the visible region.
    offset = n_k - n_q
    ax.plot([max(0, offset), min(n_k, n_q + offset)], [max(0, -offset), min(n_q, n_k - offset)],
            color="black", linewidth=1.2, label="causal boundary: key = query + (Nk - Nq)")
    ax.set_xlim(0, n_k)
    ax.set_ylim(n_q, 0)  # query 0 at the top, as the matrix is written
    ax.set_aspect("equal")
    ax.set_xticks(range(0, n_k + 1, 2 * block_n))
    ax.set_yticks(range(0, n_q + 1, block_m))
    ax.set_xlabel(f"key index (BLOCK_N = {block_n})")
    ax.set_ylabel(f"query index (BLOCK_M = {block_m})")
    ax.set_title(f"{title}\nNq={n_q}, Nk={n_k}: {counts[FULL]} full, {counts[MASKED]} masked, "
                 f"{counts[SKIPPED]} skipped\n{100 * counts['flops_skipped']:.1f}% of the FLOPs skipped",
                 fontsize=10)


def plot(panels, block_m, block_n, out):
    """Draw every panel side by side, one shared legend, into `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    widths = [n_k for _, _, n_k, _, _ in panels]
    fig, axes = plt.subplots(1, len(panels), figsize=(11, 5.4), gridspec_kw={"width_ratios": widths})
    for ax, (title, n_q, n_k, grid, counts) in zip(axes, panels):
        draw_panel(ax, title, n_q, n_k, block_m, block_n, grid, counts)
    handles = [Patch(facecolor=COLOURS[k], hatch="//" if k == MASKED else None, label=LABELS[k]) for k in LABELS]
    handles += axes[0].get_legend_handles_labels()[0]
    fig.legend(handles=handles, loc="lower center", ncol=4, frameon=False, fontsize=9)
    fig.suptitle("Causal flash attention: the tiles one program per query block visits", fontsize=12)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help="where to save the figure (default: %(default)s)")
    parser.add_argument("--no-plot", action="store_true", help="print the counts only; no matplotlib needed")
    args = parser.parse_args(argv)

    print(f"Causal attention tiles, BLOCK_M={BLOCK_M}, BLOCK_N={BLOCK_N}  "
          f"({SYMBOLS[FULL]} {LABELS[FULL]}   {SYMBOLS[MASKED]} {LABELS[MASKED]}   "
          f"{SYMBOLS[SKIPPED]} {LABELS[SKIPPED]})\n")
    panels = []
    for title, n_q, n_k in PANELS:
        grid, counts = describe(title, n_q, n_k, BLOCK_M, BLOCK_N)
        panels.append((title, n_q, n_k, grid, counts))
    if not args.no_plot:
        plot(panels, BLOCK_M, BLOCK_N, args.out)
        print(f"figure: {args.out}")


if __name__ == "__main__":
    main()
