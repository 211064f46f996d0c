"""Builds the epx Python package: runs `make lib` at the repository root and
ships build/libepx.so inside the package (epx/libepx.so).

Set EPX_LIBRARY=/path/to/libepx.so to ship an already-built library instead
(no make). Metadata lives in pyproject.toml.
"""

import os
import shutil
import subprocess

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))


class BuildPyWithLibrary(build_py):
    """build_py that also builds and copies libepx.so into the package."""

    def run(self):
        super().run()
        lib = os.environ.get("EPX_LIBRARY")
        if lib:
            if not os.path.isfile(lib):
                raise RuntimeError(f"EPX_LIBRARY={lib} is not a file")
        else:
            jobs = str(os.cpu_count() or 2)
            subprocess.check_call(["make", "-C", ROOT, "lib", "-j" + jobs])
            lib = os.path.join(ROOT, "build", "libepx.so")
        dest = os.path.join(self.build_lib, "epx", "libepx.so")
        self.mkpath(os.path.dirname(dest))
        shutil.copy2(lib, dest)


class BinaryDistribution(Distribution):
    """The wheel carries a native library: tag it for this platform."""

    def has_ext_modules(self):
        return True


# egg_info refuses a missing egg_base folder.
os.makedirs(os.path.join(ROOT, "build", "python"), exist_ok=True)

setup(
    cmdclass={"build_py": BuildPyWithLibrary},
    distclass=BinaryDistribution,
    # Keep setuptools' own build tree apart from make's build/ outputs.
    options={"build": {"build_base": os.path.join("build", "python")},
             "egg_info": {"egg_base": os.path.join("build", "python")}},
)
