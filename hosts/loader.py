"""Loading a driver module from the path the Reflector resolved (DESIGN.md section 2, ``Dll``).

The path is already resolved and hashed by the Reflector; here it is only executed.  Bytecode is
never written next to the module (the host's view of it is read-only, and a cache file would be
something the next host trusts without the hash check).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType


def load_module(path: str, unique_name: str) -> ModuleType:
    """Import the driver at ``path`` under ``unique_name`` and return the module.

    ``path`` is an ``x.py`` file or a package directory ``x/`` (its ``__init__.py``; relative
    imports inside the package work).  A native ``.so`` is not a Python module: it raises
    ``ImportError`` pointing to ``hosts.native``, which loads it (``hosts.dispatch`` chooses).  A
    missing file raises ``FileNotFoundError``; anything else that is not a driver raises
    ``ImportError``; whatever the module raises while it executes propagates unchanged.
    """
    path = os.fspath(path)
    if path.endswith(".so"):
        raise ImportError(f"driver {path}: a native driver is loaded by hosts.native.load, not imported", path=path)
    if os.path.isdir(path):
        init = os.path.join(path, "__init__.py")
        if not os.path.isfile(init):
            raise FileNotFoundError(f"driver package {path} has no __init__.py")
        spec = importlib.util.spec_from_file_location(unique_name, init, submodule_search_locations=[path])
    elif path.endswith(".py"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"driver module {path} does not exist")
        spec = importlib.util.spec_from_file_location(unique_name, path)
    else:
        raise ImportError(f"driver {path}: not a .py module or a package directory", path=path)
    if spec is None or spec.loader is None:
        raise ImportError(f"driver {path}: Python cannot load it as a module", path=path)
    if unique_name in sys.modules:
        raise ImportError(f"driver {path}: module name {unique_name!r} is already taken", path=path)
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs, as import does, so that a package's relative imports find it.
    sys.modules[unique_name] = module
    saved, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(unique_name, None)
        raise
    finally:
        sys.dont_write_bytecode = saved
    return module
