"""The hippocampus benchmark's bookkeeping: which marks (c)'s members make and what each table cell shows."""

import importlib.util

from pipeline import project_root

spec = importlib.util.spec_from_file_location("bench_hippocampus", project_root() / "bench" / "hippocampus.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_members_make_the_marks_their_minutes_reach_even_where_floating_point_misses_them():
    assert 0.3 * 1 / 3 != 0.1  # why the match is not ==
    assert [bench.member_mark(0.3, j, 3, [0.1, 0.2, 0.3]) for j in (1, 2, 3)] == [0.1, 0.2, 0.3]
    assert [bench.member_mark(80.0, j, 4, [5, 10, 20, 40, 80]) for j in (1, 2, 3, 4)] == [20, 40, None, 80]


def test_cells_show_the_score_taken_for_each_mark():
    by_mark = {"c": {20.0: (20.4, 0.8919, 0.90, 0.88), 80.0: (80.2, 0.8917, 0.90, 0.88)}}
    cells = [bench.cell("c", None, m, 80.0, by_mark) for m in (5.0, 20.0, 40.0, 80.0)]
    assert cells == ["-", "0.892", "-", "0.892"]
    points = [(4.9, 0.80, 0.0, 0.0), (10.2, 0.86, 0.0, 0.0), (19.8, 0.87, 0.0, 0.0)]  # (a): scored as it passed
    assert [bench.cell("a", points, m, 20.0, by_mark) for m in (5.0, 10.0, 20.0)] == ["0.860", "0.860", "0.870"]
    assert bench.minutes_to(points) == 10.2
