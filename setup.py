"""The native block engine (native/blockengine.c) as the optional extension balefs._native, and the
native FUSE session (native/fusesession.c, libfuse 3's low-level API) as balefs._fusenative.

Optional: where it cannot be built (no compiler, no liblz4-dev/libxxhash-dev/libipsec-mb-dev headers) the
package installs without them and reads through the pure-Python codec (`balefs --version` says
which path runs; without libfuse3-dev or libsqlite3-dev only the session is left out: `balefs mount --session native`
says so). BALEFS_SANITIZE=1 builds it with AddressSanitizer and UBSan (tox -e sanitize).
"""
import os

from setuptools import Extension, setup

flags = ["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror", "-fvisibility=hidden"]
link: list[str] = []
if os.environ.get("BALEFS_SANITIZE") == "1":
    san = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer", "-g"]
    flags, link = flags + san, san

setup(ext_modules=[
    Extension("balefs._native", ["native/blockengine.c"], depends=["native/blockcodec.h"], libraries=["lz4", "xxhash", "IPSec_MB"],
              extra_compile_args=flags, extra_link_args=link, optional=True),
    Extension("balefs._fusenative", ["native/fusesession.c"], depends=["native/blockcodec.h"],
              include_dirs=["/usr/include/fuse3"], libraries=["fuse3", "lz4", "xxhash", "sqlite3", "pthread"],
              extra_compile_args=flags, extra_link_args=link, optional=True),
])
