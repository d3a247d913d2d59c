import sys
from pathlib import Path

# Test helpers (fakes, stubs, fixture-tree builders) live beside the tests and import by plain name.
sys.path.insert(0, str(Path(__file__).parent))
