"""Our top-level names against the installed distributions' names.

The commands and the tests import the project as top-level packages (`model`, `kernels`, `tracking`)
with the checkout first on sys.path, so a top-level package of ours named like one of an installed
distribution hides that distribution from everything in the process: transformers 5.25 imports the PyPI
package `kernels` at start-up, found ours, and every oracle test failed. The first test fails, naming
both, the moment an install brings such a distribution (requirements-dev.txt bounds transformers so none
does); the others prove the check can fail, and that the commands still find our packages when a
distribution of the same name is installed behind the checkout.
"""
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def project_top_level_names() -> list[str]:
    """What `import NAME` finds in the checkout: the root's modules and regular packages. Folders
    without __init__.py (tests/, bench/) are namespace portions, which any installed package outranks:
    they shadow nothing."""
    modules = [p.stem for p in ROOT.glob("*.py")]
    packages = [p.parent.name for p in ROOT.glob("*/__init__.py")]
    return sorted(modules + packages)


def shadowed_distributions() -> list[str]:
    installed = importlib.metadata.packages_distributions()
    return [f"our top-level {name!r} ({name}/ or {name}.py in the checkout) shadows the one of the installed "
            f"distribution {', '.join(sorted(set(installed[name])))}"
            for name in project_top_level_names() if name in installed]


def test_no_installed_distribution_is_shadowed_by_a_top_level_name_of_ours():
    problems = shadowed_distributions()
    assert not problems, "; ".join(problems)


def fake_distribution(site: Path, name: str) -> None:
    """A distribution installed in `site` whose top-level package is `name` and fails when imported, so
    a process that resolves `import name` to it rather than to ours says so."""
    (site / name).mkdir(parents=True)
    (site / name / "__init__.py").write_text(
        f"raise ImportError('imported the installed distribution {name!r}, not the checkout\\'s')\n")
    info = site / f"{name}-0.19.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.19.1\n")
    (info / "top_level.txt").write_text(f"{name}\n")
    (info / "RECORD").write_text(f"{name}/__init__.py,,\n")


def run(args, cwd, pythonpath):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(map(str, pythonpath)))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_the_check_names_an_installed_distribution_that_we_shadow(tmp_path):
    site = tmp_path / "site-packages"
    fake_distribution(site, "kernels")
    result = run(["-c", "import test_layout; print(test_layout.shadowed_distributions())"],
                 cwd=tmp_path, pythonpath=[ROOT / "tests", site])
    assert result.returncode == 0, result.stderr
    assert "our top-level 'kernels'" in result.stdout and "distribution kernels" in result.stdout, result.stdout


def test_commands_import_our_kernels_with_the_pypi_name_installed_behind_the_checkout(tmp_path):
    """The PyPI `kernels` (what transformers 5.25 installs) lies in site-packages, which comes after a
    script's folder and after PYTHONPATH on sys.path: run from the checkout, or from elsewhere with the
    checkout on PYTHONPATH, the commands import our kernels/ and never the installed one."""
    site = tmp_path / "site-packages"
    fake_distribution(site, "kernels")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    ours = f"import kernels, svp; assert kernels.__file__.startswith({str(ROOT)!r}), kernels.__file__"
    for args, cwd, pythonpath in [
            (["sample.py", "--help"], ROOT, [site]),
            (["train.py", "--help"], ROOT, [site]),
            (["-m", "tracking", "--help"], ROOT, [site]),
            ([str(ROOT / "sample.py"), "--help"], elsewhere, [ROOT, site]),
            (["-m", "tracking", "--help"], elsewhere, [ROOT, site]),
            (["-c", ours], elsewhere, [ROOT, site])]:
        result = run(args, cwd, pythonpath)
        assert result.returncode == 0, f"{' '.join(args)} in {cwd}: {result.stderr[-2000:]}"
