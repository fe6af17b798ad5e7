"""CTest Python.Example: python/examples/mezo_jsonl.py as the README runs it (fewer steps),
on an opt-micro model with the GPT-2 tokenizer; the dev loss must fall. Skips (77) without numpy."""
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    import numpy  # noqa: F401
except ImportError:
    print("SKIP: the example needs numpy (Debian: python3-numpy; scripts/setup.sh installs it)")
    sys.exit(77)

src = Path(os.environ.get("ZO2_SOURCE_DIR", Path(__file__).resolve().parents[2]))
tune = os.environ.get("ZO2_TUNE", str(src / "build" / "tools" / "zo2-tune"))
with tempfile.TemporaryDirectory() as tmp:
    model = Path(tmp) / "micro"
    subprocess.run([tune, "-q", "init", "--preset", "opt-micro", "--tokenizer", str(src / "data" / "gpt2"),
                    "--out", str(model)], check=True)
    ex = src / "data" / "examples"
    out = subprocess.run([sys.executable, str(src / "python" / "examples" / "mezo_jsonl.py"), str(model),
                          str(ex / "reviews-text-train.jsonl"), str(ex / "reviews-text-dev.jsonl"),
                          str(Path(tmp) / "tuned"), "40"], check=True, capture_output=True, text=True).stdout
    print(out)
    before = float(re.search(r"dev loss before: ([\d.]+)", out).group(1))
    after = float(re.search(r"dev loss after: +([\d.]+)", out).group(1))
    assert after < before, (before, after)
    assert (Path(tmp) / "tuned" / "config.json").exists()
print("ok")
