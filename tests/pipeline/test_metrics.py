from pipeline.metrics import outcome_counts, reason_label, record_outcomes


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


def test_reason_labels_are_ascii_and_do_not_multiply_with_image_sizes():
    # Ray's metrics reject non-ASCII tag values, and each value is a time series.
    first = reason_label("decode: image is 20000×300; a side exceeds decode.max_side_px=16384")
    second = reason_label("decode: image is 300×17000; a side exceeds decode.max_side_px=16384")
    assert first == second == "decode: image is NxN; a side exceeds decode.max_side_px=N"
    assert reason_label("read: café.jpg: FileNotFoundError") == "read: caf.jpg"
    assert len(reason_label("decode: " + "x" * 500)) == 80


def test_a_failure_to_record_is_logged_and_does_not_fail_the_batch(caplog):
    record_outcomes(["ok"], [None, "two errors for one status"])  # zip(strict) raises inside
    assert "could not record metric in record_outcomes" in caplog.text


def test_reason_groups_do_not_multiply_with_the_ids_or_addresses_they_name():
    # Each distinct group is a line of the summary and a metric's time series.
    repeats = [
        f"read: id {name!r} (column 'id') repeats row {row}'s"
        for name, row in [("a7", 3), ("zz", 40)]
    ]
    repeats += ["read: id 'b:9' (column 'id') repeats row 12's"]
    assert {reason_label(reason) for reason in repeats} == {
        "read: id '...' (column '...') repeats row N's"
    }
    # Apostrophes are not quotes: the group keeps its two fields.
    assert reason_label("decode: image's header says 12×34: PIL can't read it") == (
        "decode: image's header says NxN"
    )
    assert reason_label("read: shard's member 'a/002' has no image: it's empty") == (
        "read: shard's member '...' has no image"
    )
    no_image = "read: sample has no image member (extensions found: json, txt)"
    assert reason_label(no_image) == "read: sample has no image member"
    unreadable = "decode: cannot identify image file <_io.BytesIO object at 0x7f3a2b19c0>"
    assert (
        reason_label(unreadable) == "decode: cannot identify image file <_io.BytesIO object at N>"
    )
