"""Build of the C engine into the kvtier._engine extension.

Everything declarative is in pyproject.toml; this file only lists the extension's sources
(engine_c/src/*.c plus the Cython binding) and maps adapters/ to kvtier.adapters.
"""
import glob
import os

from setuptools import Extension, setup

try:
    from Cython.Build import cythonize
except ImportError as exc:  # pragma: no cover - pyproject's build requirements provide it
    raise SystemExit("building kvtier needs Cython>=3.0 (pip install cython)") from exc

HERE = os.path.dirname(os.path.abspath(__file__))
engine_sources = sorted(glob.glob(os.path.join("engine_c", "src", "*.c")))

ext = Extension(
    "kvtier._engine",
    sources=[os.path.join("kvtier", "_engine.pyx")] + engine_sources,
    include_dirs=[os.path.join("engine_c", "include"), os.path.join("engine_c", "src")],
    extra_compile_args=["-std=c11", "-O2", "-D_GNU_SOURCE", "-Wno-unused-function"]
    + os.environ.get("KVTIER_CFLAGS", "").split(),
    extra_link_args=os.environ.get("KVTIER_LDFLAGS", "").split(),
    libraries=["m"],
)

# Every folder of adapters/ with an __init__.py becomes kvtier.adapters.<name>.
adapter_packages = sorted(
    "kvtier.adapters." + os.path.basename(os.path.dirname(p))
    for p in glob.glob(os.path.join("adapters", "*", "__init__.py"))
)

setup(
    packages=["kvtier", "kvtier.adapters"] + adapter_packages,
    package_dir={"kvtier": "kvtier", "kvtier.adapters": "adapters"},
    ext_modules=cythonize([ext], compiler_directives={"language_level": "3"}),
)
