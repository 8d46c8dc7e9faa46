"""PNG charts of `python -m benchmarks` results (matplotlib, no display needed)."""

from __future__ import annotations

import pathlib

MODE_LABELS = {"full_pull": "full pull", "stream_cold": "streaming, cold", "stream_profile": "streaming + profile",
               "warm": "warm (node-local)"}
MODE_COLORS = {"full_pull": "#b0413e", "stream_cold": "#2f6db5", "stream_profile": "#55a868", "warm": "#8c8c8c"}
COMMAND_LABELS = {"python": "python3 imports", "http": "http.server answers"}


def _plt():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def cold_start(results: dict, profile: str, out: pathlib.Path) -> pathlib.Path:
    """Grouped bars: for each (command, image), the median time to first output of each way to start."""
    plt = _plt()
    cs = results["cold_start"][profile]
    images = results["images"]
    groups = [(c, im) for c in COMMAND_LABELS for im in cs["by_image"] if c in cs["by_image"][im]]
    modes = [m for m in MODE_LABELS if any(m in cs["by_image"][im][c] for c, im in groups)]
    fig, ax = plt.subplots(figsize=(10, 5.2), dpi=110)
    width = 0.8 / len(modes)
    top = max(cs["by_image"][im][c][m]["median"] for c, im in groups for m in modes if m in cs["by_image"][im][c])
    for j, mode in enumerate(modes):
        xs, ys = [], []
        for i, (c, im) in enumerate(groups):
            cell = cs["by_image"][im][c].get(mode)
            if cell is None:
                continue
            xs.append(i + (j - (len(modes) - 1) / 2) * width)
            ys.append(cell["median"])
        bars = ax.bar(xs, ys, width * 0.95, label=MODE_LABELS[mode], color=MODE_COLORS[mode])
        for b, y in zip(bars, ys):
            ax.text(b.get_x() + b.get_width() / 2, y + top * 0.01, f"{y:.1f}", ha="center", va="bottom", fontsize=8)
    labels = []
    for c, im in groups:
        size = images[im]["content_bytes"] / 1e6
        cell = cs["by_image"][im][c]
        ratio = ""
        if "full_pull" in cell and "stream_cold" in cell:
            ratio = f"\ncold / pull = {cell['stream_cold']['median'] / cell['full_pull']['median']:.2f}"
        if "full_pull" in cell and "stream_profile" in cell:
            ratio += f"\nprofile / pull = {cell['stream_profile']['median'] / cell['full_pull']['median']:.3f}"
        labels.append(f"{COMMAND_LABELS[c]}\n{im} image ({size:.0f} MB){ratio}")
    ax.set_xticks(range(len(groups)), labels, fontsize=8.5)
    ax.set_ylabel("seconds from start to first output (median)")
    link = cs["link"]
    ax.set_title(f"Cold start vs full pull — regional link {link['rate_mbit']:g} Mbit/s, {link['rtt_ms']:g} ms RTT "
                 f"(median of {cs['runs']} runs)", fontsize=10.5)
    ax.set_ylim(0, top * 1.12)
    ax.legend(fontsize=8.5, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = out / f"coldstart_{profile}.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def fanout(results: dict, out: pathlib.Path) -> pathlib.Path:
    plt = _plt()
    fo = results["fanout"]
    ns = sorted(int(n) for n in fo["by_n"])
    cells = [fo["by_n"][str(n)] for n in ns]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4.2), dpi=110)
    a.plot(ns, [c["start_median_s"] for c in cells], "o-", color="#2f6db5", label="start, median of the N nodes")
    a.plot(ns, [c["start_max_s"] for c in cells], "s--", color="#2f6db5", alpha=0.6, label="start, slowest node")
    a.plot(ns, [c["fetch_all_seconds"] for c in cells], "^-", color="#b0413e", label="then every node fetches every chunk")
    a.set_xlabel("cold nodes starting the image at once (N)")
    a.set_ylabel("seconds")
    a.set_xticks(ns)
    a.set_ylim(bottom=0)
    a.grid(alpha=0.3)
    a.legend(fontsize=8)
    a.set_title(f"{fo['image']} image, one zonal cache", fontsize=10)
    b.plot(ns, [c["regional_reads_per_unique_chunk"] for c in cells], "o-", color="#55a868",
           label="regional reads per unique chunk (Cassandra)")
    b.plot(ns, [c["link_bytes_per_image_byte"] for c in cells], "s--", color="#8c8c8c",
           label="bytes over the regional link per image byte")
    b.axhline(1.05, color="#b0413e", lw=1, ls=":", label="target 1.05")
    b.set_xlabel("N")
    b.set_xticks(ns)
    b.set_ylim(0, max(1.5, max(c["regional_reads_per_unique_chunk"] for c in cells) * 1.15))
    b.grid(alpha=0.3)
    b.legend(fontsize=8, loc="lower right")
    b.set_title("requests coalesced at the zonal cache", fontsize=10)
    fig.tight_layout()
    path = out / "fanout.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def tiers(results: dict, out: pathlib.Path) -> pathlib.Path:
    plt = _plt()
    t = results["tiers"]
    labels = [k for k in TIER_LABELS if k in t]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    ys = range(len(labels))
    a.barh([y + 0.2 for y in ys], [t[k]["p50_ms"] for k in labels], 0.4, label="p50", color="#2f6db5")
    a.barh([y - 0.2 for y in ys], [t[k]["p99_ms"] for k in labels], 0.4, label="p99", color="#b0413e")
    a.set_xscale("log")
    a.set_yticks(list(ys), [TIER_LABELS[k] for k in labels], fontsize=8)
    a.set_xlabel("ms per chunk fetch (log scale)")
    a.legend(fontsize=8)
    a.grid(axis="x", alpha=0.3)
    b.barh(list(ys), [t[k]["throughput_mb_s"] for k in labels], 0.6, color="#55a868")
    b.set_yticks(list(ys), ["" for _ in labels])
    b.set_xlabel("MB/s, 16 fetches in flight")
    b.grid(axis="x", alpha=0.3)
    fig.suptitle(f"Chunk fetch per tier ({t['sample_chunks']} chunks of the {t['image']} image)", fontsize=10)
    fig.tight_layout()
    path = out / "tiers.png"
    fig.savefig(path)
    plt.close(fig)
    return path


