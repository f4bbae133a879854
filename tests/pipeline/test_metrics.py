from pipeline.metrics import outcome_counts


def test_outcomes_are_counted_by_status_and_reason_group():
    counts = outcome_counts(
        ["ok", "error", "ok", "error", "error"],
        [
            None,
            "decode: truncated or corrupt image data: image 7.jpg",
            "",
            "decode: truncated or corrupt image data: image 9.jpg",
            "read: FileNotFoundError: s3://bucket/a.jpg",
        ],
    )
    assert counts == {
        ("ok", ""): 2,
        ("error", "decode: truncated or corrupt image data"): 2,
        ("error", "read: FileNotFoundError"): 1,
    }


def test_an_error_row_without_a_reason_still_counts():
    assert outcome_counts(["error"], [None]) == {("error", ""): 1}
