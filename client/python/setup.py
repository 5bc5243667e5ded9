"""Builds the hardneg package, generating its gRPC stubs from the service's .proto.

The stubs (``hardneg/v1/hardneg_pb2.py``, ``hardneg_pb2.pyi``, ``hardneg_pb2_grpc.py``) are
not kept in the source tree: every build runs grpcio-tools' protoc on
``proto/hardneg/v1/hardneg.proto``, so the package always matches the proto it was built
from. The proto is looked up in ``$HARDNEG_PROTO_DIR``, then ``./proto`` (inside an sdist),
then ``../../proto`` (the repository checkout).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = Path(__file__).resolve().parent
PROTO = Path("hardneg/v1/hardneg.proto")


def proto_root() -> Path:
    candidates = [os.environ.get("HARDNEG_PROTO_DIR"), HERE / "proto", HERE.parent.parent / "proto"]
    for candidate in candidates:
        if candidate and (Path(candidate) / PROTO).is_file():
            return Path(candidate)
    tried = ", ".join(str(c) for c in candidates if c)
    raise SystemExit(f"hardneg: {PROTO} not found under any of: {tried} (set HARDNEG_PROTO_DIR)")


def generate_stubs(out_dir: Path) -> None:
    """Runs protoc (from grpcio-tools) on the proto, writing into ``out_dir``/hardneg/v1."""
    import grpc_tools
    from grpc_tools import protoc

    root = proto_root()
    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"
    (out_dir / "hardneg" / "v1").mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{root}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(root / PROTO),
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"hardneg: protoc failed on {root / PROTO}")


class BuildPyWithStubs(build_py):
    """build_py that also generates the stubs: into the build dir, or into src/ for an
    editable install (where they are git-ignored)."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            generate_stubs(HERE / "src")
        else:
            generate_stubs(Path(self.build_lib))


class SdistWithProto(sdist):
    """sdist that carries the proto, so a wheel can be built from it outside the checkout."""

    def make_release_tree(self, base_dir: str, files: list[str]) -> None:
        super().make_release_tree(base_dir, files)
        target = Path(base_dir) / "proto" / PROTO
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(proto_root() / PROTO, target)


setup(cmdclass={"build_py": BuildPyWithStubs, "sdist": SdistWithProto})
