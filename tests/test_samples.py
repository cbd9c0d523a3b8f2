from __future__ import annotations

import re

import pandas as pd
import pytest

from simclr_path.errors import SimclrPathError
from simclr_path.samples import is_safe_id, read_samples

HEADER = "slide_id\tpath\tlabel\tpatient_id"


def _sheet(tmp_path, lines, header=HEADER, name="samples.tsv"):
    p = tmp_path / name
    p.write_text("\n".join([header, *lines]) + "\n")
    return p


@pytest.fixture
def slides(tmp_path):
    (tmp_path / "wsi").mkdir()
    for s in ("A", "B", "C"):
        (tmp_path / "wsi" / f"{s}.svs").write_bytes(s.encode())  # one size, not one content
    return tmp_path


def test_read_good_sheet_resolves_relative_paths(slides, tmp_path, monkeypatch):
    sheet = _sheet(tmp_path, ["# a comment", "A\twsi/A.svs\tSCC\tP1", "B\twsi/B.svs\tnormal\tP2"])
    df = read_samples(sheet, labels=["SCC", "normal"])
    assert list(df["slide_id"]) == ["A", "B"] and list(df["label"]) == ["SCC", "normal"]
    assert all(pd.Series(df["path"]).map(lambda p: p.endswith(".svs")))
    # from another working directory the path is found next to the sheet (base_dir fallback)
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)
    df2 = read_samples(sheet)
    assert df2["path"].iloc[0] == str(tmp_path / "wsi" / "A.svs")
    # relative to the current directory first: unchanged string
    monkeypatch.chdir(tmp_path)
    assert read_samples(sheet)["path"].iloc[0] == "wsi/A.svs"


def test_optional_columns(slides, tmp_path):
    sheet = _sheet(
        tmp_path,
        ["A\twsi/A.svs\tSCC\tP1\t0.25\ttrain", "B\twsi/B.svs\tnormal\tP2\t\ttest"],
        header=HEADER + "\tmpp\tsplit",
    )
    df = read_samples(sheet)
    assert df["mpp"].iloc[0] == 0.25 and pd.isna(df["mpp"].iloc[1])
    assert list(df["split"]) == ["train", "test"]


