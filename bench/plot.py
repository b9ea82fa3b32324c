"""``python -m bench --plot FILE``: bus bandwidth against size, log-log, one panel per op and one
line per backend and place, from the aggregated rows of bench.report (matplotlib, Agg backend).
"""
from __future__ import annotations

from . import ops
from .cli import human_size


def plot(rows: list[dict], args, path: str, command: str = "") -> None:
    """busbw against size (log-log), one panel per op, one line per backend and place."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullLocator

    names = list(dict.fromkeys(r["op"] for r in rows))
    ncols = 1 if len(names) == 1 else 2
    nrows = -(-len(names) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(8.5 * ncols, 5.2 * nrows), squeeze=False)
    style = {"out": "-", "in": "--"}
    markers = "osD^vP*X"
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    labels = list(dict.fromkeys(r["backend"] for r in rows))
    for ax, name in zip(axes.flat, names):
        places = [p for p in args.places if any(r["op"] == name and r["place"] == p and r["busbw"] for r in rows)]
        for bi, b in enumerate(labels):
            for p in places:
                pts = [(r["bytes"], r["busbw"]) for r in rows
                       if r["op"] == name and r["place"] == p and r["backend"] == b and r["busbw"]]
                if not pts:
                    continue
                xs, ys = zip(*pts)
                lab = b if len(places) == 1 else f"{b} ({ops.PLACE_NAMES[p]})"
                ax.plot(xs, ys, style[p] if len(places) > 1 else "-", marker=markers[bi % len(markers)],
                        markersize=3.5, color=colors[bi % len(colors)], label=lab)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        sizes = sorted({x for line in ax.lines for x in line.get_xdata()})
        if sizes:       # label the measured sizes, at most about 10 of them
            ax.set_xticks(sizes[::max(1, -(-len(sizes) // 10))])
            ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: human_size(int(v)).replace(" ", "")))
        ax.set_xlabel("size (bytes, nccl-tests convention)")
        ax.set_ylabel("busbw (GB/s)")
        where = f"{ops.PLACE_NAMES[places[0]]}, " if len(places) == 1 and name != ops.MOE else ""
        runs = "1 launch" if args.launches == 1 else f"median of {args.launches} launches"
        ax.set_title(f"{name}, {where}{args.dtype}, {args.np} ranks ({runs})")
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no figures", transform=ax.transAxes, ha="center")
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    if command:
        fig.suptitle(command, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
