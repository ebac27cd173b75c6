"""Handing freed heap memory back to the operating system (glibc keeps it per thread arena otherwise)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def trim_heap() -> None:
    """After a large transient job (a rebuild) resident memory drops back instead of staying at its peak.
    A no-op where the C library has no malloc_trim."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


M_ARENA_MAX = -8  # mallopt parameter numbers in glibc's malloc.h
M_MMAP_THRESHOLD = -3


def limit_arenas(count: int = 2) -> None:
    """glibc gives busy threads their own heap arenas; a server's thread pools then hold many partly
    free heaps and resident memory creeps up. Two arenas are plenty for this service (the same as
    MALLOC_ARENA_MAX=2). A no-op outside glibc."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(M_ARENA_MAX, count)


def return_large_blocks(threshold: int = 8 * 2**20) -> None:
    """Blocks of `threshold` bytes or more are mapped on their own and unmapped when freed. glibc would
    otherwise raise its threshold after the first such free, and a decoded 100-megapixel image
    (Pillow's 16 MiB blocks) then stays resident in each thread's arena after the request.
    A no-op outside glibc."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, threshold)
