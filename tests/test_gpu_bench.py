"""bench/gpu.py --dry-run: the GPU proof's every section runs on the CPU (tiny sizes, interpreted kernels) and
leaves its figures in the results files, so the script cannot rot before a GPU appears. The figures of a dry
run mean nothing; this checks that each one exists and is sane, not its value."""
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_dry_run_produces_every_figure(tmp_path):
    out, work = tmp_path / "results", tmp_path / "work"
    proc = subprocess.run([sys.executable, "bench/gpu.py", "--dry-run", "--out", str(out), "--work", str(work)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [jf] = list(out.glob("gpu-cpu-dryrun-*.json"))
    assert jf.with_suffix(".md").is_file()
    data = json.loads(jf.read_text())
    meta = data["meta"]
    assert meta["dry_run"] and meta["torch"] and meta["triton"] and set(meta["seconds"]) >= {"tests", "kernels",
                                                                                            "models"}
    assert "errors" not in data, data.get("errors")

    # 1. tests: both suites ran and passed
    for suite in ("kernels", "model parity"):
        r = data["tests"][suite]
        assert r["passed"] > 0 and r["failed"] == r["errors"] == 0, (suite, r)

    # 2. kernels: every op and case, forward and forward+backward, with a finite ratio and a small error
    rows = data["kernels"]
    cases = {(r["op"], r["case"], r["mode"]) for r in rows}
    assert len(cases) == 2 * (6 + 3 + 1 + 1), sorted(cases)
    for r in rows:
        assert r["ours_ms"] > 0 and r["torch_ms"] > 0 and math.isfinite(r["ratio"]), r
        assert float(r["maxdiff"]) < 1e-4, r        # fp32 on the CPU: the interpreted kernel equals PyTorch's op

    # 3. models: UNet forward, both sample latencies, and the four training variants of both families
    m = data["models"]
    assert m["sd15 unet forward"]["ratio"] > 0 and float(m["sd15 unet forward"]["maxdiff"]) < 1e-4
    for family in ("sd15", "sdxl"):
        s = m[f"{family} sample 4 steps"]
        assert s["image_s"] > 0 and s["finite"], s
        for variant in ("lora", "two-copy", "lora-ckpt", "two-copy-ckpt"):
            t = m[f"{family} train step {variant}"]
            assert "error" not in t and t["steps_logged"] == 3 and t["s_per_step"] > 0, (family, variant, t)
            assert t["two_copy"] == variant.startswith("two-copy"), (family, variant, t)
            assert "peak_gb" in t           # null on the CPU: torch.cuda's counter only
    assert m["sd15 sample 4 steps"]["cli_ok"]

    # 4. results: the targets table (memory targets need CUDA) and every section in the Markdown page
    assert {t["target"].split()[0] for t in data["targets"]} >= {"attention", "GroupNorm+SiLU", "no"}
    md = jf.with_suffix(".md").read_text()
    for heading in ("## Targets", "## CUDA tests", "## Kernels", "## Models"):
        assert heading in md
