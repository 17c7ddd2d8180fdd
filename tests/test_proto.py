"""The committed stubs are exactly what the .proto generates."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_committed_stubs_match_the_proto(tmp_path):
    subprocess.run(["bash", "scripts/gen-proto.sh", str(tmp_path)], cwd=ROOT, check=True, env={"PY": sys.executable, "PATH": "/usr/bin:/bin"})
    for name in ("simserve_pb2.py", "simserve_pb2.pyi", "simserve_pb2_grpc.py"):
        fresh = (tmp_path / "simserve" / "v1" / name).read_text()
        committed = (ROOT / "simserve" / "v1" / name).read_text()
        assert fresh == committed, f"simserve/v1/{name} is stale: run scripts/gen-proto.sh"
