"""gRPC stubs are generated, not committed: once per .proto version, atomically, safely under a race."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lifecycle.serve import grpc_stubs
from lifecycle.serve.grpc_stubs import PROTO, generate, source_hash

ROOT = Path(__file__).resolve().parents[2]


def test_generated_once_per_proto_version_and_stale_versions_removed(tmp_path):
    proto, out = tmp_path / PROTO.name, tmp_path / "gen"
    proto.write_text(PROTO.read_text())
    first = generate(proto, out)
    assert first.name == f"h{source_hash(proto)}"
    grpc_file = (first / "lifecycle_serve_pb2_grpc.py").read_text()
    assert "from . import lifecycle_serve_pb2 as" in grpc_file and "\nimport lifecycle_serve_pb2" not in grpc_file
    stamp = (first / "lifecycle_serve_pb2.py").stat().st_mtime_ns
    assert generate(proto, out) == first and (first / "lifecycle_serve_pb2.py").stat().st_mtime_ns == stamp
    proto.write_text(PROTO.read_text() + "\nmessage Extra { string note = 1; }\n")
    second = generate(proto, out)
    assert second != first and "Extra" in (second / "lifecycle_serve_pb2.pyi").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["__init__.py", second.name]


def test_two_processes_racing_both_get_one_whole_version(tmp_path):
    proto, out = tmp_path / PROTO.name, tmp_path / "gen"
    proto.write_text(PROTO.read_text())
    code = ("import sys; from pathlib import Path; from lifecycle.serve.grpc_stubs import generate; "
            "print(generate(Path(sys.argv[1]), Path(sys.argv[2])).name)")
    racers = [subprocess.Popen([sys.executable, "-c", code, str(proto), str(out)], cwd=ROOT, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    results = [r.communicate(timeout=60) for r in racers]
    assert [r.returncode for r in racers] == [0, 0], results
    assert {stdout for stdout, _ in results} == {f"h{source_hash(proto)}\n"}
    assert sorted(p.name for p in out.iterdir()) == ["__init__.py", f"h{source_hash(proto)}"]  # no temporaries


def test_the_package_imports_the_current_version():
    assert Path(grpc_stubs.pb2.__file__).parent.name == f"h{source_hash()}"
    assert grpc_stubs.pb2_grpc.GenerationStub is not None
    assert "_generated" in (ROOT / ".gitignore").read_text()


def test_losing_the_rename_race_keeps_the_winners_copy(tmp_path, monkeypatch):
    proto, out = tmp_path / PROTO.name, tmp_path / "gen"
    proto.write_text(PROTO.read_text())
    real = grpc_stubs._protoc

    def protoc_while_another_process_wins(proto_path, dest):
        real(proto_path, dest)
        winner = out / f"h{source_hash(proto_path)}"
        winner.mkdir()
        (winner / "__init__.py").write_text("# the winner's copy\n")
    monkeypatch.setattr(grpc_stubs, "_protoc", protoc_while_another_process_wins)
    target = generate(proto, out)
    assert (target / "__init__.py").read_text() == "# the winner's copy\n"
    assert sorted(p.name for p in out.iterdir()) == ["__init__.py", target.name]



def test_an_unwritable_install_says_how_to_generate(tmp_path):
    proto, blocker = tmp_path / PROTO.name, tmp_path / "site-packages"
    proto.write_text(PROTO.read_text())
    blocker.write_text("a file where the package directory should be: unwritable even for root")
    with pytest.raises(RuntimeError, match="run `python -m lifecycle.serve.grpc_stubs`"):
        generate(proto, blocker / "_generated")
