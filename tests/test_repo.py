"""Repository invariants: the README's commands are the ones CI runs."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ci_runs_the_readme_test_command():
    readme = open(os.path.join(ROOT, "README.md")).read()
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    commands = [line.strip() for line in ci.splitlines() if line.startswith("pip install torch")]
    assert len(commands) == 1, "CI must run exactly one install-and-test command"
    assert commands[0] in readme, "the README's test command and .ci/run's have drifted apart"
    assert "pytest" in commands[0]


def test_version_stays_below_what_transformers_takes_for_flute_kernel():
    import flute
    major, minor, patch = (int(x) for x in re.match(r"(\d+)\.(\d+)\.(\d+)", flute.__version__).groups())
    assert (major, minor, patch) < (0, 4, 1)


def test_readme_repository_map_names_every_module():
    readme = open(os.path.join(ROOT, "README.md")).read()
    repo_map = readme[readme.index("## Repository map"):]
    modules = [f[:-3] for f in os.listdir(os.path.join(ROOT, "flute"))
               if f.endswith(".py") and not f.startswith("__")]
    missing = [m for m in modules if not re.search(rf"\b{m}(\.py)?\b", repo_map)]
    assert not missing, f"the README's repository map omits {missing}"


def test_readme_links_point_at_files_that_exist():
    readme = open(os.path.join(ROOT, "README.md")).read()
    links = re.findall(r"\]\(((?!http|#)[^)]+)\)", readme)
    assert links
    for link in links:
        assert os.path.exists(os.path.join(ROOT, link)), link
