"""The tested matrix: CPU models × version sets at the ends of pyproject.toml's ranges.

``lowest`` is every edge dependency at the lowest version pyproject.toml allows; ``newest``
is what pip picks today; ``old-runtime`` is the lowest onnxruntime beside the newest numpy
(onnxruntime is built against numpy's C API). The floor, 1.21.1, is the first release that
runs the compression guard's opset-5 ``TreeEnsemble`` models (docs/device.md §4) and does not
die on a Pi 4. :data:`KNOWN_BAD` are versions just below it, with what they do on which CPU
(``tests/arm64/test_versions.py`` checks it).
"""

from __future__ import annotations

from tests.arm64.rootfs import VersionSet

LOWEST = {"numpy": "1.24.4", "onnxruntime": "1.21.1", "requests": "2.31.0",
          "cryptography": "42.0.0"}

VERSION_SETS = {
    "lowest": VersionSet("lowest", tuple(LOWEST.items())),
    "newest": VersionSet("newest"),
    "old-runtime": VersionSet("old-runtime", (("onnxruntime", LOWEST["onnxruntime"]),)),
}


#: Versions pip must not install on a Pi, what they do there, and the board that shows it:
#: (requirements, QEMU_CPU, what the import does). onnxruntime 1.21.0's aarch64 wheel runs an
#: instruction the Pi 4's Cortex-A72 lacks at import (onnxruntime#23957, #24112: "Illegal
#: instruction" on real Pi 4s); 1.18 cannot import beside numpy 2 (built against numpy 1's
#: C API). pyproject.toml's floor (1.21.1) leaves both out.
KNOWN_BAD = (
    (("onnxruntime==1.21.0", "numpy==2.2.6"), "cortex-a72", "SIGILL"),
    (("onnxruntime==1.18.0", "numpy==2.4.6"), "cortex-a72", "ImportError"),
)
