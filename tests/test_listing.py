"""The folder listing that stands in for a user's image folder in DVC's cache keys (stage ``scan``): it changes
whenever the shard stage could see something else (a touched file counts too: the bytes are never read)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.core.config import Data
from pipeline.core.errors import RcgError
from pipeline.data.listing import folder_fingerprint, folder_listing


def _folder(root: Path) -> Path:
    (root / "cats").mkdir(parents=True)
    (root / "cats" / "a.png").write_bytes(b"a" * 10)
    (root / "cats" / "b.jpg").write_bytes(b"b" * 20)
    (root / "notes.txt").write_text("not an image, but shard rejects it: it counts")
    return root


def test_an_untouched_folder_lists_the_same(tmp_path):
    root = _folder(tmp_path / "images")
    first = folder_fingerprint(root)
    assert first == folder_fingerprint(root)
    assert (first["files"], first["bytes"], first["entries"]) == (3, 30 + len("not an image, but shard rejects it: "
                                                                             "it counts"), 4)


@pytest.mark.parametrize("change", ["add", "remove", "rename", "rewrite", "touch", "subfolder"])
def test_every_change_the_shard_stage_could_see_changes_the_listing(tmp_path, change):
    root = _folder(tmp_path / "images")
    before = folder_fingerprint(root)["sha256"]
    image = root / "cats" / "a.png"
    if change == "add":
        (root / "cats" / "c.png").write_bytes(b"c")
    elif change == "remove":
        image.unlink()
    elif change == "rename":
        image.rename(root / "cats" / "z.png")
    elif change == "rewrite":  # same size, new bytes: the mtime moves
        st = image.stat()
        image.write_bytes(b"x" * 10)
        os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    elif change == "touch":
        st = image.stat()
        os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    else:
        (root / "dogs").mkdir()
    assert folder_fingerprint(root)["sha256"] != before


def test_a_symlink_loop_is_listed_not_followed_forever(tmp_path):
    root = _folder(tmp_path / "images")
    (root / "cats" / "again").symlink_to(root)
    listing = folder_fingerprint(root)
    assert listing["files"] == 3 and listing == folder_fingerprint(root)


def test_the_listing_covers_both_folders_and_names_a_missing_one(tmp_path):
    train, val = _folder(tmp_path / "train"), _folder(tmp_path / "val")
    listing = folder_listing(Data(source="folder", folder=train, val_folder=val))
    assert set(listing["folders"]) == {"train", "val"} and listing["folders"]["train"]["path"] == str(train)
    assert folder_listing(Data())["folders"] == {}  # the built-in set: its params are its contents
    with pytest.raises(RcgError, match="data.val_folder"):
        folder_listing(Data(source="folder", folder=train, val_folder=tmp_path / "missing"))