TIER_LABELS = {
    "node_memory_hit": "node memory hit",
    "node_disk_hit_page_cache_hot": "node disk hit (page cache hot)",
    "node_disk_hit_page_cache_dropped": "node disk hit (page cache dropped)",
    "zonal_hit": "zonal hit (Redis)",
    "regional_direct": "regional hit (no link)",
    "regional_via_default_link": "regional hit (default link)",
}


def baselines(results: dict, out: pathlib.Path) -> pathlib.Path:
    """Horizontal stacked bars per image: each path's median time to get the image ready and to run to first
    output; beside them, the fan-out's median start of each path."""
    plt = _plt()
    b = results["baselines"]
    images = list(b["by_image"])
    fo = b.get("fanout", {}).get("by_path", {})
    panels = len(images) + (1 if fo else 0)
    rows = max(len(c) for c in b["by_image"].values())
    fig, axes = plt.subplots(1, panels, figsize=(7 * panels, 0.45 * rows + 1.8), dpi=110, squeeze=False)
    link = b["link"]
    for a, label in zip(axes[0], images):
        cells = b["by_image"][label]
        keys = list(cells)
        ys = list(range(len(keys)))[::-1]
        ready = [cells[k].get("pull_s_median", 0.0) for k in keys]
        rest = [cells[k]["median"] - r for k, r in zip(keys, ready)]
        colors = ["#2f6db5" if k.startswith("imagestream") else "#8c8c8c" for k in keys]
        a.barh(ys, ready, 0.6, color="#d9d9d9", label="get the image ready (pull)")
        a.barh(ys, rest, 0.6, left=ready, color=colors, label="run to first output")
        for y, k in zip(ys, keys):
            a.text(cells[k]["median"], y, f" {cells[k]['median']:.2f} s", va="center", fontsize=8)
        a.set_yticks(ys, [b["labels"][k] if label == images[0] else k for k in keys], fontsize=8)
        a.set_xlabel("seconds from the pull to first output (median)")
        a.set_xlim(0, max(c["median"] for c in cells.values()) * 1.25)
        a.legend(fontsize=8, loc="lower right")
        a.grid(axis="x", alpha=0.3)
        runs = b["images"][label]["runs"]
        a.set_title(f"Cold start, {label} image, link {link['rate_mbit']:g} Mbit/s {link['rtt_ms']:g} ms RTT "
                    f"(median of {runs})", fontsize=9.5)
    if fo:
        f = axes[0][-1]
        fk = list(fo)
        fy = list(range(len(fk)))[::-1]
        f.barh(fy, [fo[k]["start_median_s"] for k in fk], 0.6,
               color=["#2f6db5" if k.startswith("imagestream") else "#8c8c8c" for k in fk])
        for y, k in zip(fy, fk):
            f.text(fo[k]["start_median_s"], y, f" {fo[k]['start_median_s']:.2f} s", va="center", fontsize=8)
        f.set_yticks(fy, [k for k in fk], fontsize=8)
        f.set_xlim(0, max(c["start_median_s"] for c in fo.values()) * 1.25)
        f.set_xlabel("median start to first output")
        f.set_title(f"{b['fanout']['n']} cold nodes at once, one link ({b['fanout'].get('image', 'base')} image)",
                    fontsize=9.5)
        f.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path = out / "baselines.png"
    fig.savefig(path)
    plt.close(fig)
    return path
