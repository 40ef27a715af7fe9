"""drops.py: DropCounts counts each dropped pair and skipped line once, keeps the first of each, reads as the
mapping reason → count, goes into a prepared set's prepared.json and back unchanged, and says it all in the
data report (worked by hand)."""
from orpo.data.drops import DropCounts, format_drop_report


def test_counting_keeps_the_first_row_and_detail_of_each_reason_and_the_first_skipped_line():
    drops = DropCounts()
    drops.count("too long", 4)
    drops.count("chat template error", 2, "roles must alternate")
    drops.count("chat template error", 7, "another problem")
    drops.count("chat template error", 1)  # met later (a shuffled stream): not the first
    drops.skip_line(3, "invalid JSON (Expecting value at column 1)")
    drops.skip_line(9, "not UTF-8 text (byte 0xff at column 2)")
    assert drops == DropCounts({"too long": 1, "chat template error": 3}, {"too long": 4, "chat template error": 2},
                               {"too long": "", "chat template error": "roles must alternate"}, 2, 3,
                               "invalid JSON (Expecting value at column 1)")
    # the mapping reason → count, in the order reasons were first met; skipped lines are not pairs
    assert list(drops) == ["too long", "chat template error"] and dict(drops) == {"too long": 1, "chat template error": 3}
    assert (drops.total, len(drops), drops.get("tie", 0), "too long" in drops, "tie" in drops) == (4, 2, 0, True, False)
    assert not DropCounts() and drops.skipped_text() == (
        "skipped 2 bad lines (first: line 3: invalid JSON (Expecting value at column 1))")


def test_the_report_worked_by_hand():
    """5 dropped of 1000: one reason → one line; several → one indented line each, most frequent first, with
    the first row and, where known, its problem; skipped lines and what the columns say come first."""
    one = DropCounts({"chosen == rejected": 5}, {"chosen == rejected": 17}, {"chosen == rejected": ""})
    assert one.report(1000, 995) == "kept 995 of 1000 pairs; dropped 5: chosen == rejected 5 (first at row 17)"
    assert DropCounts().report(3, 3) == "kept 3 of 3 pairs"
    several = DropCounts({"too long": 1, "chat template error": 3}, {"too long": 4, "chat template error": 2},
                         {"too long": "", "chat template error": "roles must alternate"})
    assert several.report(10, 6) == ("kept 6 of 10 pairs; dropped 4:\n"
                                     "  chat template error 3 (first at row 2: roles must alternate)\n"
                                     "  too long 1 (first at row 4)")
    several.skip_line(12, "invalid JSON (Expecting value at column 1)")
    assert several.report(10, 6, "columns not read: id") == (
        "kept 6 of 10 pairs; skipped 1 bad line (first: line 12: invalid JSON (Expecting value at column 1)); "
        "columns not read: id; dropped 4:\n"
        "  chat template error 3 (first at row 2: roles must alternate)\n"
        "  too long 1 (first at row 4)")
    skipped = DropCounts(skipped_lines=1, first_skipped_line=3, first_skipped_problem="a JSON array where an object "
                                                                                      "was expected")
    assert skipped.report(4, 4) == ("kept 4 of 4 pairs; skipped 1 bad line (first: line 3: a JSON array where an "
                                    "object was expected)")


def test_format_drop_report_is_the_report_of_its_counts():
    assert format_drop_report(10, 6, {"too long": 1, "chat template error": 3}, {"too long": 4, "chat template error": 2},
                              {"chat template error": "roles must alternate"}) == (
        "kept 6 of 10 pairs; dropped 4:\n"
        "  chat template error 3 (first at row 2: roles must alternate)\n"
        "  too long 1 (first at row 4)")
    assert format_drop_report(3, 3, {}, {}) == "kept 3 of 3 pairs"


def test_prepared_json_holds_it_and_gives_it_back():
    import json

    drops = DropCounts({"tie": 2}, {"tie": 5}, {"tie": "label=2 → tie"}, 1, 7, "not UTF-8 text (byte 0xff at column 1)")
    meta = json.loads(json.dumps({"rows": 9, **drops.to_meta()}))  # as prepared.json holds it
    assert meta == {"rows": 9, "drops": {"tie": 2}, "first_rows": {"tie": 5}, "first_details": {"tie": "label=2 → tie"},
                    "skipped_lines": 1, "first_skipped_line": 7,
                    "first_skipped_problem": "not UTF-8 text (byte 0xff at column 1)"}
    assert DropCounts.from_meta(meta) == drops
    # a set prepared before skipped lines were recorded
    older = {"rows": 9, "drops": {"tie": 2}, "first_rows": {"tie": 5}, "first_details": {"tie": ""}}
    assert DropCounts.from_meta(older) == DropCounts({"tie": 2}, {"tie": 5}, {"tie": ""})