@pytest.mark.parametrize(
    "lines, header, labels, expect",
    [
        (["A\twsi/A.svs\tSCC"], "slide_id\tpath\tlabel", None, "missing column(s) patient_id"),
        (
            ["A\twsi/A.svs\tSCC\tP1", "A\twsi/B.svs\tnormal\tP2"],
            HEADER,
            None,
            "appears more than once",
        ),
        (  # one file on macOS and Windows
            ["S01\twsi/A.svs\tSCC\tP1", "s01\twsi/B.svs\tnormal\tP2"],
            HEADER,
            None,
            "slide_id 'S01' / 's01' appears more than once (rows [1, 2])",
        ),
        (
            ["../A\twsi/A.svs\tSCC\tP1", "B\twsi/B.svs\tnormal\tP2"],
            HEADER,
            None,
            "not a safe file name",
        ),
        (
            ["a/b\twsi/A.svs\tSCC\tP1", "B\twsi/B.svs\tnormal\tP2"],
            HEADER,
            None,
            "not a safe file name",
        ),
        (
            [".A\twsi/A.svs\tSCC\tP1", "B\twsi/B.svs\tnormal\tP2"],
            HEADER,
            None,
            "not a safe file name",
        ),
        (
            ["A b\twsi/A.svs\tSCC\tP1", "B\twsi/B.svs\tnormal\tP2"],
            HEADER,
            None,
            "not a safe file name",
        ),
        (
            ["A\twsi/A.svs\tSCC\tP1", "B\twsi/nope.svs\tnormal\tP2"],
            HEADER,
            None,
            "row 2 (slide_id 'B'): slide file not found",
        ),
        (
            ["A\twsi/A.svs\tSCC\tP1", "B\twsi/B.svs\ttumour\tP2"],
            HEADER,
            ["SCC", "normal"],
            "label 'tumour' is not one",
        ),
        (["A\twsi/A.svs\tSCC\tP1", "B\twsi/B.svs\tSCC\tP2"], HEADER, None, "at least two classes"),
        (
            ["A\twsi/A.svs\tSCC\tP1", "B\twsi/B.svs\tnormal\t"],
            HEADER,
            None,
            "field 'patient_id' is empty",
        ),
        (
            ["A\twsi/A.svs\tSCC\tP1\t-1", "B\twsi/B.svs\tnormal\tP2\t"],
            HEADER + "\tmpp",
            None,
            "mpp '-1'",
        ),
        (
            ["A\twsi/A.svs\tSCC\tP1\tx", "B\twsi/B.svs\tnormal\tP2\t"],
            HEADER + "\tmpp",
            None,
            "mpp 'x'",
        ),
        (
            ["A\twsi/A.svs\tSCC\tP1\t0.25", "B\twsi/B.svs\tnormal\tP2\t20"],
            HEADER + "\tmpp",
            None,
            "row 2 (slide_id 'B'): mpp 20 looks like an objective power (20x)",
        ),
        (
            ["A\twsi/A.svs\tSCC\tP1\tval", "B\twsi/B.svs\tnormal\tP2\ttest"],
            HEADER + "\tsplit",
            None,
            "split 'val'",
        ),
        (
            ["A\twsi/A.svs\tSCC\tP1\ttest", "B\twsi/B.svs\tnormal\tP2\ttest"],
            HEADER + "\tsplit",
            None,
            "needs both train and test",
        ),
        ([], HEADER, None, "no slides listed"),
        (  # a label in other case names the configured one
            ["A\twsi/A.svs\tscc\tP1", "B\twsi/B.svs\tnormal\tP2"],
            HEADER,
            ["SCC", "normal"],
            ("label 'scc' is not one of the configured labels ['SCC', 'normal'] (did you mean "
             "'SCC'?)"),
        ),
        (  # a value beyond the header's columns (pandas read the rows shifted)
            ["A\twsi/A.svs\tSCC\tP1\tnote", "B\twsi/B.svs\tnormal\tP2"],
            HEADER,
            None,
            "line 2 has 5 tab-separated fields but the header has 4 (first extra value 'note')",
        ),
        (  # a folder as the slide path: the tile job failed after the others
            ["A\twsi\tSCC\tP1", "B\twsi/B.svs\tnormal\tP2"],
            HEADER,
            None,
            "row 1 (slide_id 'A'): wsi is a folder, not a slide file",
        ),
        (  # a column named twice: pandas read the first, renamed the second 'label.1' (review)
            ["A\twsi/A.svs\tSCC\tP1\tnormal", "B\twsi/B.svs\tnormal\tP2\tSCC"],
            HEADER + "\tlabel",
            None,
            "the header names column 'label' twice; keep one",
        ),
        (  # one slide under two ids (and patients): both sides of a split
            ["A\twsi/A.svs\tSCC\tP1", "B\twsi/B.svs\tnormal\tP2", "A2\t./wsi/../wsi/A.svs\tnormal\tP3"],
            HEADER,
            None,
            "rows 1 and 3 (slide ids 'A' and 'A2') name the same slide file",
        ),
    ],
)
def test_bad_sheets_one_clear_line(slides, tmp_path, monkeypatch, lines, header, labels, expect):
    monkeypatch.chdir(tmp_path)
    sheet = _sheet(tmp_path, lines, header=header)
    with pytest.raises(SimclrPathError) as err:
        read_samples(sheet, labels=labels)
    msg = str(err.value)
    assert expect in msg and "\n" not in msg and "samples.tsv" in msg


def test_a_spreadsheets_trailing_tabs_are_empty_fields_not_a_shift(slides, tmp_path, recwarn):
    """Rows with one more (empty) field than the header took their slide id as pandas' index:
    'field patient_id is empty' named the path as the slide id."""
    p = tmp_path / "s.tsv"
    p.write_text(HEADER + "\nA\twsi/A.svs\tSCC\tP1\t\nB\twsi/B.svs\tnormal\tP2\t\t\n")
    df = read_samples(p, labels=["SCC", "normal"])
    assert list(df["slide_id"]) == ["A", "B"] and list(df["patient_id"]) == ["P1", "P2"]
    assert not [w for w in recwarn if "Length of header" in str(w.message)]


def test_quoted_tabs_empty_quotes_and_lines_of_tabs_read_as_before(tmp_path, recwarn):
    """The trailing-tab trimming split a quoted "a<TAB>b" into two fields and refused the row,
    took "" for a value, and left a line of tabs alone to pandas' tokenizer error."""
    p = tmp_path / "s.tsv"
    p.write_text(HEADER + '\tnote\nA\ta.svs\tSCC\tP1\t"x\ty"\t""\n\t\t\t\t\t\t\n'
                 "B\tb.svs\tnormal\tP2\t\n")
    df = read_samples(p, check_files=False)
    assert list(df["slide_id"]) == ["A", "B"] and list(df["note"]) == ["x\ty", ""]


def test_missing_and_empty_sheet(tmp_path):
    with pytest.raises(SimclrPathError, match="not found"):
        read_samples(tmp_path / "none.tsv")
    with pytest.raises(SimclrPathError, match="is a folder; give the samples sheet"):
        read_samples(tmp_path)
    (tmp_path / "empty.tsv").write_text("")
    with pytest.raises(SimclrPathError, match="empty"):
        read_samples(tmp_path / "empty.tsv")


