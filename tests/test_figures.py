"""Figure layout, checked on the drawn canvas by bounding boxes: titles that do not collide, tick
labels that do not overlap, a legend clear of the line it explains, methods with equal values all
visible, budgets labelled as asked, and a score of 0 that looks different from "not run".

Tables are small hand-made frames in the shape of the real ones (layout does not depend on values
beyond their ranges); every figure is drawn inside kvdiag's style, as the commands draw them."""

from __future__ import annotations

import itertools

import matplotlib
import numpy as np
import pandas as pd
import pytest

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from kvdiag.plots import style  # noqa: E402


@pytest.fixture(autouse=True)
def kvdiag_style():
    with style():
        yield
    plt.close("all")


def drawn(fig):
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def extent(artist, renderer):
    return artist.get_window_extent(renderer)


def overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def check_suptitle_clear_of_titles(fig):
    renderer = drawn(fig)
    top = extent(fig._suptitle, renderer)
    titles = [ax.title for ax in fig.axes if ax.get_title()]
    assert titles, "no panel titles to check"
    for title in titles:
        assert not overlap(top, extent(title, renderer)), (
            f"suptitle overlaps panel title {title.get_text()!r}"
        )


def check_tick_labels_apart(fig):
    renderer = drawn(fig)
    for ax in fig.axes:
        labels = [
            t
            for minor in (False, True)
            for t in ax.get_xticklabels(minor=minor)
            if t.get_text() and t.get_visible()
        ]
        for a, b in itertools.combinations(labels, 2):
            assert not overlap(extent(a, renderer), extent(b, renderer)), (a.get_text(), b.get_text())


# --- spectrum ---------------------------------------------------------------------------------------


def summary_table(n_layers: int, n_heads: int) -> pd.DataFrame:
    rows = [{"layer": layer, "kv_head": h, "stage": stage, "rank95": 5 + layer + h}
            for layer in range(n_layers) for h in range(-1, n_heads) for stage in ("pre_rope", "post_rope")]  # fmt: skip
    return pd.DataFrame(rows)


def damage_table(n_layers: int = 4) -> pd.DataFrame:
    fractions = [1 / 128, 1 / 32, 0.15625, 0.5, 1.0]
    rows = [{"layer": layer, "kv_head": h, "rank_fraction": f, "is_shadowkv_rank": f == 0.15625,
             "topk_recall": f ** 0.2, "logit_rel_error": 1 - f, "output_rel_error": (1 - f) * (1 + layer)}
            for layer in range(n_layers) for h in range(2) for f in fractions]  # fmt: skip
    return pd.DataFrame(rows)


@pytest.mark.parametrize("n_layers", [1, 4, 30])
def test_rank_heatmap_suptitle_clear_of_panel_titles(n_layers):
    from kvdiag.plots.spectrum import rank_heatmap

    check_suptitle_clear_of_titles(rank_heatmap(summary_table(n_layers, 2), 95, "tiny-llama, 1996 tokens"))


def test_lowrank_damage_suptitle_clear_and_per_layer_lines_in_the_legend():
    from kvdiag.plots.spectrum import lowrank_damage_plot

    fig = lowrank_damage_plot(damage_table(), "qwen2.5-coder-0.5b, 1198 tokens")
    check_suptitle_clear_of_titles(fig)
    labels = [t.get_text() for legend in [*fig.legends, *(ax.get_legend() for ax in fig.axes)] if legend
              for t in legend.get_texts()]  # fmt: skip
    assert any("one layer" in label for label in labels), labels
    grey = [line for line in fig.axes[0].lines if line.get_color() == "0.6"]
    assert grey and grey[0].get_label().startswith("one layer")


# --- recall -----------------------------------------------------------------------------------------


def recall_rows(bytes_per_method: dict[str, float], fractions=(0.015625, 0.03125)) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for method, nbytes in bytes_per_method.items():
        for f in fractions:
            err_sel, err_key = (
                rng.uniform(0.05, 0.2),
                (0.0 if method in ("oracle", "quest") else rng.uniform(0, 0.1)),
            )
            rows.append({"method": method, "budget": f, "budget_fraction": f, "layer": 0, "kv_head": 0,
                         "recall": rng.uniform(), "attention_mass": rng.uniform(0.5, 0.9), "err_selection": err_sel,
                         "err_key": err_key, "err_total": err_sel + err_key, "err_oracle": 0.114,
                         "resident_bytes_per_token": nbytes})  # fmt: skip
    return pd.DataFrame(rows)


