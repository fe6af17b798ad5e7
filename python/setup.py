"""Builds zo2's Python package with the repository's CMake (the target zo2_python) and
packages what it assembles in <cmake build>/python/zo2. The module holds zo2's C++ layers
itself (Note [One library, exporting only the C API] in CMakeLists.txt): no libzo2 beside it.

Environment: ZO2_CMAKE_ARGS (extra CMake arguments, e.g. "-DZO2_CUDA=OFF"), ZO2_BUILD_JOBS.
"""
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        if not (ROOT / "CMakeLists.txt").exists() or not (ROOT / "include" / "zo2.h").exists():
            sys.exit(f"zo2: {ROOT} is not the zo2 repository; install from a checkout "
                     "(pip install --no-build-isolation ./python builds in place)")
        build = Path(self.build_temp).resolve() / "cmake"
        args = ["-S", str(ROOT), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DZO2_BUILD_TESTS=OFF",
                "-DZO2_BUILD_BENCH=OFF", "-DZO2_BUILD_PYTHON=ON", f"-DPython3_EXECUTABLE={sys.executable}"]
        args += shlex.split(os.environ.get("ZO2_CMAKE_ARGS", ""))
        if shutil.which("nvcc") is None and Path("/usr/local/cuda/bin/nvcc").exists():
            os.environ["PATH"] = "/usr/local/cuda/bin:" + os.environ["PATH"]
        subprocess.run(["cmake", *args], check=True)
        jobs = os.environ.get("ZO2_BUILD_JOBS", str(os.cpu_count() or 1))
        subprocess.run(["cmake", "--build", str(build), "--target", "zo2_python", "-j", jobs], check=True)
        built = build / "python" / "zo2"
        dest = Path(self.get_ext_fullpath(ext.name)).parent
        dest.mkdir(parents=True, exist_ok=True)
        module = next(built.glob("_zo2*.so"))
        shutil.copy2(module, Path(self.get_ext_fullpath(ext.name)))


setup(
    packages=["zo2"],
    package_dir={"zo2": "zo2"},
    package_data={"zo2": ["*.pyi", "py.typed"]},
    ext_modules=[Extension("zo2._zo2", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
