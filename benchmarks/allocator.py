"""glibc allocator setting shared by the CPU timing benchmarks."""

import ctypes
import platform


def keep_freed_memory() -> None:
    """Make glibc serve every allocation from its heap and never give freed memory back.

    By default glibc maps each allocation above its (adaptive, up to 32 MiB) threshold afresh and
    unmaps it when freed, and trims the heap's top, so tensors pay their page faults again each step
    (about 20 ms per 46 MB here), and how many depends on what ran before in the same process. This
    setting, or MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647 in the environment, stops that,
    so methods timed one after another in one process see the same warm heap.
    """
    if platform.system() != "Linux":
        raise RuntimeError("--keep-freed-memory sets glibc's mallopt and needs Linux")
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_max = -1, -4
    if not (libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_trim_threshold, 2**31 - 1)):
        raise RuntimeError("mallopt failed")


def return_freed_memory() -> None:
    """Make glibc map every allocation of 1 MiB or more afresh and unmap it when freed.

    glibc's adaptive threshold rises to 32 MiB after the first large frees, after which freed tensors
    stay in its heap: the resident set then holds the high-water mark of the heap, not the live
    tensors. For runs that must fit (benchmarks/fit.py) a fixed threshold returns each freed tensor at
    once, at the price of its page faults when the next is allocated.
    """
    if platform.system() != "Linux":
        raise RuntimeError("return_freed_memory sets glibc's mallopt and needs Linux")
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    if not (libc.mallopt(m_mmap_threshold, 1 << 20) and libc.mallopt(m_trim_threshold, 1 << 20)):
        raise RuntimeError("mallopt failed")
