"""Writing shared files (the statistics cache, downloads) whole, and workers for statistics."""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from canon.data import DataConfig, build_datasets, stats
from canon.data.cifar import download_and_verify
from canon.data.folders import FolderImages
from canon.data.stats import compute_stats, stats_cache_path
from canon.errors import DataError
from canon.files import STALE_SECONDS, atomic_write, download


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "sub" / "file.txt"
    atomic_write(target, lambda temporary: temporary.write_text("first"))
    assert target.read_text() == "first"

    def fails(temporary):
        temporary.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, fails)
    assert target.read_text() == "first"
    assert [p.name for p in target.parent.iterdir()] == ["file.txt"]  # no temporary left


def test_two_writers_of_one_stats_cache_file_both_succeed(tmp_path, monkeypatch):
    """A second process writes the same cache entry while the first is mid-write (the race
    the fixed `.part` name lost with FileNotFoundError): both must succeed, no leftovers."""
    small = stats.DatasetStats(
        mean_image=torch.rand(3, 4, 4), channel_mean=torch.rand(3), channel_std=torch.rand(3),
        rgb_covariance=torch.eye(3), pca_eigval=torch.ones(3), pca_eigvec=torch.eye(3),
        images=7, skipped=0,
    )
    path = tmp_path / "stats" / "entry.safetensors"
    real_atomic_write, interleaved = stats.atomic_write, []

    def atomic_write_while_another_process_writes(target, write, **options):
        def write_then_other_process_writes(temporary):
            write(temporary)
            if not interleaved:
                interleaved.append(temporary)
                stats._save(small, path)  # the other process, finishing first

        real_atomic_write(target, write_then_other_process_writes, **options)

    monkeypatch.setattr(stats, "atomic_write", atomic_write_while_another_process_writes)
    stats._save(small, path)
    assert interleaved and stats._load(path).images == 7
    assert [p.name for p in path.parent.iterdir()] == ["entry.safetensors"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # readable by a shared cache's users


def test_a_stats_cache_that_cannot_be_written_or_read_says_what_to_do(tmp_path, monkeypatch):
    """A full disk after a whole statistics pass, or another user's unreadable cache file:
    one line naming the file and the remedy (the pass is not silently repeated either)."""
    small = stats.DatasetStats(
        mean_image=torch.rand(3, 4, 4), channel_mean=torch.rand(3), channel_std=torch.rand(3),
        rgb_covariance=torch.eye(3), pca_eigval=torch.ones(3), pca_eigvec=torch.eye(3),
        images=7, skipped=0,
    )
    path = tmp_path / "stats" / "entry.safetensors"

    def disk_full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(Path, "write_bytes", disk_full)
        with pytest.raises(DataError, match=r"cannot write .*entry\.safetensors: No space left "
                                            r"on device; free some space or choose a writable"):
            stats._save(small, path)
    stats._save(small, path)

    real_open = Path.open

    def denied(self, *args, **kwargs):  # as for a non-root user of another's 0600 file
        if self == path:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", denied)
    monkeypatch.setattr(stats, "stats_cache_path", lambda *args: path)
    monkeypatch.setattr(stats, "compute_stats", lambda *args, **kwargs: pytest.fail("computed"))
    with pytest.raises(DataError, match=r"entry\.safetensors: cannot read these statistics "
                                        r"\(permission denied\); make it readable, or choose"):
        stats.load_or_compute_stats(FolderImages.__new__(FolderImages), 32)


def test_atomic_write_deletes_its_target_s_temporary_files_a_day_old(tmp_path):
    """A write killed midway (SIGKILL, power loss) leaves its temporary file: the next write of
    the same file deletes it once a day old; a live writer's (a shared cache) stays."""
    target = tmp_path / "train.safetensors"
    killed = tmp_path / ".train.safetensors.ab12cd34"
    live = tmp_path / ".train.safetensors.ef56gh78"
    other = tmp_path / ".val.safetensors.ab12cd34"
    for leftover in (killed, live, other):
        leftover.write_bytes(b"half")
    a_day_ago = time.time() - STALE_SECONDS - 60
    for old in (killed, other):
        os.utime(old, (a_day_ago, a_day_ago))
    atomic_write(target, lambda temporary: temporary.write_bytes(b"whole"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [target.name, live.name, other.name])


def test_two_downloads_of_one_archive_both_succeed(tmp_path, monkeypatch):
    source = tmp_path / "archive.bin"
    source.write_bytes(b"real bytes " * 1000)
    md5 = hashlib.md5(source.read_bytes()).hexdigest()
    target = tmp_path / "cache" / "archive.bin"
    real_urlopen, interleaved = urllib.request.urlopen, []

    def urlopen_while_another_download_runs(url, **options):
        if not interleaved:  # this one's temporary file is there already
            interleaved.append(url)
            download_and_verify(source.as_uri(), target, md5)  # the other process
        return real_urlopen(url, **options)

    monkeypatch.setattr(urllib.request, "urlopen", urlopen_while_another_download_runs)
    assert download_and_verify(source.as_uri(), target, md5).read_bytes() == source.read_bytes()
    assert interleaved and [p.name for p in target.parent.iterdir()] == ["archive.bin"]


def test_a_download_is_checked_against_a_published_digest_prefix(tmp_path):
    """As torch.hub's file names carry the first digits of their sha256."""
    source = tmp_path / "weights.pth"
    source.write_bytes(b"weights " * 1000)
    prefix = hashlib.sha256(source.read_bytes()).hexdigest()[:8]
    target = tmp_path / "hub" / "weights.pth"
    download(source.as_uri(), target, algorithm="sha256", published=prefix, name="w", advice="",
             write_advice="")
    assert target.read_bytes() == source.read_bytes()
    wrong = "0" * 8 if prefix != "0" * 8 else "1" * 8
    with pytest.raises(DataError, match=f"sha256 {prefix} does not match the published {wrong}"):
        download(source.as_uri(), tmp_path / "other.pth", algorithm="sha256", published=wrong,
                 name="w", advice="", write_advice="")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hub", "weights.pth"]


def test_a_download_cut_short_is_an_error_that_keeps_nothing(tmp_path, monkeypatch):
    """A server that promises 100,000 bytes and closes after 5,000, by Content-Length (which
    http.client does not enforce) or in chunks (its IncompleteRead is no OSError). Chunks
    sent whole count, whatever Content-Length says beside them (HTTP ignores it)."""
    chunked = b"Transfer-Encoding: chunked\r\n"
    cut = {"length": b"Content-Length: 100000\r\n\r\n" + b"x" * 5000,
           "chunks": chunked + b"\r\n186a0\r\n" + b"x" * 5000,
           "whole": chunked + b"Content-Length: 4000\r\n\r\n1388\r\n" + b"x" * 5000
           + b"\r\n0\r\n\r\n"}
    for variable in ("no_proxy", "NO_PROXY"):  # a proxy of the machine's would not reach it
        monkeypatch.setenv(variable, "127.0.0.1")
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(60)

    def serve() -> None:
        for _ in cut:
            connection, _ = server.accept()
            with connection:
                request = connection.recv(65536).decode()
                connection.sendall(b"HTTP/1.1 200 OK\r\n" + cut[request.split()[1][1:]])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    target = tmp_path / "hub" / "weights.pth"
    try:
        for how, reason in (("length", r"cut short at 5000 of 100000 bytes"),
                            ("chunks", r"IncompleteRead")):
            url = f"http://127.0.0.1:{server.getsockname()[1]}/{how}"
            with pytest.raises(DataError, match=rf"cannot download w from {url} \({reason}.*\); "
                                                "put it there by hand"):
                download(url, target, algorithm="sha256", published="", name="w",
                         advice="; put it there by hand", write_advice="")
        assert not list(target.parent.iterdir())
        download(f"http://127.0.0.1:{server.getsockname()[1]}/whole", target,
                 algorithm="sha256", published="", name="w", advice="", write_advice="")
    finally:
        server.close()
        thread.join(timeout=5)  # done with its last answer; on a failure, left to its timeout
    assert target.read_bytes() == b"x" * 5000


def test_build_datasets_computes_folder_statistics_with_workers(imagenette_root, tmp_path,
                                                                monkeypatch):
    folder = tmp_path / "data"
    for split in ("train", "val"):
        for wnid in ("n01440764", "n02102040"):
            (folder / split / wnid).mkdir(parents=True)
            for path in sorted((imagenette_root / split / wnid).iterdir())[:6]:
                (folder / split / wnid / path.name).symlink_to(path)
    used = []
    real_loader = stats.DataLoader

    def recording_loader(*args, **kwargs):
        used.append(kwargs["num_workers"])
        return real_loader(*args, **kwargs)

    monkeypatch.setattr(stats, "DataLoader", recording_loader)
    config = DataConfig(dataset=str(folder), augmentation="resnet", crop_size=48,
                        resize_size=64, mean="pixel")
    train = build_datasets(config, root_cache=tmp_path / "cache", workers=2).train
    assert used == [2]
    cached = stats._load(stats_cache_path(train, 64, tmp_path / "cache"))
    direct = compute_stats(FolderImages(folder / "train"), 64, progress=False)
    assert torch.allclose(cached.mean_image, direct.mean_image)
    assert cached.images == direct.images == 12
