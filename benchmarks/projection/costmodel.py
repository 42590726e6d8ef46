"""The cost model now lives in the library: :mod:`lightning_localsgd.costmodel` (also used by
``lightning-localsgd plan``). This module re-exports it, so that ``import costmodel as cm`` in the benchmark scripts
keeps working unchanged.
"""

try:
    from lightning_localsgd.costmodel import *  # noqa: F401,F403
    from lightning_localsgd.costmodel import (  # noqa: F401  (the names projection.py uses, for readers and linters)
        Calibration,
        Cluster,
        Link,
        StepCost,
        allgather_seconds,
        allreduce_seconds,
        calibrate,
        compute_seconds,
        cpu_cluster_from,
        ddp_cost,
        ddp_step,
        hops,
        local_sgd_cost,
        local_sgd_step,
        training_seconds,
    )
except ImportError:
    # A checkout without `pip install -e .`: projection.py used to need only numpy, so load the library's file
    # directly rather than requiring the package (and torch / Lightning, which its __init__ imports).
    import importlib.util
    import sys
    from pathlib import Path

    _path = Path(__file__).resolve().parents[2] / "lightning_localsgd" / "costmodel.py"
    _spec = importlib.util.spec_from_file_location("lightning_localsgd_costmodel", _path)
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[_spec.name] = _module  # dataclasses look their module up in sys.modules
    _spec.loader.exec_module(_module)
    globals().update({name: getattr(_module, name) for name in _module.__all__})
