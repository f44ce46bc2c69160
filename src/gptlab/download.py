"""Named public data sets and files: where they live, their checksums, and a resumable, verified download.

Files are looked up first in GPTLAB_DATA_DIR (a folder that already holds them), then in the cache
(GPTLAB_CACHE, default ~/.cache/gptlab), and downloaded into the cache only when missing. Both
folders share one layout, e.g. `gpt2/encoder.json`, `spam/SMSSpamCollection`.
"""

from __future__ import annotations

import difflib
import hashlib
import http.client
import os
import shutil
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from gptlab.errors import GptlabError

GPT2_BASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models/124M"
BOOK_URL = "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main"
DOWNLOAD_ATTEMPTS = 3
BLOCK_SIZE = 1 << 20


@dataclass(frozen=True)
class RemoteFile:
    """One file of a data set: its place under the data folder, where to fetch it and its checksum.

    `member` names the file inside a zip archive when the URL serves an archive rather than the file.
    """

    path: str
    url: str
    sha256: str
    size: int
    member: str | None = None
    archive_sha256: str | None = None


@dataclass(frozen=True)
class Dataset:
    name: str
    description: str
    files: tuple[RemoteFile, ...]
    use: str  # "corpus" (text to pretrain on), "task" (finetuning data) or "tokenizer"


DATASETS: dict[str, Dataset] = {
    d.name: d
    for d in (
        Dataset(
            "the-verdict",
            "Edith Wharton's short story, the book's first corpus (20 KB)",
            (
                RemoteFile(
                    "the-verdict.txt",
                    f"{BOOK_URL}/ch02/01_main-chapter-code/the-verdict.txt",
                    "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f",
                    20479,
                ),
            ),
            use="corpus",
        ),
        Dataset(
            "tinyshakespeare",
            "Karpathy's 1 MB of Shakespeare plays",
            (
                RemoteFile(
                    "tinyshakespeare.txt",
                    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
                    "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
                    1115394,
                ),
            ),
            use="corpus",
        ),
        Dataset(
            "sms-spam",
            "UCI SMS Spam Collection: 5,574 labelled text messages (classification)",
            (
                RemoteFile(
                    "spam/SMSSpamCollection",
                    "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip",
                    "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d",
                    477907,
                    member="SMSSpamCollection",
                ),
            ),
            use="task",
        ),
        Dataset(
            "instruction-data",
            "1,100 instruction/response pairs from the book (instruction finetuning)",
            (
                RemoteFile(
                    "instruction-data.json",
                    f"{BOOK_URL}/ch07/01_main-chapter-code/instruction-data.json",
                    "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944",
                    203524,
                ),
            ),
            use="task",
        ),
        Dataset(
            "instruction-preference",
            "the instruction data with chosen/rejected responses (preference tuning)",
            (
                RemoteFile(
                    "instruction-data-with-preference.json",
                    f"{BOOK_URL}/ch07/04_preference-tuning-with-dpo/instruction-data-with-preference.json",
                    "305315abf14f65fa42c01a0877572f832606571c2a7d49f152ac1d758b16756e",
                    386968,
                ),
            ),
            use="task",
        ),
        Dataset(
            "gpt2",
            "OpenAI's GPT-2 tokenizer files (encoder.json, vocab.bpe)",
            (
                RemoteFile(
                    "gpt2/encoder.json",
                    f"{GPT2_BASE_URL}/encoder.json",
                    "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
                    1042301,
                ),
                RemoteFile(
                    "gpt2/vocab.bpe",
                    f"{GPT2_BASE_URL}/vocab.bpe",
                    "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
                    456318,
                ),
            ),
            use="tokenizer",
        ),
    )
}


def cache_dir() -> Path:
    return Path(os.environ.get("GPTLAB_CACHE", Path.home() / ".cache" / "gptlab"))


def data_dirs() -> list[Path]:
    """Folders searched for files before downloading: GPTLAB_DATA_DIR (if set), then the cache."""
    dirs = []
    if os.environ.get("GPTLAB_DATA_DIR"):
        dirs.append(Path(os.environ["GPTLAB_DATA_DIR"]))
    dirs.append(cache_dir())
    return dirs


