"""Writes that a reader never sees half done: a file or a folder replaced whole or not at all."""

import pytest

from llama_adapter_fast.files import atomic_folder, atomic_write


def test_a_folder_is_written_whole_or_not_at_all(tmp_path):
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "weights").write_text("old")

    def killed(tmp):
        (tmp / "weights").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_folder(target, killed)
    assert (target / "weights").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temporary folder left
    atomic_folder(target, lambda tmp: (tmp / "config.json").write_text("{}"))
    assert [p.name for p in target.iterdir()] == ["config.json"]  # the old folder's files are gone
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_a_file_is_written_whole_or_not_at_all(tmp_path):
    target = tmp_path / "adapter.safetensors"
    target.write_text("old")

    def killed(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, killed)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == [target.name]
