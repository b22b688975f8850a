"""Zip writing and member-checked extraction."""
import stat
import zipfile

import pytest

from cxrdist.errors import ModelError
from cxrdist.sampling.archive import safe_extract, write_zip


def _folder(tmp_path):
    folder = tmp_path / "best_model_fold1_epoch2"
    (folder / "sub").mkdir(parents=True)
    (folder / "cxrdist.json").write_text("{}")
    (folder / "sub" / "w.bin").write_bytes(b"\x00\x01")
    return folder


def test_round_trip_keeps_folder_name_and_never_overwrites(tmp_path):
    archive = write_zip(_folder(tmp_path))
    assert archive.name == "best_model_fold1_epoch2.zip"
    assert zipfile.ZipFile(archive).namelist() == ["best_model_fold1_epoch2/cxrdist.json",
                                                   "best_model_fold1_epoch2/sub/w.bin"]
    out = safe_extract(archive, tmp_path / "x")
    assert (out / "best_model_fold1_epoch2" / "sub" / "w.bin").read_bytes() == b"\x00\x01"
    with pytest.raises(ModelError, match="already exists"):
        write_zip(tmp_path / "best_model_fold1_epoch2")


@pytest.mark.parametrize("member, problem", [("/abs/file", "absolute path"), ("a/../../up", "'..'"),
                                             ("C:/win", "absolute path"), ("a\\..\\..\\up", "'..'")])
def test_dangerous_members_are_refused_before_anything_is_written(tmp_path, member, problem):
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("ok.txt", "fine")
        z.writestr(member, "evil")
    with pytest.raises(ModelError, match=problem):
        safe_extract(archive, tmp_path / "dest")
    assert not (tmp_path / "dest" / "ok.txt").exists() and not (tmp_path / "up").exists()


def test_symlink_members_are_refused(tmp_path):
    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as z:
        info = zipfile.ZipInfo("link")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        z.writestr(info, "/etc/passwd")
    with pytest.raises(ModelError, match="symbolic link"):
        safe_extract(archive, tmp_path / "dest")