def get_dataset(name: str) -> Dataset:
    """The registry entry of a named data set; unknown names get a suggestion."""
    if name not in DATASETS:
        close = difflib.get_close_matches(name, list(DATASETS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise GptlabError(f"unknown data set {name!r}{hint}; known: {', '.join(DATASETS)}")
    return DATASETS[name]


def dataset_files(name: str, download: bool = True) -> list[Path]:
    """Local paths of all files of a named data set, downloading the missing ones into the cache."""
    return [_local_file(remote, download) for remote in get_dataset(name).files]


def is_available(name: str) -> bool:
    """Whether every file of a named data set is already on this machine (no download needed)."""
    return all(any((folder / f.path).is_file() for folder in data_dirs()) for f in get_dataset(name).files)


def dataset_path(name: str) -> Path:
    """Local path of a named data set's main file (GPTLAB_DATA_DIR, the cache, else a download)."""
    return dataset_files(name)[0]


def _local_file(remote: RemoteFile, download: bool) -> Path:
    """A verified local copy: the user's in GPTLAB_DATA_DIR, else the cache's (fetched again if damaged)."""
    if os.environ.get("GPTLAB_DATA_DIR"):
        path = Path(os.environ["GPTLAB_DATA_DIR"]) / remote.path
        if path.is_file():
            if file_sha256(path) != remote.sha256:
                raise GptlabError(
                    f"{path} does not match the published sha256 of {remote.path}; replace it with the file "
                    f"from {remote.url}"
                )
            return path
    dest = cache_dir() / remote.path
    if dest.is_file() and file_sha256(dest) == remote.sha256:
        return dest
    if not download:
        raise GptlabError(f"{remote.path} is not downloaded; fetch {remote.url} and {_by_hand(remote, dest)}")
    try:
        if remote.member is None:
            return download_file(remote.url, dest, remote.sha256, remote.size)
        archive = download_file(remote.url, dest.parent / Path(remote.url).name, remote.archive_sha256)
        return _extract(archive, remote, dest)
    except GptlabError as exc:
        raise GptlabError(f"{exc}; {_by_hand(remote, dest)}") from None


def _by_hand(remote: RemoteFile, dest: Path) -> str:
    what = f"{remote.member} from that archive" if remote.member else "the file"
    return f"put {what} at {dest} by hand (or set GPTLAB_DATA_DIR to a folder holding {remote.path})"


def _extract(archive: Path, remote: RemoteFile, dest: Path) -> Path:
    """Extract one member of a zip archive to `dest`, verified, through an atomic rename."""
    partial = dest.with_name(dest.name + ".partial")
    try:
        with zipfile.ZipFile(archive) as zf, zf.open(remote.member) as src, open(partial, "wb") as out:
            shutil.copyfileobj(src, out, BLOCK_SIZE)
    except (zipfile.BadZipFile, KeyError) as exc:
        archive.unlink(missing_ok=True)
        raise GptlabError(f"{archive} is not a zip holding {remote.member} ({exc})") from None
    _verify(partial, remote.url, remote.sha256, remote.size)
    os.replace(partial, dest)
    return dest


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(BLOCK_SIZE):
            digest.update(block)
    return digest.hexdigest()


def download_file(
    url: str, dest: Path, sha256: str | None = None, expected_size: int | None = None, progress: bool = True
) -> Path:
    """Download `url` to `dest`: resumable (HTTP Range into `dest.partial`), size- and sha256-verified,
    moved into place atomically. A `dest` that already verifies is returned without a download."""
    dest = Path(dest)
    if dest.is_file():
        try:
            _verify(dest, url, sha256, expected_size)
            return dest
        except GptlabError:
            pass  # _verify deleted the damaged copy: download it again
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    resumed = partial.is_file() and partial.stat().st_size > 0
    for _ in range(DOWNLOAD_ATTEMPTS):
        try:
            if _fetch(url, partial, expected_size, progress):
                break
            reason = "the connection dropped before the end"
        except urllib.error.HTTPError as exc:
            raise GptlabError(f"cannot download {url} (HTTP {exc.code} {exc.reason})") from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            reason = _describe(exc)
    else:
        raise GptlabError(f"cannot download {url} ({reason}, {DOWNLOAD_ATTEMPTS} attempts)")
    try:
        _verify(partial, url, sha256, expected_size)
    except GptlabError:
        if not resumed:
            raise
        # The bytes an earlier attempt left were not this file's beginning (another version of it, or
        # damaged); _verify deleted them: the whole file, once more.
        return download_file(url, dest, sha256, expected_size, progress)
    os.replace(partial, dest)
    return dest


def _fetch(url: str, partial: Path, expected_size: int | None, progress: bool) -> bool:
    """One request, appending to `partial` from where it stops. True when the body arrived whole."""
    from tqdm import tqdm

    have = partial.stat().st_size if partial.is_file() else 0
    if expected_size is not None and have >= expected_size:
        return True
    request = urllib.request.Request(url, headers={"User-Agent": "gptlab"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=30)
    except urllib.error.HTTPError as exc:
        if exc.code == 416:  # the partial file already holds everything
            return True
        raise
    with response:
        if response.status != 206:  # the server ignored the range: start over
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else expected_size
        with (
            open(partial, "ab" if have else "wb") as out,
            tqdm(
                total=total, initial=have, unit="B", unit_scale=True, desc=partial.name[:-8], disable=not progress
            ) as bar,
        ):
            while block := response.read(BLOCK_SIZE):
                out.write(block)
                bar.update(len(block))
    return total is None or partial.stat().st_size >= total


def _verify(path: Path, url: str, sha256: str | None, expected_size: int | None) -> None:
    """Raise (and delete `path`) when its size or sha256 differ from the published ones."""
    size = path.stat().st_size
    problem = ""
    if expected_size is not None and size != expected_size:
        problem = f"{size} bytes instead of {expected_size}"
    elif sha256 is not None and file_sha256(path) != sha256:
        problem = "its sha256 does not match the published one"
    if problem:
        path.unlink()
        raise GptlabError(f"the download of {url} is corrupted ({problem}); it was deleted, try again")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.URLError):
        return f"{exc.reason}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
