"""Downloads against a real HTTP server on 127.0.0.1: resume, corruption, dropped connections, offline."""

from __future__ import annotations

import dataclasses
import hashlib
import socket
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from gptlab import download
from gptlab.download import DATASETS, dataset_path, download_file, file_sha256, get_dataset
from gptlab.errors import GptlabError

BODY = bytes(range(256)) * 4000  # 1 MB: several blocks of the downloader
BODY_SHA = hashlib.sha256(BODY).hexdigest()


class FileServer:
    """Serves byte strings by path; can honour or ignore Range, corrupt a file or drop connections."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.drop_after: int | None = None  # bytes sent before the next response's connection is cut
        self.honour_range = True
        self.requests: list[dict[str, str]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append({"path": self.path, "range": self.headers.get("Range", "")})
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start = 0
                header = self.headers.get("Range")
                if header and server.honour_range:
                    start = int(header.removeprefix("bytes=").split("-")[0])
                    if start >= len(body):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                payload = body[start:]
                if server.drop_after is not None:
                    payload, server.drop_after = payload[: server.drop_after], None
                    self.wfile.write(payload)
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = FileServer()
    s.files["/body.bin"] = BODY
    yield s
    s.close()


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("GPTLAB_DATA_DIR", raising=False)
    return tmp_path / "cache"


def serve_dataset(monkeypatch, server: FileServer, name: str, bodies: dict[str, bytes]) -> None:
    """Point the registry entry `name` at the local server, which serves `bodies` by file path."""
    files = []
    for remote in get_dataset(name).files:
        path = "/" + remote.path
        server.files[path] = bodies[remote.path]
        files.append(dataclasses.replace(remote, url=server.url(path)))
    monkeypatch.setitem(DATASETS, name, dataclasses.replace(DATASETS[name], files=tuple(files)))


def test_download_verifies_and_moves_into_place(server, tmp_path):
    dest = tmp_path / "sub" / "body.bin"
    assert download_file(server.url("/body.bin"), dest, BODY_SHA, len(BODY), progress=False) == dest
    assert dest.read_bytes() == BODY
    assert not dest.with_name("body.bin.partial").exists()


def test_verified_file_is_not_downloaded_again(server, tmp_path):
    dest = tmp_path / "body.bin"
    download_file(server.url("/body.bin"), dest, BODY_SHA, progress=False)
    download_file(server.url("/body.bin"), dest, BODY_SHA, progress=False)
    assert len(server.requests) == 1


def test_a_damaged_cached_copy_is_downloaded_again(shared_data, server, empty_cache, monkeypatch):
    body = (shared_data / "the-verdict.txt").read_bytes()
    serve_dataset(monkeypatch, server, "the-verdict", {"the-verdict.txt": body})
    damaged = empty_cache / "the-verdict.txt"
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes(body[:100])
    assert dataset_path("the-verdict").read_bytes() == body
    assert len(server.requests) == 1


def test_dropped_connection_resumes_with_a_range_request(server, tmp_path):
    server.drop_after = 300_000
    dest = tmp_path / "body.bin"
    download_file(server.url("/body.bin"), dest, BODY_SHA, len(BODY), progress=False)
    assert dest.read_bytes() == BODY
    assert [r["range"] for r in server.requests] == ["", "bytes=300000-"]


def test_existing_partial_file_is_continued(server, tmp_path):
    dest = tmp_path / "body.bin"
    dest.with_name("body.bin.partial").write_bytes(BODY[:12345])
    download_file(server.url("/body.bin"), dest, BODY_SHA, len(BODY), progress=False)
    assert dest.read_bytes() == BODY
    assert server.requests[0]["range"] == "bytes=12345-"


@pytest.mark.parametrize("stale", [b"garbage " * 1000, BODY + b"more than the file"])
def test_a_partial_file_that_is_not_the_files_beginning_is_fetched_again_whole(stale, server, tmp_path):
    dest = tmp_path / "body.bin"
    dest.with_name("body.bin.partial").write_bytes(stale)
    download_file(server.url("/body.bin"), dest, BODY_SHA, len(BODY), progress=False)
    assert dest.read_bytes() == BODY and not dest.with_name("body.bin.partial").exists()
    assert server.requests[-1]["range"] == ""  # the retry asked for the whole file


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    server.honour_range = False
    dest = tmp_path / "body.bin"
    dest.with_name("body.bin.partial").write_bytes(b"stale bytes")
    download_file(server.url("/body.bin"), dest, BODY_SHA, len(BODY), progress=False)
    assert dest.read_bytes() == BODY


def test_corrupted_download_is_rejected_and_deleted(server, tmp_path):
    server.files["/body.bin"] = BODY[:-1] + b"X"
    dest = tmp_path / "body.bin"
    with pytest.raises(GptlabError, match="corrupted.*sha256"):
        download_file(server.url("/body.bin"), dest, BODY_SHA, len(BODY), progress=False)
    assert not dest.exists() and not dest.with_name("body.bin.partial").exists()


def test_wrong_size_is_rejected(server, tmp_path):
    with pytest.raises(GptlabError, match=f"{len(BODY)} bytes instead of {len(BODY) + 1}"):
        download_file(server.url("/body.bin"), tmp_path / "b", None, len(BODY) + 1, progress=False)


def test_missing_file_reports_the_http_status(server, tmp_path):
    with pytest.raises(GptlabError, match="HTTP 404"):
        download_file(server.url("/nothing"), tmp_path / "nothing", progress=False)


def test_connection_dropping_every_time_gives_up_with_the_url(server, tmp_path, monkeypatch):
    monkeypatch.setattr(download, "DOWNLOAD_ATTEMPTS", 2)
    url = server.url("/body.bin")

    def always_drop(*args, **kwargs):
        server.drop_after = 1000
        return original(*args, **kwargs)

    original = download._fetch
    monkeypatch.setattr(download, "_fetch", always_drop)
    with pytest.raises(GptlabError, match=f"cannot download {url} .*dropped.*2 attempts"):
        download_file(url, tmp_path / "body.bin", BODY_SHA, len(BODY), progress=False)


def test_offline_error_names_the_file_the_url_and_where_to_put_it(empty_cache, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    remote = dataclasses.replace(DATASETS["the-verdict"].files[0], url=f"http://127.0.0.1:{port}/the-verdict.txt")
    monkeypatch.setitem(DATASETS, "the-verdict", dataclasses.replace(DATASETS["the-verdict"], files=(remote,)))
    with pytest.raises(GptlabError) as info:
        dataset_path("the-verdict")
    message = str(info.value)
    assert remote.url in message and str(empty_cache / "the-verdict.txt") in message
    assert "GPTLAB_DATA_DIR" in message and "\n" not in message


def test_named_data_set_is_downloaded_into_the_cache(shared_data, server, empty_cache, monkeypatch):
    body = (shared_data / "tinyshakespeare.txt").read_bytes()
    serve_dataset(monkeypatch, server, "tinyshakespeare", {"tinyshakespeare.txt": body})
    path = dataset_path("tinyshakespeare")
    assert path == empty_cache / "tinyshakespeare.txt" and path.read_bytes() == body
    assert dataset_path("tinyshakespeare") == path and len(server.requests) == 1


def test_zip_member_is_extracted_and_verified(shared_data, server, empty_cache, monkeypatch, tmp_path):
    archive = tmp_path / "spam.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(shared_data / "spam" / "SMSSpamCollection", "SMSSpamCollection")
        zf.writestr("readme", "the UCI archive holds a readme too")
    serve_dataset(monkeypatch, server, "sms-spam", {"spam/SMSSpamCollection": archive.read_bytes()})
    path = dataset_path("sms-spam")
    assert path == empty_cache / "spam" / "SMSSpamCollection"
    assert path.read_bytes() == (shared_data / "spam" / "SMSSpamCollection").read_bytes()


def test_data_dir_is_used_without_a_download(shared_data, monkeypatch):
    monkeypatch.setenv("GPTLAB_DATA_DIR", str(shared_data))
    assert dataset_path("the-verdict") == shared_data / "the-verdict.txt"
    assert [p.name for p in download.dataset_files("gpt2")] == ["encoder.json", "vocab.bpe"]


def test_a_modified_local_copy_is_refused(tmp_path, monkeypatch):
    (tmp_path / "the-verdict.txt").write_text("not the story")
    monkeypatch.setenv("GPTLAB_DATA_DIR", str(tmp_path))
    with pytest.raises(GptlabError, match="does not match the published sha256"):
        dataset_path("the-verdict")


def test_registry_checksums_match_the_shared_copies(shared_data):
    for dataset in DATASETS.values():
        for remote in dataset.files:
            path = shared_data / remote.path
            assert path.stat().st_size == remote.size, remote.path
            assert file_sha256(path) == remote.sha256, remote.path


def test_unknown_data_set_suggests_the_closest_name():
    with pytest.raises(GptlabError, match="did you mean 'tinyshakespeare'"):
        get_dataset("tinyshakespear")


def test_gpt2_files_are_downloaded_when_nothing_is_cached(shared_data, server, empty_cache, monkeypatch, tmp_path):
    from gptlab.tokenizer import GPT2Tokenizer, load_gpt2_encoding

    load_gpt2_encoding.cache_clear()  # loaded from elsewhere by an earlier test
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "no-tiktoken-cache"))
    bodies = {f"gpt2/{name}": (shared_data / "gpt2" / name).read_bytes() for name in ("encoder.json", "vocab.bpe")}
    serve_dataset(monkeypatch, server, "gpt2", bodies)
    assert GPT2Tokenizer().encode("Hello, world") == [15496, 11, 995]
    assert (empty_cache / "gpt2" / "vocab.bpe").is_file()


def test_gpt2_comes_from_the_tiktoken_cache_offline(shared_data, empty_cache, monkeypatch):
    from gptlab.tokenizer import GPT2Tokenizer, load_gpt2_encoding

    load_gpt2_encoding.cache_clear()  # loaded from elsewhere by an earlier test
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(shared_data / "tiktoken-cache"))
    assert GPT2Tokenizer().encode("Hello, world") == [15496, 11, 995]
    assert not Path(empty_cache).exists()
