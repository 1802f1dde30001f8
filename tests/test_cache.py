"""rnnc.cache: generated modules live in files (for inspect.getsource / Triton), are written
atomically, are verified before use (a corrupt file is rebuilt, never imported) and are
memoised in-process."""
from __future__ import annotations

import builtins
import hashlib
import inspect
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from rnnc import cache

CACHE_PY = Path(cache.__file__).resolve()


def source(n: int = 0) -> str:
    return f"OFFSET = {n}\n\ndef f(x):\n    return x * 2 + OFFSET\n"


@pytest.fixture(autouse=True)
def fresh(monkeypatch, tmp_path):
    monkeypatch.setenv("RNNC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cache, "_loaded", {})  # no memo carried between tests
    monkeypatch.delattr(builtins, "rnnc_pwned", raising=False)
    return tmp_path / "cache"


def forget(monkeypatch):
    """A new process, as far as the memo goes: the next load goes to disk."""
    monkeypatch.setattr(cache, "_loaded", {})


def valid(path: Path, body: str) -> bool:
    header, _, rest = path.read_text(encoding="utf-8").partition("\n")
    return rest == body and header == "# rnnc-generated sha256=" + hashlib.sha256(body.encode()).hexdigest()


def test_same_source_same_module_and_file(fresh):
    m1 = cache.load_module(source(1), tag="gla_fwd")
    m2 = cache.load_module(source(1), tag="gla_fwd")
    assert m1 is m2
    path = Path(m1.__file__)
    assert path.parent == fresh and path.name.startswith("gla_fwd_") and path.suffix == ".py"
    assert len(path.stem) == len("gla_fwd_") + 40
    assert valid(path, source(1))
    assert sorted(p.name for p in fresh.iterdir()) == [path.name]
    assert m1.f(3) == 7
    assert sys.modules[m1.__name__] is m1 and m1.__name__.startswith("rnnc_generated.gla_fwd_")
    assert inspect.getsource(m1.f).startswith("def f(x):")  # what @triton.jit relies on


def test_memo_does_not_touch_disk(fresh):
    m1 = cache.load_module(source(2))
    os.unlink(m1.__file__)
    assert cache.load_module(source(2)) is m1
    assert not Path(m1.__file__).exists()  # neither read nor rewritten


def test_different_source_different_file(fresh):
    a, b = cache.load_module(source(3)), cache.load_module(source(4))
    assert a is not b and a.__file__ != b.__file__ and a.__name__ != b.__name__
    assert (a.f(1), b.f(1)) == (5, 6)
    assert len(list(fresh.glob("*.py"))) == 2


def test_key_includes_triton_version(monkeypatch):
    a = cache.load_module(source(5))
    monkeypatch.setattr(cache, "_triton", "0.0-other")
    b = cache.load_module(source(5))
    assert a is not b and Path(a.__file__).name != Path(b.__file__).name


def test_cache_dir_default_and_created_on_demand(monkeypatch, tmp_path):
    monkeypatch.delenv("RNNC_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    d = cache.cache_dir()
    assert d == tmp_path / "home" / ".cache" / "rnnc" and d.is_dir()


@pytest.mark.parametrize("tag", ["", "Gen", "1x", "a-b", "a/b", "../x", "a" * 32, None])
def test_bad_tag_rejected(tag):
    with pytest.raises(ValueError):
        cache.load_module(source(), tag=tag)


EVIL = "import builtins\nbuiltins.rnnc_pwned = True\n" + source(6)
CORRUPT = {
    "truncated": lambda good: good[: len(good) // 2],
    "empty": lambda good: b"",
    "garbage": lambda good: b"\xff\xfe\x00garbage\x80" * 10,
    "no_header": lambda good: source(6).encode(),
    "wrong_hash": lambda good: ("# rnnc-generated sha256=" + "0" * 64 + "\n" + source(6)).encode(),
    # an intact-looking file whose body is not the source asked for
    "other_body": lambda good: ("# rnnc-generated sha256=" + hashlib.sha256(EVIL.encode()).hexdigest()
                                + "\n" + EVIL).encode(),
}


@pytest.mark.parametrize("kind", sorted(CORRUPT))
def test_corrupt_file_is_rebuilt_not_imported(kind, monkeypatch):
    first = cache.load_module(source(6))
    path = Path(first.__file__)
    path.write_bytes(CORRUPT[kind](path.read_bytes()))
    forget(monkeypatch)
    again = cache.load_module(source(6))
    assert again is not first and again.__file__ == first.__file__
    assert not hasattr(builtins, "rnnc_pwned")
    assert valid(path, source(6))
    assert again.f(1) == 8


def test_stray_tmp_file_is_never_imported(fresh):
    fresh.mkdir(parents=True)
    key = cache._key(source(7))
    stray = fresh / f"gen_{key[:40]}.py.999.deadbeef.tmp"
    stray.write_text("# rnnc-generated sha256=x\n" + EVIL)
    m = cache.load_module(source(7))
    assert Path(m.__file__) == fresh / f"gen_{key[:40]}.py"
    assert not hasattr(builtins, "rnnc_pwned") and m.f(0) == 7
    assert valid(Path(m.__file__), source(7))


def test_unwritable_cache_dir_falls_back(monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("RNNC_CACHE_DIR", str(blocker / "cache"))  # mkdir fails even as root
    monkeypatch.setattr(cache, "_fallback", None)
    m = cache.load_module(source(8))
    try:
        path = Path(m.__file__)
        assert tmp_path not in path.parents and path.parent.name.startswith("rnnc-cache-")
        assert valid(path, source(8)) and m.f(1) == 10
    finally:
        shutil.rmtree(cache._fallback, ignore_errors=True)


def test_refused_write_falls_back(monkeypatch, fresh):
    real = cache._write_atomic

    def refuse(path, text):
        if path.parent == fresh:
            raise PermissionError(13, "Permission denied")
        real(path, text)
    monkeypatch.setattr(cache, "_write_atomic", refuse)
    monkeypatch.setattr(cache, "_fallback", None)
    m = cache.load_module(source(9))
    try:
        assert Path(m.__file__).parent == cache._fallback and m.f(1) == 11
        assert list(fresh.iterdir()) == []  # no temp file left behind either
    finally:
        shutil.rmtree(cache._fallback, ignore_errors=True)


def test_two_processes_at_once(fresh):
    # Each process loads rnnc/cache.py alone (no torch import), waits for a common start
    # time, then loads a large source: both writes overlap on the same file name.
    body = source(10) + "".join(f"# padding line {i:07d} {'x' * 60}\n" for i in range(30000))
    (fresh.parent / "body.py").write_text(body)
    script = textwrap.dedent(f"""
        import importlib.util, sys, time
        spec = importlib.util.spec_from_file_location("rnnc_cache_alone", {str(CACHE_PY)!r})
        cache = importlib.util.module_from_spec(spec); spec.loader.exec_module(cache)
        body = open({str(fresh.parent / "body.py")!r}).read()
        time.sleep(max(0.0, float(sys.argv[1]) - time.time()))
        m = cache.load_module(body, tag="race")
        print(m.__file__, m.f(1))
    """)
    start = time.time() + 1.0
    procs = [subprocess.Popen([sys.executable, "-c", script, str(start)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=os.environ.copy())
             for _ in range(2)]
    results = [p.communicate(timeout=60) + (p.returncode,) for p in procs]
    for out, err, rc in results:
        assert rc == 0, err
    lines = {out.strip() for out, _, _ in results}
    assert len(lines) == 1
    path, value = lines.pop().rsplit(" ", 1)
    assert value == "12" and Path(path).parent == fresh
    assert valid(Path(path), body)
    assert [p.name for p in fresh.iterdir()] == [Path(path).name]  # no temp files left


def test_triton_jit_accepts_cached_source(monkeypatch):
    triton = pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # a compiled kernel, not interpreted
    src = ("import triton\nimport triton.language as tl\n\n@triton.jit\n"
           "def kernel(x_ptr, n: tl.constexpr):\n    tl.store(x_ptr, tl.load(x_ptr) + n)\n")
    m = cache.load_module(src, tag="jit")
    assert isinstance(m.kernel, triton.runtime.jit.JITFunction)
    assert "tl.store" in m.kernel.src
