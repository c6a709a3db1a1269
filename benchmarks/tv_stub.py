"""Benchmark-only stand-in for torchvision, for the peers of benchmarks/loaders.py.

MosaicML Streaming imports torchvision at `import streaming` (for its vision datasets, which the
benchmark does not use), and the registry's torchvision wheels do not import with the local CPU
build of torch (`operator torchvision::nms does not exist`). `install()` puts a module with the
three names Streaming imports into sys.modules, only when the real torchvision is absent or
broken; calling anything of it raises. Not part of balefs.
"""
from __future__ import annotations

import sys
import types


class _Missing:
    """A name of torchvision that the benchmark never uses."""

    def __init__(self, *args, **kwargs) -> None:
        raise RuntimeError("torchvision is stubbed for the loaders benchmark (benchmarks/tv_stub.py)")


def install() -> str:
    """Make `import torchvision` work for the peers: 'real' if it imports, else 'stub' (installed)."""
    try:
        import torchvision  # noqa: F401

        return "real"
    except Exception:  # noqa: BLE001 - absent, or built for another torch
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
    try:  # Streaming imports transformers, which must see no torchvision (its check cannot read a stub)
        import transformers.feature_extraction_utils  # noqa: F401
    except ImportError:
        pass
    tv = types.ModuleType("torchvision")
    datasets = types.ModuleType("torchvision.datasets")
    transforms = types.ModuleType("torchvision.transforms")
    functional = types.ModuleType("torchvision.transforms.functional")
    datasets.VisionDataset = type("VisionDataset", (_Missing,), {})
    datasets.CIFAR10 = type("CIFAR10", (_Missing,), {})
    functional.to_tensor = _Missing
    tv.datasets, tv.transforms, transforms.functional = datasets, transforms, functional
    tv.__version__ = "0.0.0+balefs-benchmark-stub"
    sys.modules.update({"torchvision": tv, "torchvision.datasets": datasets, "torchvision.transforms": transforms,
                        "torchvision.transforms.functional": functional})
    return "stub"
