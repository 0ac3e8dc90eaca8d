"""Kaggle's raw files as downloaded: where the JPEGs of each split are (a zip read in place, or
the extracted folder), which GalaxyID each one is, and their bytes; and the message that says
which file goes where when raw_dir holds none.
"""
import os
from pathlib import Path
import stat
import zipfile
import zlib

from galaxy.crop import BadImage
from galaxy.labels import open_zip, skip_record

# Kaggle's image folders, without .zip
SPLIT_FOLDERS = {"train": "images_training_rev1", "test": "images_test_rev1"}


def raw_layout_error(raw_dir, problem=None):
    """The message that says which of Kaggle's files go where, or None if raw_dir looks usable."""
    raw = Path(raw_dir)
    if problem is None:
        if not raw.is_dir():
            problem = "the folder does not exist"
        elif not any(_find_images_source(raw, split) for split in SPLIT_FOLDERS):
            problem = "it holds neither training nor test images"
        else:
            return None
    return (f"error: no usable Galaxy Zoo data in {raw}/ ({problem}).\n"
            f"Put Kaggle's files there as downloaded; unzipping is not needed:\n"
            f"  {raw}/images_training_rev1.zip     (or the folder images_training_rev1/<GalaxyID>.jpg)\n"
            f"  {raw}/training_solutions_rev1.zip  (or training_solutions_rev1.csv)\n"
            f"  {raw}/images_test_rev1.zip         (or the folder images_test_rev1/<GalaxyID>.jpg)\n"
            f"Get them with:  kaggle competitions download -c galaxy-zoo-the-galaxy-challenge -p {raw}\n"
            f"(if that gives one galaxy-zoo-the-galaxy-challenge.zip, unzip it: it holds the zips above),\n"
            f"or try the pipeline on synthetic galaxies:  python preprocess.py --demo")


def _find_images_source(raw_dir, split):
    """The extracted folder if it holds any JPEG, else the zip, else None."""
    folder = Path(raw_dir) / SPLIT_FOLDERS[split]
    if folder.is_dir() and any(_is_jpeg_name(name) for _, _, names in os.walk(folder) for name in names):
        return folder
    archive = folder.with_name(folder.name + ".zip")
    return archive if archive.is_file() else None


def _is_jpeg_name(name):
    base = name.rsplit("/", 1)[-1]
    return base.lower().endswith((".jpg", ".jpeg")) and not base.startswith("._")


# what a directory entry that is no regular file is, for skipped.csv
SPECIAL_KINDS = ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                 (stat.S_ISBLK, "block device"))


def _entry_kind(entry):
    """'' for a regular file (or a link to one), else what the entry is: a FIFO, a device, a broken link.

    Opening a FIFO blocks until something writes to it, and a device may never end: a worker that
    read one would hang the run, so such entries are listed, never read.
    """
    try:
        if entry.is_file():   # the directory listing's own type: no stat for a plain file
            return ""
        mode = entry.stat().st_mode
    except OSError:
        return "broken link"
    return next((name for is_kind, name in SPECIAL_KINDS if is_kind(mode)), "special file")


def _folder_jpegs(source, raw_dir):
    """(sorted references of the regular JPEG files under source, [(reference, kind)] of the JPEG
    names that are no regular file). Folders are walked as os.walk does (links to folders are not
    followed, unreadable folders are passed over); a folder named like a JPEG is just a folder."""
    references, special, folders = [], [], [Path(source)]
    while folders:
        folder = folders.pop()
        prefix = folder.relative_to(raw_dir).as_posix()   # strings per file: a split holds 60k files
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                folders.append(Path(entry.path))
            elif _is_jpeg_name(entry.name) and not entry.is_dir():   # a link to a folder is passed over
                kind = _entry_kind(entry)
                if kind:
                    special.append((f"{prefix}/{entry.name}", kind))
                else:
                    references.append(f"{prefix}/{entry.name}")
    return sorted(references), sorted(special)


def _stem_id(reference):
    stem = reference.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    return int(stem) if stem.isdigit() else ""


def scan_images(raw_dir, split):
    """({galaxy_id: reference}, [skip records]) for one split; see raw_images for references."""
    source = _find_images_source(raw_dir, split)
    if source is None:
        return {}, []
    if source.suffix == ".zip":
        with open_zip(source) as archive:
            names = [n for n in archive.namelist() if _is_jpeg_name(n) and "__MACOSX" not in n]
        references, special = [f"{source.name}/{name}" for name in names], []
    else:
        references, special = _folder_jpegs(source, raw_dir)
    images = {}
    skipped = [skip_record(split, _stem_id(reference), reference, f"not a regular file ({kind})")
               for reference, kind in special]
    for reference in references:
        stem = reference.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        if not stem.isdigit():
            skipped.append(skip_record(split, "", reference, "file name is not a GalaxyID"))
        elif int(stem) in images:
            # two zip members may share a name; read_raw reads the first, as this keeps it
            kept = "the first zip member of this name" if images[int(stem)] == reference else images[int(stem)]
            skipped.append(skip_record(split, int(stem), reference, f"duplicate image: kept {kept}"))
        else:
            images[int(stem)] = reference
    return images, skipped


def raw_images(raw_dir, split):
    """{GalaxyID: reference} of the JPEGs of split "train" or "test" in raw_dir.

    A reference is a path relative to raw_dir: "images_training_rev1/100008.jpg" for an
    extracted file, "images_training_rev1.zip/images_training_rev1/100008.jpg" for a zip
    member (the member may sit in a top folder or not). Pass it to read_raw for the bytes.
    """
    return scan_images(raw_dir, split)[0]


# this process's own (ZipFile, {member name: its first ZipInfo}); a forked worker must not share its parent's
_open_zips = {}


def forget_open_zips():
    """In a forked worker: drop the parent's zip handles, which would share one file offset with it."""
    _open_zips.clear()


def read_raw(raw_dir, reference):
    """The bytes of one raw image, given raw_dir and a reference from raw_images.

    A damaged zip member (bad CRC, broken compressed data) raises BadImage, like a bad image.
    """
    archive_name, is_zip, member = reference.partition(".zip/")
    if not is_zip:
        with open(os.path.join(raw_dir, reference), "rb") as f:
            return f.read()
    archive_path = str(Path(raw_dir) / (archive_name + ".zip"))
    try:
        if archive_path not in _open_zips:
            archive, first = zipfile.ZipFile(archive_path), {}
            for info in archive.infolist():
                first.setdefault(info.filename, info)
            _open_zips[archive_path] = archive, first
        archive, first = _open_zips[archive_path]
        # by ZipInfo: read(name) gives the last of two members with one name, scan_images keeps the first
        return archive.read(first[member])
    except (zipfile.BadZipFile, zlib.error, EOFError, KeyError) as err:
        raise BadImage(f"damaged zip member: {err}") from None
