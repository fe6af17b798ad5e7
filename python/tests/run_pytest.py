"""CTest's entry to the Python tests: skips (exit 77, CTest's SKIP_RETURN_CODE) with the
reason when pytest or numpy is missing, else runs pytest with the given arguments."""
import sys

missing = []
for mod in ("pytest", "numpy"):
    try:
        __import__(mod)
    except ImportError:
        missing.append(mod)
if missing:
    print(f"SKIP: the Python tests need {' and '.join(missing)} (Debian: "
          + " ".join("python3-" + m for m in missing) + "; scripts/setup.sh installs them)")
    sys.exit(77)
import pytest  # noqa: E402

sys.exit(pytest.main(sys.argv[1:]))
