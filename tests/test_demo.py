"""The README's first command: `bash examples/demo.sh` runs to the end on this machine and
prints what it promises (a volume over 4 nodes, 2000 files put, listed, read back, copied out
identical, `balefs df` with no dead bytes, a batched fsspec read of everything)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_demo_script_runs_to_the_end(tmp_path: Path, balefs_home: Path) -> None:
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    work = sandbox / "demo"
    env = dict(os.environ, BALEFS_DEMO_DIR=str(work), HOME=str(sandbox), TMPDIR=str(sandbox),
               # `python` and `balefs` of this interpreter's environment, as after `pip install .`
               PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
    r = subprocess.run(["bash", str(REPO / "examples" / "demo.sh")], cwd=sandbox, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"demo.sh failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    out, err = r.stdout, r.stderr
    assert f"== making a small ImageNet-like tree (10 classes x 200 files, 4-64 KiB) in {work}/imagenet-mini" in out
    assert "created volume 'demo': 4 node(s), replicas 1" in out and f"metadata sqlite://{work}/home/demo.db" in out
    listed = re.findall(r"^d\S+\s+0 .* (n0144\d{4})$", out, re.M)
    assert listed == [f"n0144{c:04d}" for c in range(5)]  # `ls -l ... | head -5`
    assert re.search(r"^put 2000 files, \d+(\.\d+)? MiB in ", err, re.M), err
    assert re.search(r"^volume demo: 2000 files, 12 directories, ", out, re.M)
    assert re.search(r"^chunks: \d+, .* live .*, dead 0 B$", out, re.M)
    for i in range(4):  # `balefs df`: every node holds blocks, none orphaned
        row = re.search(rf"^{re.escape(str(work / 'data' / f'n{i}'))}\s+(\d+)\s+.*\s(\d+)\s+0 B$", out, re.M)
        assert row and int(row[1]) > 0 and row[2] == "0", out
    assert re.search(r"^fsspec: 2000 files, \d+\.\d MB in one batched cat; first file \d+ bytes$", out, re.M)
    assert out.rstrip().endswith(f"== demo OK. To keep using this volume: export BALEFS_HOME={work}/home")
    # the copy that `diff -r` compared is there, whole; nothing was written outside the demo's directory
    copied = [p for p in (work / "copy").rglob("*") if p.is_file()]
    assert len(copied) == 2000
    assert os.listdir(sandbox) == ["demo"] and os.listdir(balefs_home) == []  # its own BALEFS_HOME, not ours
