"""The one-host install needs no Ray: the server, its app and its command line never import it
(``service.cluster`` does, and only ``alexnet-serve --ray`` loads that)."""

import subprocess
import sys

from tests.processes import REPO_ROOT

CHECK = """
import sys
from service.cli import run
from service.core.config import Settings
from service.main import create_app
create_app(Settings(_env_file=None, weights_dir="/nonexistent"))
loaded = sorted(name for name in sys.modules if name == "ray" or name.startswith(("ray.", "service.cluster")))
assert not loaded, loaded
print("ok")
"""


def test_the_one_host_server_imports_no_ray() -> None:
    done = subprocess.run(
        [sys.executable, "-c", CHECK], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