@pytest.mark.parametrize(
    "bytes_per_method",
    [{"yakv": 200.0, "shadowkv": 283.0, "oracle": 400.0},  # within one decade: labels "400425" before
     {"streaming": 12.4, "yakv": 58.9, "arkvale": 79.7, "shadowkv": 92.4, "oracle": 256.0, "lrqk": 681.0}],
)  # fmt: skip
def test_accuracy_vs_bytes_tick_labels_do_not_overlap(bytes_per_method):
    from kvdiag.plots.recall import accuracy_vs_bytes

    fig = accuracy_vs_bytes(recall_rows(bytes_per_method), "smollm2-135m, L0 = 1484 tokens")
    check_tick_labels_apart(fig)
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels() if t.get_text()]
    assert len(labels) >= 2, labels  # still labelled


def test_error_vs_attended_puts_methods_at_their_attended_tokens_beside_the_oracle_of_that_size():
    from kvdiag.plots.recall import error_vs_attended

    # the case: at 3.125 % of 960 tokens (30) ShadowKV attends 440 tokens, the oracle 30
    attended = {
        ("oracle", 0.03125): 30,
        ("shadowkv", 0.03125): 440,
        ("oracle", 0.0625): 60,
        ("shadowkv", 0.0625): 470,
    }
    rows = [{"method": m, "budget_fraction": f, "layer": 0, "kv_head": h, "n_queries": 4,
             "attended_tokens": a + h,  # per KV head: the figure shows the mean
             "err_total": 0.3 if m == "oracle" else 0.2, "err_oracle": 0.3 if m == "oracle" else 0.05,
             "attention_mass": 0.8} for (m, f), a in attended.items() for h in (0, 2)]  # fmt: skip
    fig = error_vs_attended(pd.DataFrame(rows), "smollm2-135m, L0 = 960 tokens")
    check_suptitle_clear_of_titles(fig)
    check_tick_labels_apart(fig)
    solid = {line.get_label(): line for line in fig.axes[0].lines if line.get_linestyle() == "-"}
    assert list(solid["shadowkv"].get_xdata()) == [441, 471] and list(solid["oracle"].get_xdata()) == [31, 61]
    dotted = [line for line in fig.axes[0].lines if line.get_linestyle() == ":"]
    assert len(dotted) == 1  # shadowkv's twin; the oracle is its own
    assert list(dotted[0].get_xdata()) == [441, 471] and list(dotted[0].get_ydata()) == [0.05, 0.05]
    assert dotted[0].get_color() == solid["shadowkv"].get_color()


@pytest.mark.parametrize("floor", [0.114, 0.25, 0.3])
def test_error_decomposition_legend_clear_of_the_floor_line(floor):
    from kvdiag.plots.recall import error_decomposition

    methods = {
        m: 100.0 for m in ("shadowkv", "arkvale", "lrqk", "infinigen", "yakv", "yakv:center=True", "oracle")
    }
    table = recall_rows(methods, (0.03125,)).assign(
        err_oracle=floor
    )  # bars 0.05-0.3: a high floor met the legend
    fig = error_decomposition(table, 0.03125, "qwen2.5-coder-0.5b, L0 = 1166 tokens")
    renderer = drawn(fig)
    ax = fig.axes[0]
    (line,) = [line for line in ax.lines if line.get_linestyle() == "--"]
    path = line.get_transform().transform(np.column_stack([line.get_xdata(), line.get_ydata()]))
    y = path[0, 1]
    box = extent(ax.get_legend(), renderer)
    x0, x1 = ax.get_window_extent(renderer).x0, ax.get_window_extent(renderer).x1  # the line spans the axes
    assert not (box.y0 <= y <= box.y1 and box.x0 < x1 and x0 < box.x1), (
        "the dashed floor runs through the legend"
    )


# --- eval -------------------------------------------------------------------------------------------


