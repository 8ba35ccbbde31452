"""The per-run directory of prometheus-client's multiprocess mode, made and removed by the gunicorn master.

Kept apart from cds_service.metrics because PROMETHEUS_MULTIPROC_DIR must be set before prometheus_client's
metric objects are made (see that module, and _switch_already_made_metrics).
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
import tempfile
from typing import Any

ENV = "PROMETHEUS_MULTIPROC_DIR"

_made: dict[str, Any] = {}


def prepare_multiprocess_dir() -> str:
    """Point PROMETHEUS_MULTIPROC_DIR at an empty directory for this run; its path. Called by the master before
    any worker starts (and before prometheus_client is imported there)."""
    path = os.environ.get(ENV)
    if path:
        os.makedirs(path, exist_ok=True)
        for stale in glob.glob(os.path.join(path, "*.db")):  # a previous run's counts are not this run's
            os.remove(stale)
    else:
        path = tempfile.mkdtemp(prefix="cds-metrics-")
        os.environ[ENV] = path
        _made.update(path=path, pid=os.getpid())
    _switch_already_made_metrics()
    return path


def _switch_already_made_metrics() -> None:
    """When cds_service.metrics was imported before the directory was set (the command line's parser imports
    the report, which imports storage), move its metrics to multiprocess values: prometheus-client picks the
    value class when it is imported, and an unlabelled metric makes its value when it is made (a labelled one
    makes each child's on first use)."""
    values = sys.modules.get("prometheus_client.values")
    if values is None:
        return
    values.ValueClass = values.get_value_class()  # type: ignore[attr-defined]
    made = sys.modules.get("cds_service.metrics")
    if made is not None:
        made.remake_unlabelled()


def remove_multiprocess_dir() -> None:
    """The master's exit: remove the directory it made (never one the operator named)."""
    if _made.get("pid") == os.getpid():
        shutil.rmtree(_made["path"], ignore_errors=True)


