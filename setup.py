"""Build script for the native hot paths.

Why a setup.py next to pyproject.toml: Cython extensions and cffi builders are
discovered from the source tree (``nkudo_native/*.pyx``, ``ext/*_build.py``) so
that adding a native module is one new file, not an edit of a shared list.
``NKUDO_BUILD_ONLY=kvm,syscalls`` restricts a development build to some modules.
"""

from __future__ import annotations

import os
from pathlib import Path

from setuptools import Extension, find_packages, setup

HERE = Path(__file__).resolve().parent


def _wanted(stem: str) -> bool:
    only = os.environ.get("NKUDO_BUILD_ONLY", "").strip()
    if not only:
        return True
    return stem.lstrip("_") in {s.strip().lstrip("_") for s in only.split(",")}


def cython_extensions() -> list[Extension]:
    from Cython.Build import cythonize

    exts = [
        Extension(
            f"nkudo_native.{pyx.stem}",
            [str(pyx.relative_to(HERE))],
            extra_compile_args=["-O2", "-Wall", "-Wno-unused-function"],
        )
        for pyx in sorted((HERE / "nkudo_native").glob("*.pyx"))
        if _wanted(pyx.stem)
    ]
    return cythonize(
        exts,
        compiler_directives={"language_level": "3", "boundscheck": False, "wraparound": False},
        quiet=True,
    )


def cffi_modules() -> list[str]:
    return [
        f"{b.relative_to(HERE)}:ffibuilder"
        for b in sorted((HERE / "ext").glob("*_build.py"))
        if _wanted(b.name[: -len("_build.py")])
    ]


setup(
    packages=[*find_packages("src"), "nkudo_native"],
    package_data={"nkudo_native": ["*.pyi", "py.typed"], "nkudo": ["py.typed"], "nkudo.chsim": ["data/*.yaml"], "nkudo.cp": ["openapi.yaml"],
                  "nkudo.cp.web": ["templates/*.html", "templates/*/*.html", "static/*", "static/vendor/*"]},
    ext_modules=cython_extensions(),
    cffi_modules=cffi_modules(),
)
