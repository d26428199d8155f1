"""The console script registers every command without importing what only some commands use.

Each `streamrec ...` (the trainer, serving and parameter-server processes, every test that runs
the CLI in a subprocess) pays for what importing `streamrec.app.cli` pulls in. When `refit` asked
torch which rank it was, every command imported torch: `streamrec --help` took 6 s, 2.5 s of it
torch. A fresh interpreter shows what the import loads (this process has loaded everything)."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "faiss", "numba", "sklearn", "optuna", "matplotlib", "fastapi", "uvicorn", "pyspark")


def loaded_by(module: str) -> list[str]:
    """The HEAVY packages that importing `module` loads in a fresh interpreter."""
    code = (f"import sys, json, {module}; "
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_console_script_imports_no_heavy_library_until_a_command_needs_it() -> None:
    assert loaded_by("streamrec.app.cli") == []


def test_the_refit_job_imports_torch_only_for_a_torch_model() -> None:
    """`refit` of an ALS or kNN family, and the rank question it asks of every fit, need no torch."""
    assert "torch" not in loaded_by("streamrec.trainer.refit")


def test_a_process_outside_any_process_group_is_the_only_rank() -> None:
    code = ("import sys; from streamrec.trainer.ranks import world, is_primary; "
            "print(world(), is_primary(), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["(0,", "1)", "True", "False"]
