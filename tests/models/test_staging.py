"""Writing a directory atomically (models/staging.py): racing writers, failing writers, what a reader sees."""

from __future__ import annotations

import stat
import threading
from pathlib import Path

import pytest

from linrec.models.staging import cached_dir, write_dir_atomically


def _files(path: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in path.iterdir()}


def test_writes_into_place_as_an_ordinary_directory(tmp_path: Path) -> None:
    dst = tmp_path / "out" / "model"  # parents are created
    assert write_dir_atomically(dst, lambda d: (d / "config.json").write_text("a")) is True
    assert _files(dst) == {"config.json": "a"}
    assert stat.S_IMODE(dst.stat().st_mode) == 0o755  # not mkdtemp's private 0o700
    assert [p.name for p in dst.parent.iterdir()] == ["model"]  # no staging sibling left


def test_an_empty_dst_is_replaced_and_a_non_empty_one_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert write_dir_atomically(empty, lambda d: (d / "x").write_text("new"))
    assert _files(empty) == {"x": "new"}

    calls = []
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        write_dir_atomically(empty, calls.append)
    assert calls == [] and _files(empty) == {"x": "new"}  # refused before writing anything
    (tmp_path / "file").write_text("f")
    with pytest.raises(FileExistsError):
        write_dir_atomically(tmp_path / "file", calls.append)


def test_a_writer_that_raises_leaves_nothing_behind(tmp_path: Path) -> None:
    def write(staging: Path) -> None:
        (staging / "half.bin").write_bytes(b"\0" * 10)
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_dir_atomically(tmp_path / "model", write)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError, match="disk full"):
        cached_dir(tmp_path / "model", write)
    assert list(tmp_path.iterdir()) == []


def test_a_racing_second_writer_loses_gracefully(tmp_path: Path) -> None:
    dst = tmp_path / "model"

    def slow(staging: Path) -> None:
        (staging / "who").write_text("slow")
        # another writer starts after this one and finishes first
        assert write_dir_atomically(dst, lambda d: (d / "who").write_text("fast")) is True

    assert write_dir_atomically(dst, slow) is False  # its rename lost: the winner's copy stays
    assert _files(dst) == {"who": "fast"}
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_cached_dir_writes_once_and_races_to_one_copy(tmp_path: Path) -> None:
    dst = tmp_path / "cache" / "model"
    num_workers = 6
    barrier = threading.Barrier(num_workers)
    results: list[Path] = []
    errors: list[BaseException] = []

    def write(staging: Path) -> None:
        (staging / "config.json").write_text(threading.current_thread().name)

    def worker() -> None:
        barrier.wait()
        try:
            results.append(cached_dir(dst, write))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, name=f"w{i}") for i in range(num_workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert results == [dst] * num_workers
    assert [p.name for p in dst.parent.iterdir()] == ["model"]
    winner = (dst / "config.json").read_text()
    assert cached_dir(dst, lambda d: pytest.fail("a finished copy is reused")) == dst
    assert (dst / "config.json").read_text() == winner