def score_summary() -> pd.DataFrame:
    """A `score_table`: oracle and yakv score the same everywhere; the prompt has 550 tokens, so 6.25 %
    realises 35 tokens = 6.36 % and a 64-token budget is 11.6 %."""
    rows = [{"method": "exact", "budget": 1.0, "n": 2, "score_mean": 60.0, "score_stderr": 10.0,
             "budget_tokens": 550, "budget_fraction": 1.0, "resident_bytes_per_token": 512.0,
             "kl_mean": 0.0, "top1_agree": 1.0}]  # fmt: skip
    for method, nbytes in (("oracle", 256.0), ("yakv", 58.9), ("shadowkv", 92.4)):
        for budget, tokens in ((0.0625, 35), (0.125, 69), (64.0, 64)):
            score = 40.0 if method != "shadowkv" else 10.0
            rows.append({"method": method, "budget": budget, "n": 2, "score_mean": score, "score_stderr": 5.0,
                         "budget_tokens": tokens, "budget_fraction": tokens / 550,
                         "resident_bytes_per_token": nbytes, "kl_mean": 0.1, "top1_agree": 0.9})  # fmt: skip
    return pd.DataFrame(rows)


def test_score_vs_budget_labels_budgets_as_asked_and_shows_every_method():
    from kvdiag.plots.eval import score_vs_budget

    fig = score_vs_budget(score_summary(), "qwen2.5-coder-0.5b on text2json, n = 2", "text2json_iou (0-100)")
    renderer = drawn(fig)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert labels == ["6.25 %", "12.5 %"], labels  # not the realised "6.36 %"
    assert [t.get_text() for t in ax.get_xticklabels(minor=True) if t.get_text()] == ["64 tokens"]
    check_tick_labels_apart(fig)
    # oracle and yakv have equal scores: their markers must not sit on top of each other
    centres = {}
    for container in ax.containers:  # one errorbar container per method, labelled with it
        if container.get_label() in ("oracle", "yakv"):
            line = container.lines[0]
            xy = line.get_transform().transform(
                np.column_stack([line.get_xdata(), line.get_ydata()]).astype(float)
            )
            centres[container.get_label()] = xy
    assert set(centres) == {"oracle", "yakv"}
    assert np.all(np.abs(centres["oracle"][:, 0] - centres["yakv"][:, 0]) >= 3), "markers hide each other"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "exact ± stderr" in legend and "exact" in legend  # the grey band is explained
    box = extent(ax.get_legend(), renderer)
    assert box.x0 >= ax.get_window_extent(renderer).x1  # outside the data


def test_score_vs_bytes_and_fidelity_tick_labels_do_not_overlap():
    from kvdiag.plots.eval import fidelity_vs_budget, score_vs_bytes

    check_tick_labels_apart(score_vs_bytes(score_summary(), "t", "score"))
    fig = fidelity_vs_budget(score_summary(), "t")
    check_tick_labels_apart(fig)
    check_suptitle_clear_of_titles(fig)


def test_study_scores_marks_a_zero_score_unlike_a_configuration_not_run():
    from kvdiag.plots.eval import study_scores

    def table(rows):
        return pd.DataFrame(rows, columns=["method", "budget", "score_mean", "score_stderr"])

    roles = {
        task: {"shadowkv": ("shadowkv", 0.015625), "yakv": ("yakv", 0.03125)}
        for task in ("text2json", "needle")
    }
    scores = {"text2json": table([["exact", 1.0, 46.9, 9.4], ["shadowkv", 0.015625, 0.0, 0.0], ["yakv", 0.03125, 32.0, 20.0]]),
              "needle": table([["exact", 1.0, 100.0, 0.0], ["shadowkv", 0.015625, 50.0, 50.0]])}  # fmt: skip
    fig = study_scores(scores, roles, "qwen2.5-coder-0.5b: the study's configurations")
    renderer = drawn(fig)
    ax = fig.axes[0]
    width = 0.8 / 3
    zero_x, missing_x = 0 + 0 * width, 1 + 1 * width  # shadowkv on text2json; yakv on needle (not run)
    zeros = [t for t in ax.texts if t.get_text() == "0"]
    assert len(zeros) == 1 and zeros[0].get_position()[0] == pytest.approx(zero_x)
    marks = [
        line for line in ax.lines if np.allclose(line.get_ydata(), 0) and line.get_marker() in ("None", "")
    ]
    assert len(marks) == 1 and min(marks[0].get_xdata()) < zero_x < max(marks[0].get_xdata())
    assert extent(marks[0], renderer).width > 5 and marks[0].get_linewidth() >= 2  # visibly drawn
    crosses = [line for line in ax.lines if line.get_marker() == "x" and len(line.get_xdata()) == 1]
    assert len(crosses) == 1 and crosses[0].get_xdata()[0] == pytest.approx(missing_x)
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "not run" in legend and any(label.startswith("score 0") for label in legend)
    assert "shadowkv @ 1.5625 %" in legend  # the budget as asked, not rounded to "1.562"
