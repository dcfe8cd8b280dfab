"""The harness's figure (needs matplotlib): peak memory and step time against accum_steps, as a PNG.

Left, the memory sweep: peak memory per rank against k for the virtual batch micro x k (distaccum, solid line)
and the real batch micro x k in one pass (dashed), one colour per model. Right: each method's median step time
against k (one colour per method, one line style per model), the bar spanning the rounds' interquartile range.
Both x axes are logarithmic (k doubles from point to point in the usual sweeps), the time axis too.

Example::

    # writes bench.png next to bench.json
    python -m examples.bench.harness --size tiny --models mlp --accum-steps 1 4 --memory-sweep 1 4 --json bench.json
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

_LINE_STYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "D")


def require_matplotlib() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend.

    Raises:
        ImportError: matplotlib is missing (the message names the pip command).
    """
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ImportError as error:
        raise ImportError(
            "the bench harness needs matplotlib for its PNG (--plot); install it with: pip install 'distaccum[bench]'"
        ) from error
    matplotlib.use("Agg")  # files only: never open a window, works without a display
    return importlib.import_module("matplotlib.pyplot")


def _log_k_axis(axes: Any, ks: list[int]) -> None:
    axes.set_xscale("log", base=2)
    if ks:
        axes.set_xticks(ks, labels=[str(k) for k in ks])
    axes.minorticks_off()
    axes.set_xlabel("accum_steps k (micro-batches per optimizer step)")
    axes.grid(True, which="major", alpha=0.3)


def _rows_from_cases(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Sweep-shaped rows from the per-method peaks of the timed cases: distaccum (virtual) and the real batch."""
    rows = []
    for case in results["cases"]:
        methods = case["methods"]
        virtual, real = (methods.get(name, {}).get("peak_mib") for name in ("distaccum", "real_batch"))
        if virtual is not None or real is not None:
            rows.append(
                {
                    **{key: case[key] for key in ("model", "micro_batch_size", "accum_steps")},
                    "virtual_peak_mib": virtual,
                    "real_peak_mib": real,
                }
            )
    return rows


def _memory_panel(axes: Any, results: dict[str, Any], device: str) -> None:
    # Without a sweep, the per-method peaks of the timed cases (measured in fresh processes all the same).
    rows = results["memory_sweep"] or _rows_from_cases(results)
    models = list(dict.fromkeys(row["model"] for row in rows))
    for index, model in enumerate(models):
        mine = [row for row in rows if row["model"] == model]
        micro = mine[0]["micro_batch_size"]
        for key, style, what in (("virtual_peak_mib", "-", "virtual"), ("real_peak_mib", "--", "real")):
            points = [(row["accum_steps"], row[key]) for row in mine if row[key] is not None]
            if points:
                label = f"{model}: {what} batch {micro} x k"
                axes.plot(*zip(*points, strict=True), style, marker="o", color=f"C{index}", label=label)
    _log_k_axis(axes, sorted({row["accum_steps"] for row in rows}))
    axes.set_ylabel(f"peak {'CUDA' if device == 'cuda' else 'RSS'} MiB per rank (fresh processes)")
    axes.set_title("memory: virtual batch (distaccum) vs real batch")
    if rows:
        axes.legend(fontsize="small")
    else:
        axes.text(0.5, 0.5, "no memory sweep (--memory-sweep K ...)", ha="center", transform=axes.transAxes)


def _time_panel(axes: Any, results: dict[str, Any], line: Any) -> None:
    cases = results["cases"]
    models = list(dict.fromkeys(case["model"] for case in cases))
    names = list(dict.fromkeys(name for case in cases for name in case["methods"]))
    labels = {name: entry["label"] for case in cases for name, entry in case["methods"].items()}
    colours = {name: f"C{index}" if index < 10 else "black" for index, name in enumerate(names)}
    for model_index, model in enumerate(models):
        mine = sorted((case for case in cases if case["model"] == model), key=lambda case: case["accum_steps"])
        for name in names:
            entries = [(case["accum_steps"], case["methods"][name]) for case in mine if name in case["methods"]]
            if not entries:
                continue
            ks = [k for k, _ in entries]
            medians = [entry["median_s"] for _, entry in entries]
            below = [entry["median_s"] - entry["p25_s"] for _, entry in entries]
            above = [entry["p75_s"] - entry["median_s"] for _, entry in entries]
            axes.errorbar(
                ks,
                medians,
                yerr=[below, above],
                color=colours[name],
                linestyle=_LINE_STYLES[model_index % len(_LINE_STYLES)],
                marker=_MARKERS[model_index % len(_MARKERS)],
                markersize=4,
                capsize=2,
                linewidth=1.2,
            )
    _log_k_axis(axes, sorted({case["accum_steps"] for case in cases}))
    axes.set_yscale("log")
    axes.set_ylabel("median seconds per optimizer step (slowest rank)")
    axes.set_title("step time per method")
    handles = [line([], [], color=colours[name], label=labels[name]) for name in names]
    handles += [
        line([], [], color="grey", linestyle=_LINE_STYLES[i % 4], marker=_MARKERS[i % 4], label=f"model {model}")
        for i, model in enumerate(models)
    ]
    axes.legend(handles=handles, fontsize="x-small", loc="upper left", bbox_to_anchor=(1.02, 1.0))


def plot_results(results: dict[str, Any], path: str | Path) -> Path:
    """Write the two-panel PNG of a bench run (what ``--json`` writes) to ``path``.

    Args:
        results: :func:`examples.bench.harness.run_benchmark`'s figures (or the JSON read back).
        path: where the PNG goes; its folder is created.

    Returns:
        ``path``.

    Raises:
        ImportError: matplotlib is missing (the message names the pip command).
    """
    pyplot = require_matplotlib()
    line = importlib.import_module("matplotlib.lines").Line2D  # legend entries: one per method, one per model
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    figure, (memory_axes, time_axes) = pyplot.subplots(1, 2, figsize=(15, 5.5), dpi=110)
    try:
        env, config = results["environment"], results["config"]
        _memory_panel(memory_axes, results, env.get("device", "cpu"))
        _time_panel(time_axes, results, line)
        figure.suptitle(
            f"bench harness: {config['nproc']} ranks ({env.get('backend')}, {env.get('threads_per_rank')} "
            f"thread(s)/rank), torch {env.get('torch')}; {config['rounds']} timed rounds",
            fontsize="medium",
        )
        figure.tight_layout()
        figure.savefig(target, bbox_inches="tight")
    finally:
        pyplot.close(figure)
    return target
