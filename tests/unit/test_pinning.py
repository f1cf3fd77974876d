"""Pinned modules: what runs is a checked private copy, whatever happens to the original."""

import os

import pytest

from policy.modules import ModuleRef, module_digest, resolve_module
from policy.pinning import ModuleMismatch, pin_module


def _module(tmp_path, text="class Driver: pass\n"):
    d = tmp_path / "drivers"
    d.mkdir(exist_ok=True)
    (d / "x.py").write_text(text)
    return resolve_module("x.dll", [d])


def test_the_pinned_copy_survives_a_swap_of_the_original(tmp_path):
    ref = _module(tmp_path)
    digest = module_digest(ref)
    pinned = pin_module(ref, digest, tmp_path / "state")
    ref.path.write_text("import os; os.system('evil')\n")
    assert pinned.path.read_text() == "class Driver: pass\n"
    assert module_digest(pinned) == digest
    assert oct(os.stat(pinned.path).st_mode & 0o777) == "0o444"


def test_a_module_changed_before_pinning_is_refused(tmp_path):
    ref = _module(tmp_path)
    digest = module_digest(ref)
    ref.path.write_text("changed\n")
    with pytest.raises(ModuleMismatch, match="is not the .* its signed policy names"):
        pin_module(ref, digest, tmp_path / "state")
    assert not any((tmp_path / "state" / "modules").iterdir())


def test_packages_are_pinned_whole(tmp_path):
    pkg = tmp_path / "drivers" / "p"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .impl import Driver\n")
    (pkg / "impl.py").write_text("class Driver: pass\n")
    ref = resolve_module("p.dll", [tmp_path / "drivers"])
    pinned = pin_module(ref, module_digest(ref), tmp_path / "state")
    assert (pinned.path / "impl.py").read_text() == "class Driver: pass\n"
    assert module_digest(pinned) == module_digest(ref)


def test_an_existing_pin_is_reused_and_a_damaged_one_remade(tmp_path):
    ref = _module(tmp_path)
    digest = module_digest(ref)
    first = pin_module(ref, digest, tmp_path / "state")
    assert pin_module(ref, digest, tmp_path / "state") == first
    os.chmod(first.path, 0o644)
    first.path.write_text("tampered\n")
    again = pin_module(ref, digest, tmp_path / "state")
    assert again.path.read_text() == "class Driver: pass\n"