def test_check_files_off(tmp_path):
    sheet = _sheet(tmp_path, ["A\tnope/A.svs\tSCC\tP1", "B\tnope/B.svs\tnormal\tP2"])
    assert len(read_samples(sheet, check_files=False)) == 2
    # a folder is never a slide: refused without the file check too (the workflow's reading)
    (tmp_path / "nope" / "A.svs").mkdir(parents=True)
    with pytest.raises(SimclrPathError, match="nope/A.svs is a folder, not a slide file"):
        read_samples(sheet, check_files=False)


def test_safe_ids():
    assert is_safe_id("TCGA-CR-7395_01.a")
    for bad in ("", "..", "a..b", "/abs", "a\\b", ".x", "é", "-2+3", "-x"):
        assert not is_safe_id(bad)


@pytest.mark.parametrize(("row", "what"), [
    ("A\twsi/A.svs\tSCC\t=HYPERLINK(\"http://evil\",\"x\")", "patient_id '=HYPERLINK"),
    ("A\twsi/A.svs\tSCC\t@SUM(1)", "patient_id '@SUM(1)'"),
    ("A\twsi/A.svs\t+SCC\tP1", "label '+SCC'"),
    ("-A\twsi/A.svs\tSCC\tP1", "slide_id '-A' is not a safe file name"),
])
def test_text_a_spreadsheet_would_run_as_a_formula_is_refused(tmp_path, row, what):
    """Patient ids and labels are written to the predictions CSVs as they are: a cell starting
    with = + - @ is a formula when a pathologist opens the CSV in Excel or LibreOffice."""
    sheet = _sheet(tmp_path, [row, "B\twsi/B.svs\tnormal\tP2"])
    with pytest.raises(SimclrPathError, match=re.escape(what)):
        read_samples(sheet, check_files=False)


def test_numbers_and_a_lone_sign_are_no_formula(tmp_path):
    """-1 / +1 labels (a common binary encoding) and a patient '-' are read as what they are."""
    sheet = _sheet(tmp_path, ["A\twsi/A.svs\t-1\t-", "B\twsi/B.svs\t+1\t+2",
                              "C\twsi/C.svs\t-1\t-3.5"])
    df = read_samples(sheet, labels=["-1", "+1"], check_files=False)
    assert df["label"].tolist() == ["-1", "+1", "-1"] and df["patient_id"].tolist()[0] == "-"


def test_only_whole_lines_starting_with_hash_are_comments(tmp_path):
    sheet = _sheet(tmp_path, ["  # indented comment", "A\twsi/A#1.svs\tSCC\tcase#1",
                              "B\twsi/B.svs\tnormal\tcase#2"])
    df = read_samples(sheet, check_files=False)
    assert df["patient_id"].tolist() == ["case#1", "case#2"]
    assert df["path"].tolist()[0].endswith("A#1.svs")


@pytest.mark.parametrize(
    "column, meant",
    [("spilt", "split"), ("Split", "split"), ("splits", "split"), ("splt", "split"),
     ("pmp", "mpp"), ("MPP", "mpp")],
)
def test_a_near_miss_of_an_optional_column_is_an_error(tmp_path, column, meant):
    # ignored, a misspelled split would mean K-fold evaluation (training on the test slides) and a
    # misspelled mpp tiling at the files' own mpp: neither may pass with a warning only
    value = "test" if meant == "split" else "0.25"
    sheet = _sheet(tmp_path, [f"A\twsi/A.svs\tSCC\tP1\t{value}", "B\twsi/B.svs\tnormal\tP2\ttrain"],
                   header=f"{HEADER}\t{column}")
    with pytest.raises(SimclrPathError) as err:
        read_samples(sheet, check_files=False)
    msg = str(err.value)
    assert msg.startswith(f"{sheet}: column {column!r} is not a known column: did you mean "
                          f"{meant!r}? Rename it to {meant!r}"), msg
    assert "\n" not in msg


def test_unknown_columns_warn_and_are_kept(tmp_path, recwarn):
    # 'site' is close to 'split' by difflib's looser ratios: a real column, not a misspelling
    sheet = _sheet(tmp_path, ["A\twsi/A.svs\tSCC\tP1\tlung\tx", "B\twsi/B.svs\tnormal\tP2\tskin\t"],
                   header=HEADER + "\tsite\tnotes")
    with pytest.warns(UserWarning, match=r"column\(s\) 'site', 'notes' are not used \(known "
                      r"columns: slide_id, path, label, patient_id, mpp, split\)"):
        df = read_samples(sheet, check_files=False)
    assert df["site"].tolist() == ["lung", "skin"] and "split" not in df.columns
    # a trailing tab in the header is no column: nothing to say
    recwarn.clear()
    sheet = _sheet(tmp_path, ["A\twsi/A.svs\tSCC\tP1\t", "B\twsi/B.svs\tnormal\tP2\t"],
                   header=HEADER + "\t", name="tab.tsv")
    assert len(read_samples(sheet, check_files=False)) == 2
    assert not [w for w in recwarn if "not used" in str(w.message)]


