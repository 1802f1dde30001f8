"""A disk cache of generated Python modules: `load_module(source, tag)`.

Why files: `@triton.jit` reads kernel source with `inspect.getsource`, which needs a real
file behind each function; and Triton looks functions up by module, so each one is imported
under a unique name registered in `sys.modules`. The file is `cache_dir()/{tag}_{key[:40]}.py`
with key = sha256(cache format version, Triton version, source), so a new format or Triton
release never reuses an old file. Content: `# rnnc-generated sha256=<sha256 of body>`, then
the body (the source itself).

Why atomic: processes may compile the same source at once. Each writes a private temp file
in the same directory (pid + random, suffix `.tmp`, so never imported), fsyncs it, then
`os.replace`s it over the final name: readers see no file or a whole one, and all writers
succeed. Corruption: a file is used only if it decodes as UTF-8, its header hash equals
sha256(body) and body == source; otherwise (truncated, garbage, unreadable) it is rebuilt.
What runs is the verified text itself, compiled under the file's path, so a file changed
after the check is never executed. Modules are memoised per process by key; when the cache
directory is not writable a per-process temporary directory is used instead.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.abc
import importlib.util
import linecache
import os
import pathlib
import re
import secrets
import sys
import tempfile
import threading
import types

FORMAT_VERSION = 1
_HEADER = "# rnnc-generated sha256="
_TAG = re.compile(r"[a-z][a-z0-9_]{0,30}")
_PACKAGE = "rnnc_generated"

_loaded: dict = {}  # (tag, key) -> module
_lock = threading.RLock()
_fallback: pathlib.Path | None = None
_triton: str | None = None


def cache_dir() -> pathlib.Path:
    """$RNNC_CACHE_DIR if set, else ~/.cache/rnnc; created on demand (OSError if it cannot be)."""
    env = os.environ.get("RNNC_CACHE_DIR")
    d = pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "rnnc"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _key(source: str) -> str:
    global _triton
    if _triton is None:
        try:
            import triton
            _triton = str(getattr(triton, "__version__", "unknown"))
        except Exception:  # not installed, or broken: either way no Triton to key on
            _triton = "none"
    return _sha(f"rnnc-cache-v{FORMAT_VERSION}\0triton={_triton}\0{source}")


def _verified(path: pathlib.Path, source: str) -> str | None:
    """The file's whole text when it is intact and holds exactly `source`, else None."""
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    header, newline, body = text.partition("\n")
    if not newline or header != _HEADER + _sha(body) or body != source:
        return None
    return text


def _write_atomic(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(8)}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(text.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _directories():
    """The cache directory, then (if that fails) this process's temporary one."""
    global _fallback
    try:
        yield cache_dir()
    except OSError:
        pass
    if _fallback is None:
        _fallback = pathlib.Path(tempfile.mkdtemp(prefix="rnnc-cache-"))
    yield _fallback


def _materialise(source: str, name: str) -> tuple:
    """(path, verified text) of an intact cache file for `source`, writing one if needed."""
    text = _HEADER + _sha(source) + "\n" + source
    for d in _directories():
        path = d / name
        found = _verified(path, source)
        if found is not None:
            return path, found
        try:
            _write_atomic(path, text)
        except OSError as e:
            error = e
            continue
        linecache.checkcache(str(path))  # drop lines cached from a corrupt earlier version
        return path, text
    raise OSError(f"rnnc: cannot write the generated module {name}: {error}")


class _VerifiedLoader(importlib.abc.Loader):
    """Runs the text that was verified, compiled under the file's path (for getsource)."""

    def __init__(self, path: pathlib.Path, text: str):
        self.path, self.text = path, text

    def exec_module(self, module):
        exec(compile(self.text, str(self.path), "exec", dont_inherit=True), module.__dict__)


def load_module(source: str, tag: str = "gen") -> types.ModuleType:
    """Import generated Python `source` from the disk cache; same source, same module object."""
    if not isinstance(tag, str) or not _TAG.fullmatch(tag):
        raise ValueError(f"cache tag must match [a-z][a-z0-9_]{{0,30}}, got {tag!r}")
    key = _key(source)
    with _lock:
        module = _loaded.get((tag, key))
        if module is not None:
            return module
        path, text = _materialise(source, f"{tag}_{key[:40]}.py")
        name = f"{_PACKAGE}.{tag}_{key[:16]}"
        package = sys.modules.get(_PACKAGE)
        if package is None:
            package = sys.modules[_PACKAGE] = types.ModuleType(_PACKAGE, "rnnc's generated modules")
            package.__path__ = []
        spec = importlib.util.spec_from_file_location(name, path, loader=_VerifiedLoader(path, text))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(name, None)
            raise
        setattr(package, name.rpartition(".")[2], module)
        _loaded[(tag, key)] = module
        return module
