"""Build of the C engine into the kvtier._engine extension.

Everything declarative is in pyproject.toml; this file only lists the extension's sources
(engine_c/src/*.c plus the Cython binding), maps adapters/ to kvtier.adapters and detects
liburing for the io_uring read backend (engine_c/README.md).
"""
import glob
import os
import shlex
import subprocess
import sysconfig
import tempfile

from setuptools import Extension, setup

try:
    from Cython.Build import cythonize
except ImportError as exc:  # pragma: no cover - pyproject's build requirements provide it
    raise SystemExit("building kvtier needs Cython>=3.0 (pip install cython)") from exc

HERE = os.path.dirname(os.path.abspath(__file__))
engine_sources = sorted(glob.glob(os.path.join("engine_c", "src", "*.c")))
extra_cflags = os.environ.get("KVTIER_CFLAGS", "").split()

_URING_PROBE = """#include <liburing.h>
int main(void) { struct io_uring r; return io_uring_queue_init(1, &r, 0) != 0; }
"""


def have_liburing() -> bool:
    """True when the compiler that builds the extension compiles and links against liburing.

    The probe is only built, never run: whether the kernel grants a ring is decided at run
    time (kvt_io_init falls back to pread). KVTIER_NO_IO_URING=1 or -DKVT_NO_IO_URING in
    KVTIER_CFLAGS turns it off; a compiler without liburing (a cross compiler) just builds
    the pread backend alone.
    """
    if os.environ.get("KVTIER_NO_IO_URING", "") not in ("", "0"):
        return False
    if "-DKVT_NO_IO_URING" in extra_cflags:
        return False
    cc = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            probe = cc + ["-x", "c", "-", "-o", os.path.join(tmp, "probe"), "-luring"]
            done = subprocess.run(probe, input=_URING_PROBE, text=True, capture_output=True,
                                  timeout=120)
        except (OSError, subprocess.SubprocessError):
            return False
    return done.returncode == 0


uring = have_liburing()
print("kvtier: io_uring read backend", "built in" if uring else "left out (pread only)")

ext = Extension(
    "kvtier._engine",
    sources=[os.path.join("kvtier", "_engine.pyx")] + engine_sources,
    include_dirs=[os.path.join("engine_c", "include"), os.path.join("engine_c", "src")],
    extra_compile_args=["-std=c11", "-O2", "-D_GNU_SOURCE", "-Wno-unused-function"]
    + (["-DKVT_HAVE_IO_URING"] if uring else [])
    + extra_cflags,
    extra_link_args=os.environ.get("KVTIER_LDFLAGS", "").split(),
    libraries=(["uring"] if uring else []) + ["m"],
)

# Every folder of adapters/ with an __init__.py becomes kvtier.adapters.<name>.
adapter_packages = sorted(
    "kvtier.adapters." + os.path.basename(os.path.dirname(p))
    for p in glob.glob(os.path.join("adapters", "*", "__init__.py"))
)

setup(
    packages=["kvtier", "kvtier.bench", "kvtier.adapters"] + adapter_packages,
    package_dir={"kvtier": "kvtier", "kvtier.adapters": "adapters"},
    ext_modules=cythonize([ext], compiler_directives={"language_level": "3", "binding": True, "embedsignature": True}),
)
