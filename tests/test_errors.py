"""Atomic writes: whole file or nothing, ordinary permissions, no temp files left behind."""

import os

import pytest

from engine.core.errors import InputError, write_atomic


def test_write_atomic_writes_whole_file_with_umask_permissions(tmp_path):
    p = write_atomic(tmp_path / "sub" / "a.json", "{}\n")
    assert p.read_text() == "{}\n"
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(p).st_mode & 0o777 == 0o666 & ~mask
    assert sorted(os.listdir(p.parent)) == ["a.json"]


def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    p = write_atomic(tmp_path / "a.txt", "old")

    class Boom:
        def __len__(self):
            raise RuntimeError("boom")

    with pytest.raises(TypeError):
        write_atomic(p, Boom())  # not str/bytes: fails inside the write
    assert p.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["a.txt"]


def test_input_error_is_one_line_naming_file_field_reason():
    err = InputError("s.yaml", "solver.gap", "must be >= 0")
    assert str(err) == "s.yaml: solver.gap: must be >= 0" and "\n" not in str(err)
