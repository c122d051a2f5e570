"""keep_freed_memory: a freed big buffer stays in the process for reuse instead of going back to
the kernel (which would hand it out again as fresh pages, faulted in one by one). How much that
speeds a training step up is measured by the benchmark (`--keep-freed-memory`), not here."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Touches and frees a 64 MiB tensor; prints the resident memory it leaves behind, and the page
# faults that touching it cost.
PROBE = """
import os, resource, sys, torch
from engine.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
page = os.sysconf("SC_PAGE_SIZE")
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
before, start = rss(), faults()
x = torch.ones(64 << 20, dtype=torch.uint8)
touched = faults() - start
del x
print(rss() - before, touched)
"""


def probe(mode: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=ROOT, capture_output=True, text=True, check=True)
    left, faults = out.stdout.split()
    return int(left), int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_freed_big_buffer_stays_resident_where_glibc_would_unmap_it():
    default_left, default_faults = probe("default")
    kept_left, kept_faults = probe("keep")
    pages = (64 << 20) // 4096
    assert default_faults > pages // 2 and kept_faults > pages // 2  # both really touched it
    assert default_left < (16 << 20)  # glibc's default: unmapped on free
    assert kept_left > (48 << 20)  # kept: the next step's buffer can reuse these pages


def test_train_evaluate_and_summarize_set_it_first_thing():
    for script in ("train.py", "evaluate.py", "summarize.py"):
        text = (ROOT / script).read_text()
        main = text[text.index("def main("):]
        assert main.split("\n")[2].strip().startswith("keep_freed_memory()"), script
