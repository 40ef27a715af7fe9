"""drops.py: DropCounts counts each dropped pair once, keeps the first row of each reason, reads as the mapping
reason → count, goes into a prepared set's prepared.json and back unchanged, and says it all in the data report
(worked by hand)."""
from orpo.data.drops import DropCounts, format_drop_report


def test_counting_keeps_the_first_row_and_detail_of_each_reason():
    drops = DropCounts()
    drops.count("too long", 4)
    drops.count("chat template error", 2, "roles must alternate")
    drops.count("chat template error", 7, "another problem")
    drops.count("chat template error", 1)  # met later (a shuffled stream): not the first
    assert drops == DropCounts({"too long": 1, "chat template error": 3}, {"too long": 4, "chat template error": 2},
                               {"too long": "", "chat template error": "roles must alternate"})
    # the mapping reason → count, in the order reasons were first met
    assert list(drops) == ["too long", "chat template error"] and dict(drops) == {"too long": 1, "chat template error": 3}
    assert (drops.total, len(drops), drops.get("tie", 0), "too long" in drops, "tie" in drops) == (4, 2, 0, True, False)
    assert not DropCounts()


def test_the_report_worked_by_hand():
    """5 dropped of 1000: one reason → one line; several → one indented line each, most frequent first, with
    the first row and, where known, its problem."""
    one = DropCounts({"chosen == rejected": 5}, {"chosen == rejected": 17}, {"chosen == rejected": ""})
    assert one.report(1000, 995) == "kept 995 of 1000 pairs; dropped 5: chosen == rejected 5 (first at row 17)"
    assert DropCounts().report(3, 3) == "kept 3 of 3 pairs"
    several = DropCounts({"too long": 1, "chat template error": 3}, {"too long": 4, "chat template error": 2},
                         {"too long": "", "chat template error": "roles must alternate"})
    assert several.report(10, 6) == ("kept 6 of 10 pairs; dropped 4:\n"
                                     "  chat template error 3 (first at row 2: roles must alternate)\n"
                                     "  too long 1 (first at row 4)")


def test_format_drop_report_is_the_report_of_its_counts():
    assert format_drop_report(10, 6, {"too long": 1, "chat template error": 3}, {"too long": 4, "chat template error": 2},
                              {"chat template error": "roles must alternate"}) == (
        "kept 6 of 10 pairs; dropped 4:\n"
        "  chat template error 3 (first at row 2: roles must alternate)\n"
        "  too long 1 (first at row 4)")
    assert format_drop_report(3, 3, {}, {}) == "kept 3 of 3 pairs"


def test_prepared_json_holds_it_and_gives_it_back():
    import json

    drops = DropCounts({"tie": 2}, {"tie": 5}, {"tie": "label=2 → tie"})
    meta = json.loads(json.dumps({"rows": 9, **drops.to_meta()}))  # as prepared.json holds it
    assert meta == {"rows": 9, "drops": {"tie": 2}, "first_rows": {"tie": 5}, "first_details": {"tie": "label=2 → tie"}}
    assert DropCounts.from_meta(meta) == drops