@pytest.mark.parametrize("column", ["cv_split", "split2", "split_id", "resplit", "mpp_x", "map",
                                    "app", "site", "stain"])
def test_other_columns_close_to_split_or_mpp_only_warn(tmp_path, column):
    """Exported metadata ('mpp_x', 'cv_split') and words one letter from 'mpp' are columns of
    their own: a warning names them, they do not stop the run."""
    sheet = _sheet(tmp_path, ["A\twsi/A.svs\tSCC\tP1\t1", "B\twsi/B.svs\tnormal\tP2\t2"],
                   header=f"{HEADER}\t{column}")
    with pytest.warns(UserWarning, match=f"column\\(s\\) '{column}' are not used"):
        df = read_samples(sheet, check_files=False)
    assert column in df.columns


def test_a_missing_column_names_its_near_miss(tmp_path):
    sheet = _sheet(tmp_path, ["A\twsi/A.svs\tSCC\tP1", "B\twsi/B.svs\tnormal\tP2"],
                   header="slide_id\tpath\tlabel\tpatient")
    with pytest.raises(SimclrPathError, match=r"missing column\(s\) patient_id \(did you mean "
                       r"'patient_id' for column 'patient'\?\); the sheet must be"):
        read_samples(sheet, check_files=False)


def test_a_dataframe_with_numeric_labels_and_ids_reads_as_the_sheet_would(tmp_path):
    """pd.read_csv makes labels 1/0 ints (and ids with a gap floats); validate_samples kept them
    so and refused label 1 as not one of ['1', '0'], which the same sheet as a file passes."""
    from simclr_path.samples import validate_samples

    df = pd.DataFrame({"slide_id": [1, 2, 3], "path": ["a.svs", "b.svs", "c.svs"],
                       "label": [1, 0, 1], "patient_id": [7.0, 8.0, float("nan")]})
    with pytest.raises(SimclrPathError, match=r"row 3 \(slide_id '3'\): field 'patient_id' is empty"):
        validate_samples(df, labels=["1", "0"], check_files=False)
    df.loc[2, "patient_id"] = 9.0
    got = validate_samples(df, labels=["1", "0"], check_files=False)
    assert got["label"].tolist() == ["1", "0", "1"] and got["patient_id"].tolist() == ["7", "8", "9"]
    assert got["slide_id"].tolist() == ["1", "2", "3"]


def test_links_and_copies_of_one_slide_are_named(slides, tmp_path, monkeypatch):
    """Two links to one file were reported as 'the same slide file <second link>'; a byte copy
    under another patient passed without a word."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "wsi" / "L1.svs").symlink_to(tmp_path / "wsi" / "A.svs")
    (tmp_path / "wsi" / "L2.svs").symlink_to(tmp_path / "wsi" / "A.svs")
    sheet = _sheet(tmp_path, ["L1\twsi/L1.svs\tSCC\tP1", "L2\twsi/L2.svs\tnormal\tP2"])
    with pytest.raises(SimclrPathError, match=r"rows 1 and 2 \(slide ids 'L1' and 'L2'\) name the "
                                              r"same slide file: .*L1.svs and .*L2.svs both lead "
                                              r"to .*wsi/A.svs"):
        read_samples(sheet)
    (tmp_path / "wsi" / "copy.svs").write_bytes((tmp_path / "wsi" / "A.svs").read_bytes())
    sheet = _sheet(tmp_path, ["A\twsi/A.svs\tSCC\tP1", "B\twsi/B.svs\tnormal\tP2",
                              "A2\twsi/copy.svs\tnormal\tP3"], name="copies.tsv")
    with pytest.warns(UserWarning, match=r"rows 1 and 3 \(slide ids 'A' and 'A2', patients 'P1' "
                                         r"and 'P3'\) look like copies of one slide file"):
        read_samples(sheet)
    import warnings

    with warnings.catch_warnings():  # the same size alone is no copy
        warnings.simplefilter("error")
        read_samples(_sheet(tmp_path, ["A\twsi/A.svs\tSCC\tP1", "B\twsi/B.svs\tnormal\tP2"],
                            name="fine.tsv"))
