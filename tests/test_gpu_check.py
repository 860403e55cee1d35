"""The GPU check's dry run: every section of bench/gpu_check.py at tiny sizes on the CPU.

This keeps the script that a lent GPU machine runs once working where no GPU is: a section
that raises, a check that fails or a row that is missing fails here first.
"""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_dry_run_writes_every_section(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("XLA_FLAGS", None)  # one CPU device, as the GPU machine has one GPU
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "bench", "gpu_check.py"), "--dry-run",
         f"--out={out}", "--budget-s=1200"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    report = json.loads((out / "gpu_check.json").read_text())
    assert result.returncode == 0, (report.get("errors"), result.stdout[-3000:],
                                    result.stderr[-3000:])
    assert report["errors"] == {} and report["skipped"] == []
    assert report["env"]["backend"] == "cpu" and report["env"]["versions"]["jax"]
    assert set(report["matmul"]) == {"bfloat16", "float32"}
    assert {"pytest", "memvir_in_place", "bfloat16_params_and_loss",
            "device_evaluation_equals_blocks", "main_py"} <= set(report["checks"])
    assert all(check["ok"] for check in report["checks"].values()), report["checks"]
    assert report["checks"]["memvir_in_place"]["copies"] == 0
    rows = {(r["config"], r["dtype"]): r for r in report["train"]}
    assert set(rows) == {("cub200_proxy_anchor_resnet50", "bfloat16"),
                         ("cub200_proxy_anchor_bn_inception", "float32"),
                         ("cub200_proxy_anchor_vit_s16_dino", "bfloat16")}
    assert all(r["proxy_jax_ms"] > 0 and r["torch_ms"] > 0 for r in rows.values())
    assert [r["loss_relative_difference"] < 1e-5 for r in report["losses"]] == [True, True]
    assert [r["method"] for r in report["evaluation"]] == ["device", "faiss", "blocks"]
    assert report["evaluation_methods_agree"]
    markdown = (out / "gpu_check.md").read_text()
    assert "| train step |" in markdown and "| evaluation (all-vs-all) |" in markdown
