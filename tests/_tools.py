"""The repository's scripts as modules, for the tests that call their functions, and a
pickle payload for the tests of safe loading."""
import functools
import importlib.util
import os.path as osp
from types import ModuleType

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))


@functools.lru_cache(maxsize=None)
def load_script(path: str) -> ModuleType:
    """The script at ``path`` (relative to the repository), executed once per session as
    the module ``mmrest_script_<its path>`` (no clash with another import)."""
    name = 'mmrest_script_' + osp.splitext(path)[0].replace('/', '_')
    spec = importlib.util.spec_from_file_location(name, osp.join(REPO, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class WritesMarker:
    """Unpickling this calls ``exec`` with code that creates the file ``marker``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f'open({self.marker!r}, "w").write("pwned")', ))
