"""hiercluster.report.figures: the report's drop-vs-bits and Pareto figures show what they promise."""

import doctest
import itertools

import numpy as np
from matplotlib.collections import PathCollection, PolyCollection

import hiercluster.report.figures as report_plots
from hiercluster.report.figures import (
    BAND_ALPHA,
    band_levels,
    drop_vs_bits_figure,
    drop_view,
    log_ticks,
    pareto_figure,
    pareto_frontier,
    plot_drop_vs_bits,
    plot_pareto,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _is_png(path):
    data = path.read_bytes()
    return data.startswith(PNG_SIGNATURE) and len(data) > 1000


# --- drop vs bits, pareto ----------------------------------------------------------------------

FLOAT_ACC = 0.90
FP32_BYTES = 400_000


def _row(level, k, bits, drop, *, plan="full", scheme="asymmetric", method="rtn", clipping="mse", random_mean=None,
         random_std=0.2, fine_drop=None, packed=None):
    """One synthetic result row (the columns the report plots read); drops in pp."""
    random_mean = drop + 0.5 if random_mean is None else random_mean
    fine_drop = drop if fine_drop is None else fine_drop
    key = f"{scheme}-{bits}b-{clipping}+{plan}+{method}"
    return {
        "spec_key": key, "tag": key, "scheme": scheme, "bits": bits, "clipping": clipping,
        "granularity": "per_channel", "plan": plan, "method": method, "bn_reestimate": 0, "activation_bits": None,
        "avg_bits": float(bits), "fp32_bytes": FP32_BYTES,
        "packed_bytes": packed if packed is not None else FP32_BYTES * bits // 32 + (7 if plan != "full" else 0),
        "fine_acc": FLOAT_ACC - fine_drop / 100, "level": level, "k": k,
        "grouping": "reference" if level == "reference" else "learned", "acc_float": 0.95,
        "acc_quant": 0.95 - drop / 100, "drop": drop, "random_drop_mean": random_mean, "random_drop_std": random_std,
        "advantage": random_mean - drop,
    }


def _grid(plans=("full", "first8"), bits=(8, 4, 3, 2), collapse=45.0):
    """Two levels (k=10 fine, k=3) and a reference, drops rising as bits fall, a collapse at 2 bits."""
    drops = {8: 0.0, 6: 0.05, 5: 0.1, 4: 0.3, 3: 0.9, 2: collapse}
    rows = []
    for plan in plans:
        for b in bits:
            rows.append(_row("k=10", 10, b, drops[b] + 0.1, plan=plan, random_mean=drops[b] + 0.1, random_std=0.0))
            rows.append(_row("k=3", 3, b, drops[b], plan=plan))
            rows.append(_row("reference", 3, b, drops[b] + 0.05, plan=plan))
    return rows


def _panels(fig):
    return [ax for ax in fig.axes if ax.get_visible()]


def _by_gid(ax, gid, kind=None):
    artists = [a for a in ax.get_children() if a.get_gid() == gid]
    return [a for a in artists if kind is None or isinstance(a, kind)]


def test_report_plots_docstring_examples():
    assert doctest.testmod(report_plots).failed == 0


def test_drop_vs_bits_has_one_panel_per_plan_titled_by_plan():
    fig = drop_vs_bits_figure(_grid(plans=("full", "first8", "last8")), tolerance=1.0)
    titles = [ax.get_title() for ax in _panels(fig)]
    assert len(titles) == 3
    assert [t.split()[1] for t in titles] == ["full", "first8", "last8"]


def test_drop_axis_shows_the_tolerance_region_and_clips_the_collapse():
    for tolerance in (1.0, 2.0):
        fig = drop_vs_bits_figure(_grid(collapse=45.0), tolerance=tolerance)
        for ax in _panels(fig):
            lo, hi = ax.get_ylim()
            assert lo <= -0.5 and hi >= 3 * tolerance and hi < 45  # the collapse does not set the range
            marks = _by_gid(ax, "off-scale", PathCollection)
            assert len(marks) == 1
            xy = marks[0].get_offsets()
            assert len(xy) == 3 and set(xy[:, 0]) == {2} and np.allclose(xy[:, 1], hi)  # three levels, on the edge
            notes = [t.get_text() for t in _by_gid(ax, "off-scale-note")]
            assert notes == ["3: 45.0–45.1"]  # the true values, not the edge


def test_drop_axis_grows_to_a_modest_outlier_rather_than_clipping_it():
    fig = drop_vs_bits_figure(_grid(plans=("full",), collapse=4.5), tolerance=1.0)
    ax = _panels(fig)[0]
    assert ax.get_ylim()[1] > 4.6 and not _by_gid(ax, "off-scale")


def test_drop_view_keeps_negative_drops_and_has_room_for_zero_tolerance():
    lo, hi = drop_view([-1.2, 0.3], tolerance=0.0)
    assert lo < -1.2 and hi >= 1.0
    lo, hi = drop_view([-80.0, 0.3], tolerance=1.0)  # a chance-level model "gains" 80 pp: clipped below
    assert -1 < lo < -0.5  # the floor stays: -80 is drawn as a marker on the lower edge


def test_each_point_is_the_lowest_drop_spec_and_the_winner_is_ringed():
    rows = [_row("k=3", 3, 4, 0.6, method="rtn"), _row("k=3", 3, 4, 0.2, method="gptq"),
            _row("k=3", 3, 3, 2.5, method="rtn"), _row("k=3", 3, 3, 1.5, method="gptq")]
    ax = _panels(drop_vs_bits_figure(rows, tolerance=1.0))[0]
    (line,) = _by_gid(ax, "level-line")
    assert list(line.get_xdata()) == [3, 4] and list(line.get_ydata()) == [1.5, 0.2]
    (ring,) = _by_gid(ax, "headline-winner")
    assert ring.get_offsets().tolist() == [[4, 0.2]]  # fewest bits within 1 pp: 4 bits, by gptq


def test_random_band_is_visible_and_spans_mean_plus_minus_std():
    rows = [_row("k=3", 3, b, d, random_mean=d + 1.0, random_std=0.25) for b, d in ((4, 0.2), (3, 0.8))]
    ax = _panels(drop_vs_bits_figure(rows, tolerance=1.0))[0]
    (band,) = _by_gid(ax, "random-band", PolyCollection)
    assert band.get_alpha() >= 0.25
    ys = band.get_paths()[0].vertices[:, 1]
    assert np.isclose(ys.min(), 0.2 + 1.0 - 0.25) and np.isclose(ys.max(), 0.8 + 1.0 + 0.25)
    assert BAND_ALPHA >= 0.25


def test_bands_leave_out_the_identity_level_and_thin_out_many_levels():
    few = _grid(plans=("full",))
    assert band_levels(few) == ["k=3", "reference"]  # k=10 (one class per group) equals its random grouping
    many = [_row(f"k={k}", k, 4, 0.5) for k in (9, 8, 7, 6, 5, 2)] + [_row("reference", 4, 4, 0.5)]
    assert band_levels(many) == ["k=2", "reference"]
    ax = _panels(drop_vs_bits_figure(many, tolerance=1.0))[0]
    assert len(_by_gid(ax, "random-band")) == 2


def test_bit_ticks_are_whole_widths_per_panel():
    rows = _grid(plans=("full",), bits=(8, 6, 5, 4, 3, 2)) + _grid(plans=("first8",), bits=(4,))
    fig = drop_vs_bits_figure(rows, tolerance=1.0)
    fig.canvas.draw()
    full, first8 = _panels(fig)
    for ax, bits in ((full, [2, 3, 4, 5, 6, 8]), (first8, [4])):
        lo, hi = sorted(ax.get_xlim())
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert sorted(ticks) == bits and all(float(t).is_integer() for t in ticks)
        assert [t.get_text() for t in ax.get_xticklabels() if t.get_text()] == [str(b) for b in sorted(bits)]
        assert ax.xaxis.get_minor_locator().tick_values(lo, hi) == []


def test_axis_labels_and_legend_stay_inside_the_figure():
    fig = drop_vs_bits_figure(_grid(), tolerance=1.0)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    frame = fig.bbox
    boxes = [ax.yaxis.label.get_window_extent(renderer) for ax in _panels(fig)] + [fig.legends[0].get_window_extent(renderer)]
    for box in boxes:
        assert box.x0 >= frame.x0 and box.x1 <= frame.x1 and box.y0 >= frame.y0 and box.y1 <= frame.y1


def test_drop_and_pareto_pngs_are_written(tmp_path):
    rows = _grid()
    assert _is_png(plot_drop_vs_bits(rows, tmp_path / "a" / "drop_vs_bits.png", tolerance=1.0))
    assert _is_png(plot_pareto(rows, FLOAT_ACC, tmp_path / "b" / "pareto.png", level="k=10", tolerance=1.0))


def _pareto_rows():
    """Fine-level specs of three schemes and two methods, the 2-bit ones collapsed."""
    rows = []
    for (scheme, method), b in itertools.product([("asymmetric", "rtn"), ("symmetric", "rtn"), ("asymmetric", "gptq")],
                                                 (8, 6, 5, 4, 3, 2)):
        drop = {8: 0.0, 6: 0.05, 5: 0.1, 4: 0.3, 3: 1.2, 2: 40.0}[b] * (0.3 if method == "gptq" else 1.0)
        drop += 0.2 if scheme == "symmetric" else 0.0
        rows.append(_row("k=10", 10, b, drop, scheme=scheme, method=method,
                         packed=FP32_BYTES * b // 32 + (900 if scheme == "symmetric" else 0)))
    return rows


def test_pareto_log_axis_has_at_least_three_labelled_ticks():
    for rows in (_pareto_rows(), [r for r in _pareto_rows() if r["bits"] in (4, 3)]):
        fig = pareto_figure(rows, FLOAT_ACC, "k=10", tolerance=1.0)
        ax = fig.axes[0]
        lo, hi = ax.get_xlim()
        assert ax.get_xscale() == "log"
        shown = [t for t in ax.get_xticklabels() if lo <= t.get_position()[0] <= hi and t.get_text()]
        assert len(shown) >= 3


def test_log_ticks_give_three_ticks_in_any_range():
    for lo in (0.5, 3.0, 74.0, 99.0, 870.0):
        for ratio in (1.05, 1.3, 2.0, 15.0, 400.0):
            ticks = log_ticks(lo, lo * ratio)
            assert len(ticks) >= 3 and all(lo <= t <= lo * ratio for t in ticks), (lo, ratio, ticks)


def test_pareto_labels_only_the_frontier_and_labels_do_not_overlap():
    for rows in (_pareto_rows(), _crowded_frontier()):
        fig = pareto_figure(rows, FLOAT_ACC, "k=10", tolerance=1.0)
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        ax = fig.axes[0]
        labels = _by_gid(ax, "frontier-label")
        lo, hi = ax.get_ylim()
        in_view = [r for r in pareto_frontier(rows) if lo <= 100 * r["fine_acc"] <= hi]
        assert len(labels) == len(in_view) >= 3
        boxes = [report_plots.label_box(t, renderer) for t in labels]
        frame = ax.get_window_extent(renderer)
        for a, b in itertools.combinations(boxes, 2):
            assert not a.overlaps(b)
        assert all(frame.x0 <= b.x0 and b.x1 <= frame.x1 and frame.y0 <= b.y0 and b.y1 <= frame.y1 for b in boxes)


def _crowded_frontier():
    """Eight frontier specs a few KB and a few hundredths of a pp apart: labels must spread out."""
    return [_row("k=10", 10, 4, 0.5 - 0.05 * i, scheme=f"scheme{i}", packed=50_000 + 1500 * i) for i in range(8)]


def test_pareto_range_clips_collapsed_specs_to_the_lower_edge_with_a_note():
    rows = _pareto_rows()
    ax = pareto_figure(rows, FLOAT_ACC, "k=10", tolerance=1.0).axes[0]
    lo, hi = ax.get_ylim()
    assert lo > 100 * FLOAT_ACC - 5 and hi >= 100 * FLOAT_ACC  # not stretched to the 2-bit collapse
    (marks,) = _by_gid(ax, "off-scale", PathCollection)
    collapsed = [r for r in rows if 100 * r["fine_acc"] < lo]
    assert len(marks.get_offsets()) == len(collapsed) == 3 and np.allclose(marks.get_offsets()[:, 1], lo)
    (note,) = _by_gid(ax, "off-scale-note")
    assert note.get_text().startswith("3 off scale below")


def test_pareto_without_tolerance_shows_every_spec():
    rows = _pareto_rows()
    ax = pareto_figure(rows, FLOAT_ACC, "k=10").axes[0]
    lo, _ = ax.get_ylim()
    assert lo < min(100 * r["fine_acc"] for r in rows) and not _by_gid(ax, "off-scale")
