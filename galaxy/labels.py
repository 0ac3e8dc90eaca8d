"""Kaggle's training_solutions_rev1 table: read from .csv or .zip, every bad row skipped and listed.

A skipped row becomes a skip record (split, galaxy_id, file, reason), the rows of preprocess.py's
skipped.csv; open_zip opens any of Kaggle's zips with an error that says to download it again.
"""
import csv
import io
from pathlib import Path
import warnings
import zipfile
import zlib

import numpy as np
import pandas as pd

from dataset import LABEL_COLUMNS, DataError

SOLUTIONS = "training_solutions_rev1"   # Kaggle's file name, without .zip / .csv
SKIPPED_COLUMNS = ["split", "galaxy_id", "file", "reason"]   # a skip record's fields, skipped.csv's columns


def read_labels(raw_dir):
    """(labels DataFrame indexed by GalaxyID with the 37 LABEL_COLUMNS, [skip records], file name).

    Rows with a bad GalaxyID, a repeated GalaxyID (the first is kept), more fields than the
    header, or a value that is missing or outside [0, 1] are skipped. Raises DataError naming
    the file if it cannot be read or lacks columns. Returns (None, [], None) when there is no
    solutions file.
    """
    raw = Path(raw_dir)
    csv_path, zip_path = raw / f"{SOLUTIONS}.csv", raw / f"{SOLUTIONS}.zip"
    if csv_path.is_file():
        file_name, path = csv_path.name, csv_path
        data = csv_path.read_bytes()
    elif zip_path.is_file():
        with open_zip(zip_path) as archive:
            members = [n for n in archive.namelist() if n.lower().endswith(".csv") and "__MACOSX" not in n]
            if not members:
                raise DataError(f"{zip_path} holds no .csv; it should hold Kaggle's {SOLUTIONS}.csv")
            file_name, path = f"{zip_path.name}/{members[0]}", f"{zip_path}/{members[0]}"
            try:
                data = archive.read(members[0])
            except (zipfile.BadZipFile, zlib.error, EOFError) as err:
                raise DataError(f"{path} is damaged ({err}); download Kaggle's {zip_path.name} again") from None
    else:
        return None, [], None
    try:
        table, lines, long_rows = _read_solutions(data)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, csv.Error) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"cannot read {path} ({first_line}); download Kaggle's {SOLUTIONS}.zip again") from None
    table.columns = [c.strip() for c in table.columns]
    missing = [c for c in ["GalaxyID"] + LABEL_COLUMNS if c not in table.columns]
    if missing:
        raise DataError(f"{path} lacks the columns {', '.join(missing)}; "
                        f"it should be Kaggle's {SOLUTIONS}.csv (GalaxyID, Class1.1 ... Class11.6)")

    skipped = [skip_record("train", galaxy_id, f"{file_name} line {line}", reason)
               for line, galaxy_id, reason in long_rows]
    ids, bad_id = _galaxy_ids(table["GalaxyID"])
    # read_csv parsed every clean column as numbers; one holding any text comes as strings, whose
    # unparsable cells become NaN here (parsing all 37 columns as text first took 4x as long)
    values = table[LABEL_COLUMNS].apply(lambda column: column if pd.api.types.is_float_dtype(column)
                                        else pd.to_numeric(column, errors="coerce"))
    repeated = ~bad_id & ids.duplicated(keep="first")
    not_number = values.isna().any(axis=1)
    # the published fractions sit in [0, 1] up to float noise; anything further off is broken
    out_of_range = ((values < -1e-6) | (values > 1 + 1e-6)).any(axis=1)
    reasons = [(bad_id, "bad GalaxyID in labels"), (repeated, "duplicate GalaxyID in labels: first row kept"),
               (not_number, "label value missing or not a number"), (out_of_range, "label value outside [0, 1]")]
    keep = pd.Series(True, index=table.index)
    for mask, reason in reasons:
        for row in table.index[mask & keep]:
            galaxy_id = int(ids[row]) if not bad_id[row] else table.at[row, "GalaxyID"]
            skipped.append(skip_record("train", galaxy_id, f"{file_name} line {lines[row]}", reason))
        keep &= ~mask
    labels = values[keep].clip(0, 1)
    labels.index = ids[keep].rename("GalaxyID")
    return labels, skipped, file_name


def _read_solutions(data):
    """(table, file line of each row, [(line, GalaxyID text, reason)] of rows with too many fields).

    The C parser reads a clean file in one pass. A row with more fields than the header makes
    it warn and skip the row, or, if it is the first row, silently cut it short; so on any
    warning the rows are counted with the csv module, and the long ones are left out by line.
    GalaxyID is read as text, so that a skipped ID is reported as written.
    """
    def parse(skip_lines=()):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", pd.errors.ParserWarning)
            table = pd.read_csv(io.BytesIO(data), index_col=False, on_bad_lines="warn",
                                skiprows=[line - 1 for line in skip_lines], dtype={"GalaxyID": str})
        return table, caught

    table, caught = parse()
    if not caught:
        return table, np.arange(len(table)) + 2, []
    rows = csv.reader(io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", newline=""))
    width = len(next(rows, []))
    long_rows, lines = [], []
    for fields in rows:
        if len(fields) > width:
            long_rows.append((rows.line_num, fields[0], f"too many fields in labels row: {len(fields)}, "
                                                        f"the header has {width}"))
        elif fields:
            lines.append(rows.line_num)
    table, _ = parse([line for line, _, _ in long_rows])
    if len(lines) != len(table):   # csv and pandas disagree on some odd line: number rows plainly
        lines = list(range(2, len(table) + 2))
    return table, np.asarray(lines), long_rows


def _galaxy_ids(column):
    """(int64 Series of IDs, mask of the IDs that are no whole number in int64's range) for a column of text."""
    text = column.astype(str).str.strip()
    # a whole number of at most 18 digits fits int64; a float-formatted "100008.0" counts as whole
    good = text.str.fullmatch(r"[0-9]{1,18}(\.0*)?").fillna(False).astype(bool)
    ids = pd.Series(0, index=column.index, dtype=np.int64)
    ids[good] = text[good].str.split(".", n=1).str[0].astype(np.int64)
    return ids, ~good


def skip_record(split, galaxy_id, file, reason):
    return {"split": split, "galaxy_id": galaxy_id, "file": file, "reason": reason}


def open_zip(path):
    """zipfile.ZipFile(path); a DataError that says to download it again if it is damaged."""
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, EOFError, ValueError) as err:   # truncated, or not a zip at all
        raise DataError(f"{path} is damaged or not a zip ({err}); download Kaggle's {Path(path).name} again") from None
    except OSError as err:
        raise DataError(f"cannot read {path} ({err.strerror or err}); check that it is a readable file") from None
