"""Downloads against a local HTTP server (with and without Range support) and safe extraction."""
from __future__ import annotations

import hashlib
import http.server
import io
import re
import tarfile
import threading

import pytest

from cxrdist.data.sources.download import download, prepare_iu_inputs, safe_extract
from cxrdist.errors import DataError

PAYLOAD = bytes(range(256)) * 16_000  # ~4 MB: big enough for 3 parallel 1 MiB pieces


class RangeHandler(http.server.BaseHTTPRequestHandler):
    honour_range = True
    cut_first_after: int | None = None  # drop the connection after this many bytes, once
    requests: list[str] = []

    def log_message(self, *args):  # keep test output quiet
        pass

    def do_GET(self):
        cls = type(self)
        cls.requests.append(self.headers.get("Range") or "")
        start, end, status = 0, len(PAYLOAD) - 1, 200
        match = re.match(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
        if match and cls.honour_range:
            start = int(match.group(1))
            end = int(match.group(2)) if match.group(2) else end
            if start >= len(PAYLOAD):
                self.send_response(416)
                self.end_headers()
                return
            status = 206
        body = PAYLOAD[start:end + 1]
        self.send_response(status)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(PAYLOAD)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if cls.cut_first_after is not None and len(body) > cls.cut_first_after:
            self.wfile.write(body[: cls.cut_first_after])
            cls.cut_first_after = None
            self.close_connection = True
            return
        self.wfile.write(body)


def _serve(honour_range=True, cut_first_after=None):
    handler = type("H", (RangeHandler,), {"honour_range": honour_range, "cut_first_after": cut_first_after,
                                          "requests": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, handler, f"http://127.0.0.1:{server.server_address[1]}/file.bin"


@pytest.fixture
def served():
    servers = []

    def start(**kw):
        server, handler, url = _serve(**kw)
        servers.append(server)
        return handler, url

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_resume_after_cut_connection_with_checks(served, tmp_path):
    handler, url = served(cut_first_after=2_200_000)
    digest = hashlib.sha256(PAYLOAD).hexdigest()
    out = download(url, tmp_path / "f.bin", sha256=digest, expected_size=len(PAYLOAD), backoff=0.01,
                   progress=False)
    assert out.read_bytes() == PAYLOAD and not (tmp_path / "f.bin.part").exists()
    assert any(r.startswith("bytes=") and r != "bytes=0-0" for r in handler.requests)  # resumed, not restarted


def test_existing_part_resumes_and_server_ignoring_range_restarts_cleanly(served, tmp_path):
    handler, url = served()
    (tmp_path / "a.bin.part").write_bytes(PAYLOAD[:1000])
    assert download(url, tmp_path / "a.bin", progress=False).read_bytes() == PAYLOAD
    assert "bytes=1000-" in handler.requests
    _, plain_url = served(honour_range=False)
    (tmp_path / "b.bin.part").write_bytes(b"garbage that must not survive")
    assert download(plain_url, tmp_path / "b.bin", progress=False).read_bytes() == PAYLOAD


def test_parallel_ranges(served, tmp_path):
    handler, url = served()
    assert download(url, tmp_path / "p.bin", parallel=3, progress=False).read_bytes() == PAYLOAD
    assert len([r for r in handler.requests if r not in ("", "bytes=0-0")]) == 3


def test_progress_in_a_log_is_a_few_plain_lines_of_bytes(served, tmp_path, monkeypatch, capsys):
    from cxrdist.progress import ENV

    monkeypatch.setenv(ENV, "lines")
    _, url = served()
    assert download(url, tmp_path / "p.bin", parallel=3, progress=True).read_bytes() == PAYLOAD
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("p.bin: ")]
    assert "\r" not in err and 1 <= len(lines) <= 11  # 1 MiB blocks from 3 threads: at most one line per tenth
    assert lines[-1].startswith("p.bin: 3.9MiB/3.9MiB (100%), ") and "done in" in lines[-1]


def test_size_and_checksum_mismatch_and_http_errors(served, tmp_path):
    _, url = served()
    with pytest.raises(DataError, match="expected"):
        download(url, tmp_path / "x.bin", expected_size=10, progress=False)
    with pytest.raises(DataError, match="sha256 mismatch"):
        download(url, tmp_path / "y.bin", sha256="0" * 64, progress=False)
    assert not (tmp_path / "y.bin").exists() and not (tmp_path / "y.bin.part").exists()
    with pytest.raises(DataError, match="failed after 2 attempts"):
        download("http://127.0.0.1:9/none", tmp_path / "z.bin", retries=1, backoff=0.01, timeout=2,
                 progress=False)


def _tar_with(tmp_path, name, add):
    path = tmp_path / name
    with tarfile.open(path, "w:gz") as tar:
        add(tar)
    return path


def _file(tar, name, data=b"x"):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("bad", ["/etc/evil", "../evil", "link", "device"])
def test_safe_extract_refuses_unsafe_members(tmp_path, bad):
    def add(tar):
        _file(tar, "ok/a.txt")
        if bad in ("link", "device"):
            info = tarfile.TarInfo("ok/" + bad)
            info.type = tarfile.SYMTYPE if bad == "link" else tarfile.CHRTYPE
            info.linkname = "a.txt"
            tar.addfile(info)
        else:
            _file(tar, bad)

    archive = _tar_with(tmp_path, "bad.tgz", add)
    with pytest.raises(DataError, match="refusing to extract"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "evil").exists()


def test_prepare_iu_inputs_extracts_archives(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _tar_with(src, "NLMCXR_reports.tgz", lambda t: _file(t, "ecgen-radiology/1.xml", b"<eCitation/>"))
    roots = prepare_iu_inputs(src, tmp_path / "cache", progress=False)
    assert roots == [src, tmp_path / "cache" / "NLMCXR_reports"]
    assert (roots[1] / "ecgen-radiology" / "1.xml").read_bytes() == b"<eCitation/>"
    with pytest.raises(DataError, match="is not a folder"):
        prepare_iu_inputs(tmp_path / "none", tmp_path / "cache")


def test_a_full_disk_while_extracting_is_reported_as_a_full_disk_not_a_damaged_archive(tmp_path, monkeypatch):
    import errno

    archive = _tar_with(tmp_path, "ok.tgz", lambda tar: _file(tar, "ok/a.txt"))

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tarfile.TarFile, "extractall", full)
    with pytest.raises(DataError, match=r"disk full while extracting .*ok.tgz.*free space") as err:
        safe_extract(archive, tmp_path / "out")
    assert "damaged" not in str(err.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("*.cxrdist-tmp"))
