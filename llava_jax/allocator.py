"""tcmalloc for XLA:CPU: `python -m llava_jax.main` restarts itself once with tcmalloc preloaded, when installed.

XLA:CPU allocates each call's temporaries anew — a weight dequantized or converted to float32 for a matmul: 180 MB
for one 4096 × 11008 matrix, ~800 MB per 7B decoder layer — and glibc's malloc serves blocks that large with
mmap and gives them back with munmap, so every call faults every page in again: 44,000 minor page faults for
that one matrix, more time than its matmul. tcmalloc keeps freed spans and hands them out again (~4,500 faults;
bench/big_kernels.py times XLA:CPU's matmuls under both, `--allocator`). The allocator is chosen when a process
starts, so `restart_with_tcmalloc` re-executes the same command line (`sys.orig_argv`) with LD_PRELOAD set,
before jax is imported; `llava_jax/__init__.py` calls it, and it acts only for `python -m llava_jax.main`.

  LLAVA_JAX_TCMALLOC=0       keep the system allocator
  LLAVA_JAX_TCMALLOC=<path>  preload this library instead of searching for one
A tcmalloc already in the process (TPU VM images preload one) is kept. Install it with
`apt-get install libtcmalloc-minimal4` (Debian / Ubuntu) or `dnf install gperftools-libs`.

Only the standard library is imported here: this runs before numpy and jax.
"""
from __future__ import annotations

import ctypes.util
import os
import sys
from typing import Dict, Optional

ENV = "LLAVA_JAX_TCMALLOC"
_TRIED = "LLAVA_JAX_TCMALLOC_TRIED"  # set in the restarted process: never restart twice
NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")
ENTRY_MODULE = "llava_jax.main"
# tcmalloc reports every allocation above 1 GiB on stderr ("tcmalloc: large alloc ..."); a 7B checkpoint's
# stacked leaves are several GiB each, so the threshold is raised past anything a host holds
QUIET = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 44)}


def find_tcmalloc() -> Optional[str]:
  """Path of an installed tcmalloc shared library (`LLAVA_JAX_TCMALLOC=<path>` first), or None."""
  chosen = os.environ.get(ENV, "")
  if chosen not in ("", "0", "1"):
    return chosen if os.path.isfile(chosen) else None
  for d in DIRS:
    for name in NAMES:
      if os.path.isfile(os.path.join(d, name)):
        return os.path.join(d, name)
  found = ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")
  return found  # a soname the dynamic loader resolves, or None


def is_loaded() -> bool:
  """Whether a tcmalloc library is mapped into this process (Linux; False elsewhere)."""
  try:
    with open("/proc/self/maps") as f:
      return any("tcmalloc" in line for line in f)
  except OSError:
    return False


def preload_env(env: Optional[Dict[str, str]] = None, library: Optional[str] = None) -> Dict[str, str]:
  """A copy of `env` (default: os.environ) whose processes start with `library` (default: `find_tcmalloc()`)
  preloaded; unchanged when none is installed."""
  out = dict(os.environ if env is None else env)
  library = library or find_tcmalloc()
  if library and library not in out.get("LD_PRELOAD", "").split(":"):
    out["LD_PRELOAD"] = ":".join(x for x in (library, out.get("LD_PRELOAD", "")) if x)
    for k, v in QUIET.items():
      out.setdefault(k, v)
  return out


def _is_entry_command() -> bool:
  argv = getattr(sys, "orig_argv", [])
  return any(a == "-m" and b == ENTRY_MODULE for a, b in zip(argv, argv[1:]))


def restart_with_tcmalloc() -> None:
  """Re-execute this `python -m llava_jax.main ...` process with tcmalloc preloaded (see the module docstring);
  returns without doing anything for any other program, on non-Linux hosts, when opted out, when tcmalloc is
  already loaded or not installed, or in the restarted process itself."""
  if (not sys.platform.startswith("linux") or os.environ.get(ENV) == "0" or os.environ.get(_TRIED)
      or not _is_entry_command() or "jax" in sys.modules or is_loaded()):
    return
  library = find_tcmalloc()
  if not library:
    return
  env = preload_env(library=library)
  env[_TRIED] = library
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable] + list(sys.orig_argv[1:]), env)


def describe() -> str:
  """One line for the run's log: which allocator this process runs with."""
  if is_loaded():
    return "allocator: tcmalloc"
  if os.environ.get(ENV) == "0":
    return f"allocator: system malloc ({ENV}=0)"
  return ("allocator: system malloc; XLA:CPU re-faults its temporaries on every call under it, "
          "`apt-get install libtcmalloc-minimal4` makes CPU runs faster (see llava_jax/allocator.py)")
